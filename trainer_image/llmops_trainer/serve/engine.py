"""Generation with a KV cache and continuous batching.

`KVCacheModel` runs the trainer's GPT weights incrementally: the keys and values of every
position already processed stay in a preallocated cache of `max_batch` slots, so a decoding
step feeds one token per sequence instead of the whole sequence again (the trainer's
`GPT.forward` has no cache). Running sequences occupy slots 0..B-1 contiguously, so a step
reads the cache as a slice, never a gather; when a sequence finishes, the last one moves into
its slot.

`Engine` owns the model on one thread: between steps it drops cancelled sequences, admits
queued requests (one batched prefill), then decodes one token for every running sequence.
Request handlers talk to it through `Stream`s on their event loop: a step's events reach each
loop in one callback (not one per token), and a stream read behind the engine gets the
tokens that piled up as one Delta. Each row of a batch keeps its own sampling parameters,
generator, penalties and log-probability requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F

from llmops_trainer.model import GPT, Block, GPTConfig
from llmops_trainer.serve.adapters import Adapter, AdapterError
from llmops_trainer.serve.batching import Scheduler
from llmops_trainer.serve.decoder_cache import DecoderKVCacheModel, Prefill, padded
from llmops_trainer.serve.metrics import ServingMetrics
from llmops_trainer.serve.protocol import SamplingParams
from llmops_trainer.serve.sampling import TokenCounts, TokenLogprob, logprobs_of, sample
from llmops_trainer.serve.text import (
    ChatTemplate,
    IncrementalDecoder,
    StopMatcher,
    TextTokenizer,
)

log = logging.getLogger("llmops_trainer.serve")
# Prompt positions turned into logits at once for echo's log-probabilities (bounds memory:
# positions x vocab floats).
PROMPT_LOGPROB_CHUNK = 256


class KVCacheModel:
    """Prefill and single-token decoding over a GPT's weights with a slot-based KV cache."""

    def __init__(
        self,
        model: GPT,
        max_batch: int,
        context_length: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.config: GPTConfig = model.config
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = device
        self.blocks = [cast(Block, block) for block in self.model.transformer.h]
        self.max_batch = max_batch
        self.context_length = context_length
        c = self.config
        shape = (c.num_layers, max_batch, c.num_heads, context_length, c.hidden_size // c.num_heads)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        batch, length, _ = t.shape
        return t.view(batch, length, self.config.num_heads, -1).transpose(1, 2)

    @torch.inference_mode()
    def prefill(
        self,
        first_slot: int,
        prompts: list[list[int]],
        adapters: Sequence[int] | None = None,
        every: Collection[int] = (),
    ) -> Prefill:
        """Process whole prompts into slots first_slot.. (right-padded to the longest);
        returns the logits (n, vocab) of each prompt's last position, and the final hidden
        states of every position of the rows in `every`. The built-in GPT has no adapters:
        `adapters` must be all 0."""
        assert not any(adapters or ()), "adapters need a transformers model"
        ids, lengths, positions, mask = padded(prompts, self.device)
        n, longest = len(prompts), int(positions.shape[0])
        t = self.model.transformer
        x = t.wte(ids) + t.wpe(positions)
        slots = slice(first_slot, first_slot + n)
        for layer, block in enumerate(self.blocks):
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(self.config.hidden_size, dim=2)
            q, k, v = self._heads(q), self._heads(k), self._heads(v)
            self.keys[layer, slots, :, :longest] = k
            self.values[layer, slots, :, :longest] = v
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
            x = x + block.attn.c_proj(y.transpose(1, 2).reshape(x.shape))
            x = x + block.mlp(block.ln_2(x))
        last = t.ln_f(x[torch.arange(n, device=self.device), lengths - 1])
        logits: torch.Tensor = self.model.lm_head(last)
        hidden = {row: t.ln_f(x[row, : len(prompts[row])]) for row in every}
        return Prefill(logits.float(), hidden)

    @torch.inference_mode()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (positions, vocab) of final hidden states from `prefill`."""
        logits: torch.Tensor = self.model.lm_head(hidden)
        return logits.float()

    @torch.inference_mode()
    def decode(
        self, tokens: list[int], positions: list[int], adapters: Sequence[int] | None = None
    ) -> torch.Tensor:
        """One token for each of the sequences in slots 0..len(tokens)-1, at their positions;
        returns the logits (batch, vocab) of the next token."""
        batch = len(tokens)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        span = max(positions) + 1
        # Rows at one position write a slice and see exactly their `span` keys: no mask.
        # Otherwise shorter sequences must not see the stale cache beyond their length.
        same = all(p == positions[0] for p in positions)
        rows: torch.Tensor | slice = slice(0, batch)
        at: torch.Tensor | int = positions[0]
        mask: torch.Tensor | None = None
        if not same:
            rows, at = torch.arange(batch, device=self.device), pos
            mask = (torch.arange(span, device=self.device)[None, :] <= pos[:, None])[:, None, None]
        t = self.model.transformer
        x = t.wte(ids) + t.wpe(pos)[:, None]
        for layer, block in enumerate(self.blocks):
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(self.config.hidden_size, dim=2)
            q, k, v = self._heads(q), self._heads(k), self._heads(v)
            self.keys[layer, rows, :, at] = k[:, :, 0]
            self.values[layer, rows, :, at] = v[:, :, 0]
            y = F.scaled_dot_product_attention(
                q,
                self.keys[layer, :batch, :, :span],
                self.values[layer, :batch, :, :span],
                attn_mask=mask,
            )
            x = x + block.attn.c_proj(y.transpose(1, 2).reshape(x.shape))
            x = x + block.mlp(block.ln_2(x))
        logits: torch.Tensor = self.model.lm_head(t.ln_f(x[:, 0]))
        return logits.float()

    def move(self, source: int, target: int, length: int) -> None:
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]


@dataclass(frozen=True)
class Delta:
    """New text, and the log-probabilities of the tokens generated since the last Delta (when
    the request asked for them)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()

    def __add__(self, later: Delta) -> Delta:
        return Delta(self.text + later.text, self.logprobs + later.logprobs)


@dataclass(frozen=True)
class PromptLogprobs:
    """Sent once, before any Delta, when the request asked for the prompt's log-probabilities:
    one entry per prompt token, None for the first (nothing predicts it)."""

    entries: tuple[TokenLogprob | None, ...]


@dataclass(frozen=True)
class Done:
    finish_reason: str  # stop, length, cancelled, error
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    cumulative_logprob: float | None = None  # of the generated tokens, when computed


Event = Delta | PromptLogprobs | Done
Requests = Sequence[tuple[list[int], SamplingParams, int]]


class QueueFull(Exception):
    """No room within the queue's bound or wait; retry after `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("the server is at capacity")
        self.retry_after = retry_after


class Closed(Exception):
    """The engine is draining: it admits nothing new."""


@dataclass(eq=False)
class Generation:
    """One sequence's state, owned by the engine thread once admitted."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    decoder: IncrementalDecoder
    arrival: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    cached: int = 0  # positions whose keys and values are in the cache
    slot: int = -1
    cancelled: bool = False
    last_token_at: float | None = None
    generator: torch.Generator | None = None
    adapter_id: int = 0  # the adapter asked for (0: the base; see Engine.adapter_id)
    adapter: int = 0  # the model's adapter slot serving it, fixed when it is admitted
    stopper: StopMatcher = field(init=False)
    pending: list[TokenLogprob] = field(default_factory=list)  # not yet sent with a Delta
    output_counts: TokenCounts | None = None  # kept only when penalties need them
    cumulative_logprob: float = 0.0

    def __post_init__(self) -> None:
        self.stopper = StopMatcher(self.params.stop)


class Stream:
    """The event-loop side of a generation: events arrive from the engine thread.

    A reader that falls behind the engine (a busy event loop, a slow client) gets the text
    and log-probabilities of all the tokens that arrived meanwhile as one Delta, so it spends
    one chunk, not one per token, catching up (as vLLM's output collector does)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._events: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.generation: Generation | None = None

    def receive(self, event: Event) -> None:  # event loop
        self._events.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def events(self) -> AsyncIterator[Event]:
        events = self._events
        while True:
            while not events:
                self._waiter = self.loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            event = events.popleft()
            while isinstance(event, Delta) and events and isinstance(events[0], Delta):
                event = event + cast(Delta, events.popleft())
            yield event
            if isinstance(event, Done):
                return


class _Mailbox:
    """Events on their way from the engine thread to one event loop. At most one delivery is
    pending on the loop at a time: what the engine sends while the loop is still busy joins
    it, so a loop that falls behind is woken once for several steps (and its streams merge
    the tokens), not once per step."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._events: list[tuple[Stream, Event]] = []

    def post(self, events: list[tuple[Stream, Event]]) -> None:  # engine thread
        with self._lock:
            wake = not self._events
            self._events += events
        if wake:
            # A closed loop means nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:  # event loop
        with self._lock:
            events, self._events = self._events, []
        for stream, event in events:
            stream.receive(event)


class Engine:
    def __init__(
        self,
        model: KVCacheModel | DecoderKVCacheModel,
        tokenizer: TextTokenizer,
        eos_token_id: int | None,
        metrics: ServingMetrics,
        capacity: int,
        prefill_budget: int = 4096,
        stop_token_ids: Collection[int] = (),
        chat: ChatTemplate | None = None,
        adapter_names: Sequence[str] = (),
        max_queued: int = 0,
        queue_timeout: float = 0.0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        # Every id that ends a reply (a chat model's end of turn as well as end of text).
        self.stop_token_ids = frozenset(stop_token_ids)
        self.chat = chat
        # Adapters by name: a name keeps its id (1-based, in order of arrival) across new
        # versions; the id's current version is a slot of the model. A sequence keeps the
        # version it was admitted with; a replaced version's slot is freed when unused.
        self._names: list[str] = list(adapter_names)
        self._slots: dict[int, int] = {i: i for i in range(1, len(self._names) + 1)}
        self._retired: list[int] = []
        self._adapters_lock = threading.Lock()
        self.metrics = metrics
        self.context_length = model.context_length
        self.vocab_size = int(model.config.vocab_size)
        self.scheduler: Scheduler[Generation] = Scheduler(
            model.max_batch, capacity, prefill_budget, cost=lambda g: len(g.prompt_ids)
        )
        # Requests beyond `capacity` wait on the event loop, first come first served, up to
        # `max_queued` of them and `queue_timeout` seconds each, for room in the scheduler.
        self.max_queued = max_queued
        self.queue_timeout = queue_timeout
        self._waiters: deque[tuple[Requests, asyncio.Future[list[Stream]]]] = deque()
        self._waiters_loop: asyncio.AbstractEventLoop | None = None
        self.scheduler.on_free = self._on_free
        self._latency = 1.0  # moving average of finished requests' seconds (for Retry-After)
        metrics.track_engine(
            running=lambda: self.scheduler.running,
            waiting=lambda: self.scheduler.waiting + len(self._waiters),
            kv_cache_usage=self.kv_cache_usage,
        )
        self._running: list[Generation] = []  # index == cache slot
        # Events of the current step, sent to their event loops together (`_flush`): one
        # wake-up of a loop per step, not one per token.
        self._outbox: list[tuple[Stream, Event]] = []
        self._mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="llmops-engine", daemon=True)

    # -- adapters ---------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        """The adapters served now, by name."""
        slots = self._slots
        return [name for i, name in enumerate(self._names, 1) if i in slots]

    def adapter_id(self, name: str) -> int | None:
        """The id a request for adapter `name` carries; None when it is not served."""
        slots = self._slots
        for i, known in enumerate(self._names, 1):
            if known == name and i in slots:
                return i
        return None

    def replace_adapter(self, name: str, adapter: Adapter) -> None:
        """Serve `adapter` as `name` from now on (a new name, or a new version of one):
        requests admitted from now on get it, running ones finish with the version they
        started with. Raises AdapterError when it does not fit the base."""
        if not isinstance(self.model, DecoderKVCacheModel):
            raise AdapterError("LoRA adapters are served on transformers models only")
        with self._adapters_lock:
            slot = self.model.add_adapter(adapter)
            if name not in self._names:
                self._names = [*self._names, name]
            adapter_id = self._names.index(name) + 1
            old = self._slots.get(adapter_id)
            self._slots = {**self._slots, adapter_id: slot}  # one assignment: readers see
            if old is not None:  # either the old mapping or the new one
                self._retired.append(old)

    def remove_adapter(self, name: str) -> None:
        """Stop serving `name`: requests for it get 404 from now on; running ones finish."""
        with self._adapters_lock:
            adapter_id = self.adapter_id(name)
            if adapter_id is None:
                return
            self._retired.append(self._slots[adapter_id])
            self._slots = {k: v for k, v in self._slots.items() if k != adapter_id}

    def _free_retired(self) -> None:  # the engine thread, between steps
        if not self._retired:
            return
        with self._adapters_lock:
            used = {g.adapter for g in self._running}
            for slot in [s for s in self._retired if s not in used]:
                assert isinstance(self.model, DecoderKVCacheModel)
                self.model.drop_adapter(slot)
                self._retired.remove(slot)

    # -- the event-loop side ----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, adapter: int = 0
    ) -> Stream | None:
        """Queue a generation (with adapter `adapter`, 0 for the base); None when the queue
        is full or the engine is draining."""
        streams = self.submit_all([(prompt_ids, params, adapter)])
        return streams[0] if streams else None

    def submit_all(
        self, requests: Sequence[tuple[list[int], SamplingParams, int]]
    ) -> list[Stream] | None:
        """Queue several generations (prompt ids, parameters, adapter) together, all or none:
        the choices of one request are admitted consecutively. None when they do not fit."""
        loop = asyncio.get_running_loop()
        streams: list[Stream] = []
        generations: list[Generation] = []
        for prompt_ids, params, adapter in requests:
            stream = Stream(loop)
            generation = Generation(
                prompt_ids,
                params,
                functools.partial(self._post, stream),
                IncrementalDecoder(self.tokenizer.decode),
            )
            generation.adapter_id = adapter
            if params.seed is not None and not params.greedy:
                generation.generator = torch.Generator(device=self.model.device)
                generation.generator.manual_seed(params.seed)
            stream.generation = generation
            streams.append(stream)
            generations.append(generation)
        if not self.scheduler.submit_all(generations):
            return None
        return streams

    async def admit(self, requests: Requests) -> list[Stream]:
        """Queue generations together (`submit_all`), waiting for room when the scheduler is
        full: at most `max_queued` requests wait, each at most `queue_timeout` seconds, first
        come first served. Raises QueueFull or Closed."""
        if self.scheduler.closed:
            raise Closed()
        if not self._waiters:
            streams = self.submit_all(requests)
            if streams is not None:
                return streams
            if self.scheduler.closed:
                raise Closed()
        if len(self._waiters) >= self.max_queued or self.queue_timeout <= 0:
            raise QueueFull(self.retry_after())
        loop = asyncio.get_running_loop()
        self._waiters_loop = loop
        future: asyncio.Future[list[Stream]] = loop.create_future()
        waiter = (requests, future)
        self._waiters.append(waiter)
        self._pump()  # room may have appeared since the attempt above
        try:
            async with asyncio.timeout(self.queue_timeout):
                return await future
        except BaseException as error:
            if future.done() and not future.cancelled() and future.exception() is None:
                for stream in future.result():  # admitted just as the waiting ended
                    self.cancel(stream)
            if isinstance(error, TimeoutError):
                raise QueueFull(self.retry_after()) from None
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def retry_after(self) -> float:
        """Seconds a refused client should wait: about the time the queue ahead takes to
        drain, spread at random (0.5-1.5x) so that refused clients do not return together."""
        queued = self.scheduler.waiting + len(self._waiters) + self.scheduler.running
        estimate = self._latency * max(1.0, queued / self.model.max_batch)
        return min(max(estimate, 1.0), 30.0) * random.uniform(0.5, 1.5)

    def close(self) -> None:
        """Drain: admit nothing new; requests waiting for room get Closed at once."""
        self.scheduler.close()
        self._on_free()

    def _on_free(self) -> None:  # any thread: room appeared (or the scheduler closed)
        loop = self._waiters_loop
        if loop is not None and self._waiters:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(self._pump)

    def _pump(self) -> None:  # the event loop: admit waiters in order while they fit
        while self._waiters:
            requests, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self.scheduler.closed:
                future.set_exception(Closed())
                self._waiters.popleft()
                continue
            streams = self.submit_all(requests)
            if streams is None:
                return
            self._waiters.popleft()
            future.set_result(streams)

    def cancel(self, stream: Stream) -> None:
        """The client went away: drop the request now if queued, at the next step if running."""
        generation = stream.generation
        if generation is None or generation.cancelled:
            return
        generation.cancelled = True
        if self.scheduler.withdraw(generation):
            self._finish_metrics(generation, "cancelled")

    def drain(self, timeout: float) -> bool:
        """Refuse new requests (those waiting for room get Closed) and wait for the admitted
        ones; False if some were still busy."""
        self.close()
        return self.scheduler.wait_idle(timeout)

    def stop(self) -> None:
        self.scheduler.close()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def kv_cache_usage(self) -> float:
        """The share (0-1) of the KV cache's positions holding a running sequence's keys."""
        used = sum(g.cached for g in list(self._running))
        return used / (self.model.max_batch * self.context_length)

    # -- the engine thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.scheduler.wait_for_work(0.1):
                continue
            try:
                self.step()
            except Exception as error:
                log.exception("generation step failed")
                for generation in list(self._running):
                    self._release(generation)
                    self._send_done(generation, "error", f"generation failed: {error}")
                self._flush()
        for generation in list(self._running):  # stopped without draining
            self._release(generation)
            self._send_done(generation, "cancelled", "the server is shutting down")
        self._flush()

    def step(self) -> None:
        try:
            self._drop_cancelled()
            self._free_retired()
            admitted = self._pin_adapters(self.scheduler.admit())
            if admitted:
                self._prefill(admitted)
                self._flush()  # the first tokens go out before the batch's decoding step
                self._drop_cancelled()  # cancelled during the prefill: no first token to feed
            if self._running:
                self._decode()
        finally:
            self._flush()

    def _post(self, stream: Stream, event: Event) -> None:  # engine thread: a Generation's emit
        self._outbox.append((stream, event))

    def _flush(self) -> None:
        """Send the step's events: one callback per event loop, in the order they came."""
        if not self._outbox:
            return
        events, self._outbox = self._outbox, []
        loops: dict[asyncio.AbstractEventLoop, list[tuple[Stream, Event]]] = {}
        for stream, event in events:
            loops.setdefault(stream.loop, []).append((stream, event))
        for loop, batch in loops.items():
            mailbox = self._mailboxes.get(loop)
            if mailbox is None:
                if loop.is_closed():
                    continue  # nobody is listening any more
                # Loops come and go (tests run one per asyncio.run): forget closed ones.
                self._mailboxes = {k: m for k, m in self._mailboxes.items() if not k.is_closed()}
                mailbox = self._mailboxes[loop] = _Mailbox(loop)
            mailbox.post(batch)

    def _drop_cancelled(self) -> None:
        for generation in [g for g in self._running if g.cancelled]:
            self._release(generation)
            self._finish_metrics(generation, "cancelled")

    def _pin_adapters(self, admitted: list[Generation]) -> list[Generation]:
        """Give each admitted sequence its adapter's current version for its whole life;
        one whose adapter stopped being served while it waited ends with an error."""
        slots = self._slots
        kept = []
        for generation in admitted:
            if generation.adapter_id:
                slot = slots.get(generation.adapter_id)
                if slot is None:
                    self.scheduler.finish(generation)
                    self._send_done(generation, "error", "the adapter is no longer served")
                    continue
                generation.adapter = slot
            kept.append(generation)
        return kept

    def _prefill(self, admitted: list[Generation]) -> None:
        first = len(self._running)
        now = time.perf_counter()
        for offset, generation in enumerate(admitted):
            generation.slot = first + offset
            self._running.append(generation)
            self.metrics.queue_time.observe(now - generation.arrival)
        every = [row for row, g in enumerate(admitted) if g.params.prompt_logprobs is not None]
        prefill: Prefill = self.model.prefill(
            first, [g.prompt_ids for g in admitted], [g.adapter for g in admitted], every
        )
        for generation in admitted:
            generation.cached = len(generation.prompt_ids)
            self.metrics.prompt_tokens.inc(generation.cached)
        for row in every:
            generation = admitted[row]
            entries = self._prompt_logprobs(generation, prefill.hidden[row])
            generation.emit(PromptLogprobs(entries))
        scored = [g for g in admitted if g.params.max_tokens == 0]  # echo only: no tokens
        for generation in scored:
            self._release(generation)
            self._send_done(generation, "length")
        rows = [row for row, g in enumerate(admitted) if g.params.max_tokens > 0]
        if rows:
            logits = prefill.logits if len(rows) == len(admitted) else prefill.logits[rows]
            self._accept([admitted[row] for row in rows], logits)

    def _prompt_logprobs(
        self, g: Generation, hidden: torch.Tensor
    ) -> tuple[TokenLogprob | None, ...]:
        """Position i's logits predict prompt token i + 1."""
        top = g.params.prompt_logprobs or 0
        entries: list[TokenLogprob | None] = [None]
        for start in range(0, len(g.prompt_ids) - 1, PROMPT_LOGPROB_CHUNK):
            end = min(start + PROMPT_LOGPROB_CHUNK, len(g.prompt_ids) - 1)
            logits = self.model.head(hidden[start:end])
            entries += logprobs_of(logits, g.prompt_ids[start + 1 : end + 1], top)
        return tuple(entries)

    def _decode(self) -> None:
        batch = list(self._running)
        self.metrics.batch_size.observe(len(batch))
        logits = self.model.decode(
            [g.output_ids[-1] for g in batch], [g.cached for g in batch], [g.adapter for g in batch]
        )
        for generation in batch:
            generation.cached += 1
        self._accept(batch, logits)

    def _accept(self, batch: list[Generation], logits: torch.Tensor) -> None:
        params = [g.params for g in batch]
        outputs = None
        if any(p.penalised for p in params):
            for g in batch:
                if g.params.penalised and g.output_counts is None:
                    g.output_counts = TokenCounts(logits.shape[-1], g.output_ids)
            outputs = [g.output_counts for g in batch]
        tokens = sample(logits, params, [g.generator for g in batch], outputs)
        scored = [row for row, p in enumerate(params) if p.logprobs is not None]
        entries: dict[int, TokenLogprob] = {}
        if scored:
            top = max(params[row].logprobs or 0 for row in scored)
            found = logprobs_of(logits[scored], [tokens[row] for row in scored], top)
            for row, entry in zip(scored, found, strict=True):
                keep = params[row].logprobs or 0
                entries[row] = TokenLogprob(entry.token, entry.logprob, entry.top[:keep])
        now = time.perf_counter()
        accepted = 0
        for row, (generation, token) in enumerate(zip(batch, tokens, strict=True)):
            if generation.cancelled:
                continue  # released at the start of the next step
            self._append(generation, token, now, entries.get(row))
            accepted += 1
        self.metrics.generation_tokens.inc(accepted)

    def _append(self, g: Generation, token: int, now: float, entry: TokenLogprob | None) -> None:
        g.output_ids.append(token)
        if g.output_counts is not None:
            g.output_counts.add(token)
        if entry is not None:
            g.pending.append(entry)
            g.cumulative_logprob += entry.logprob
        if g.last_token_at is None:
            self.metrics.time_to_first_token.observe(now - g.arrival)
        else:
            self.metrics.inter_token_latency.observe(now - g.last_token_at)
        g.last_token_at = now
        reason: str | None = None
        text = ""
        ends = token == self.eos_token_id or token in self.stop_token_ids
        end_of_text = ends and not g.params.ignore_eos
        if end_of_text:
            reason = "stop"
        else:
            text, hit = g.stopper.push(g.decoder.push(token))
            if hit:
                reason = "stop"
            elif (
                len(g.output_ids) >= g.params.max_tokens
                or len(g.prompt_ids) + len(g.output_ids) >= self.context_length
            ):
                reason = "length"
        if end_of_text or reason == "length":
            # No more tokens come: what the decoder and the stop matcher held back is final.
            tail, hit = g.stopper.push(g.decoder.flush())
            text += tail if hit else tail + g.stopper.flush()
            reason = "stop" if hit else reason
        if text or (reason is not None and g.pending):
            g.emit(Delta(text, tuple(g.pending)))
            g.pending.clear()
        if reason is not None:
            self._release(g)
            self._send_done(g, reason)

    def _release(self, generation: Generation) -> None:
        slot = generation.slot
        last = self._running[-1]
        if last is not generation:
            self.model.move(last.slot, slot, last.cached)
            last.slot = slot
            self._running[slot] = last
        self._running.pop()
        generation.slot = -1
        self.scheduler.finish(generation)

    def _send_done(self, g: Generation, reason: str, error: str | None = None) -> None:
        self._finish_metrics(g, reason)
        cumulative = g.cumulative_logprob if g.params.logprobs is not None else None
        g.emit(Done(reason, len(g.prompt_ids), len(g.output_ids), error, cumulative))

    def _finish_metrics(self, g: Generation, reason: str) -> None:
        self.metrics.requests.labels(finish_reason=reason).inc()
        if reason in ("stop", "length"):
            seconds = time.perf_counter() - g.arrival
            self._latency = 0.9 * self._latency + 0.1 * seconds
            self.metrics.e2e_latency.observe(seconds)
            self.metrics.request_prompt_tokens.observe(len(g.prompt_ids))
            self.metrics.request_generation_tokens.observe(len(g.output_ids))
