"""Synthetic data from language models, in the slice stage, after the cleaning steps:

- pseudo-labelling (`sources[].pseudoLabel`): the documents of such a source are prompts; a
  model answers each, and the pair is kept when the mean log-probability of the answer's
  tokens reaches `minMeanLogprob` (else dropped as `low-confidence`, or `no-response` when
  the answer is empty);
- augmentation (`processing.augmentation.llm`): paraphrases of each kept document (a pair's
  prompt; the response stays) and question/answer pairs about it (a question from the
  document, then its answer from the document and the question), stored with the document
  (`"g"` in docs.jsonl); the tokenize stage adds them to the training split when the document lands
  there. Chats and the documents of sources held out as validation or test get none.

Documents arrive in batches, so the requests of a batch run `concurrency` at a time. Every
answer goes through the content-hash cache (llm_endpoint.Cache) on the output volume.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmops.api.dataset import DatasetSpec, Generation
from llmops_trainer.data import llm_endpoint
from llmops_trainer.data.llm_endpoint import Answer, Ask, Cache, Client, render
from llmops_trainer.data.registry import Document

LOW_CONFIDENCE = "low-confidence"
NO_RESPONSE = "no-response"
PSEUDO_LABEL = "pseudo-label"  # the mark of a pseudo-labelled record ("s" in docs.jsonl)
PARAPHRASE = "paraphrase"
QUESTION_ANSWER = "question-answer"
BATCH = 256  # documents whose requests are sent together


@dataclass
class Pending:
    """A document the cleaning steps kept, waiting for its answers."""

    row: int  # its row in the slice's per-document arrays
    document: Document
    source: int
    reason: str | None = None  # set when pseudo-labelling drops it
    score: float | None = None  # the mean token log-probability of a pseudo-label
    generated: list[dict[str, Any]] = field(default_factory=list)


class LlmStage:
    """The language-model work of one slice. `pseudo` and `augment` are the counters the
    statistics report (the pseudo-label step's and the augment step's)."""

    def __init__(
        self,
        spec: DatasetSpec,
        cache_dir: Path,
        pseudo: Counter[str],
        augment: Counter[str],
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self.spec = spec
        self.pseudo, self.augment = pseudo, augment
        cache = Cache(cache_dir)
        clients: list[Client] = [
            Client(llm_endpoint.resolve(endpoint, i, environ), cache)
            for i, (_, endpoint) in enumerate(spec.llm_endpoints())
        ]
        self.labellers: dict[int, Client] = {}
        number = 0
        for index, source in enumerate(spec.sources):
            if source.pseudo_label is not None:
                self.labellers[index] = clients[number]
                number += 1
        self.llm = spec.processing.augmentation.llm
        self.writer = clients[number] if self.llm is not None else None
        self.clients = clients

    @staticmethod
    def wanted(spec: DatasetSpec) -> bool:
        return bool(spec.llm_endpoints())

    def run(self, batch: list[Pending]) -> None:
        for index, client in self.labellers.items():
            self._label(client, index, [p for p in batch if p.source == index])
        if self.writer is not None:
            held_out = {
                i for i, s in enumerate(self.spec.sources) if s.split not in (None, "train")
            }
            eligible = [
                p
                for p in batch
                if p.reason is None and p.document.messages is None and p.source not in held_out
            ]
            self._augment(self.writer, eligible)

    def requests(self) -> int:
        return sum(c.counts["requests"] for c in self.clients)

    def _label(self, client: Client, index: int, batch: list[Pending]) -> None:
        config = self.spec.sources[index].pseudo_label
        assert config is not None
        todo = [p for p in batch if p.document.response is None]
        asks = [
            _ask(config, render(config.prompt_template, text=p.document.text), logprobs=True)
            for p in todo
        ]
        answers = client.ask_all(config.prompt_template, asks)
        for pending, answer in zip(todo, answers, strict=True):
            self._count(self.pseudo, answer)
            text = answer.text.strip()
            if not text:
                pending.reason = NO_RESPONSE
            elif answer.mean_logprob is None or answer.mean_logprob < config.min_mean_logprob:
                pending.reason = LOW_CONFIDENCE
            else:
                pending.document.response = text
                pending.score = round(answer.mean_logprob, 6)
            self.pseudo["kept" if pending.reason is None else "dropped"] += 1

    def _augment(self, client: Client, batch: list[Pending]) -> None:
        llm = self.llm
        assert llm is not None
        paraphrases, questions = llm.paraphrases, llm.question_answer
        jobs: list[tuple[Pending, str, Ask, str]] = []  # (document, kind, request, template)
        for pending in batch:
            document = pending.document
            if paraphrases is not None:
                prompt = render(paraphrases.prompt_template, text=document.text)
                for sample in range(paraphrases.count):
                    ask = _ask(paraphrases, prompt, sample=sample)
                    jobs.append((pending, PARAPHRASE, ask, paraphrases.prompt_template))
            if questions is not None:
                prompt = render(questions.question_template, text=document.combined)
                for sample in range(questions.count):
                    ask = _ask(questions, prompt, sample=sample)
                    jobs.append((pending, QUESTION_ANSWER, ask, questions.question_template))
        answers = self._ask_grouped(client, [(template, ask) for _, _, ask, template in jobs])
        follow_up: list[tuple[Pending, str, Ask]] = []
        for (pending, kind, _, _), answer in zip(jobs, answers, strict=True):
            self._count(self.augment, answer)
            text = answer.text.strip()
            if not text:
                self.augment["empty"] += 1
            elif kind == PARAPHRASE:
                record = {"t": text, "k": PARAPHRASE}
                if pending.document.response is not None:
                    record["r"] = pending.document.response
                pending.generated.append(record)
                self.augment["paraphrases"] += 1
            else:
                assert questions is not None
                prompt = render(
                    questions.answer_template, text=pending.document.combined, question=text
                )
                follow_up.append((pending, text, _ask(questions, prompt)))
        if questions is None:
            return
        replies = client.ask_all(questions.answer_template, [ask for _, _, ask in follow_up])
        for (pending, question, _), reply in zip(follow_up, replies, strict=True):
            self._count(self.augment, reply)
            said = reply.text.strip()
            if not said:
                self.augment["empty"] += 1
                continue
            pending.generated.append({"t": question, "r": said, "k": QUESTION_ANSWER})
            self.augment["questionAnswer"] += 1

    @staticmethod
    def _ask_grouped(client: Client, requests: list[tuple[str, Ask]]) -> list[Answer]:
        """Answers in order to requests of several templates, each template's requests
        together (the template is part of each cache key)."""
        answers: list[Answer | None] = [None] * len(requests)
        for template in dict.fromkeys(t for t, _ in requests):
            at = [i for i, (t, _) in enumerate(requests) if t == template]
            for i, answer in zip(
                at, client.ask_all(template, [requests[i][1] for i in at]), strict=True
            ):
                answers[i] = answer
        return [a for a in answers if a is not None]

    @staticmethod
    def _count(counter: Counter[str], answer: Answer) -> None:
        counter["asked"] += 1
        if answer.refused is not None:
            counter["refused"] += 1  # the endpoint refused this request; no text
        else:
            counter["cached" if answer.cached else "answered"] += 1


def _ask(config: Generation, prompt: str, *, logprobs: bool = False, sample: int = 0) -> Ask:
    return Ask(prompt, config.temperature, config.max_tokens, logprobs=logprobs, sample=sample)
