"""Tokenize stage: an Indexed Job after the prepare pod; pod `p` of `P` tokenizes the units
`u` with `u % P == p`.

A unit is the kept documents whose start falls in bytes `[u * unitBytes, (u + 1) *
unitBytes)` of the kept text in global order (data.prepare_stage), so the units, and the
shards they write, are the same whatever the numbers of slices and pods. A unit reads its
documents from the slices' docs.jsonl (the prepare stage's per-slice tables give each
document's line and split), drops the training documents that share an n-gram with the
evaluation text (processing.decontamination), applies the source weights
(`weighted_copies`), the augmentation and the records a model wrote, tokenizes and writes
its shards: `<split>/shard-<unit>-<k>.bin` (and `.mask` for supervised data), documents in
global order, each shard about `sharding.tokensPerShard` tokens. The concatenation of the
units' shards in unit order is the token stream of one process over the whole corpus.

It writes, under <work>/tokenize, `unit-<u>.json` (its shards and counters),
`unit-<u>.npz` (the contaminated documents: slice and row of its meta.npz) and, last,
`unit-<u>.done` (the prepare stage's run id: a rerun skips the finished units; a failed
pod's units are redone alone).

Memory: one unit's document table, one shard's tokens, the tokenizer and the
decontamination index; never the corpus.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llmops.api.dataset import Dataset, DatasetSpec
from llmops_trainer.data import decontaminate
from llmops_trainer.data import tokenize as tok
from llmops_trainer.data.augment import augment
from llmops_trainer.data.chat import ChatEncoder, Message
from llmops_trainer.data.prepare_stage import (
    TOKENIZER,
    docs_file,
    mix,
    prepare_dir,
    read_plan,
    source_counts,
    text_of,
)
from llmops_trainer.data.slice_stage import slice_dir
from llmops_trainer.data.synthetic import PSEUDO_LABEL
from llmops_trainer.shards import SPLITS, ShardWriter, SplitInfo

log = logging.getLogger("llmops.data")
TOKENIZE_DIR = "tokenize"
TOKENIZE_BATCH = 1024


def tokenize_dir(work_dir: Path) -> Path:
    return work_dir / TOKENIZE_DIR


def unit_path(work_dir: Path, unit: int, suffix: str) -> Path:
    return tokenize_dir(work_dir) / f"unit-{unit:06d}.{suffix}"


@dataclass
class _Item:
    """A document on its way into the shards."""

    text: str
    response: str | None
    messages: list[Message] | None
    source: str

    @property
    def plain(self) -> bool:
        """Plain text: learned on every token (in supervised shards, MASK_TEXT)."""
        return self.response is None and self.messages is None


def weighted_copies(weight: float, heads: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    """How many times each of the documents whose content hashes start with `heads` (their
    first 8 bytes, little-endian) goes into the training split under a source weight:
    floor(weight), plus one when the document's hash, spread evenly over [0, 1), is below
    the fraction. So 2.5 writes every document twice and about half of them a third time,
    0.3 keeps about 30% of them and drops the rest, and reruns (and reorderings) agree."""
    unit = mix(np.asarray(heads, dtype=np.uint64)).astype(np.float64) / 2.0**64
    whole = int(weight)
    return whole + (unit < weight - whole).astype(np.int64)


def kinds(spec: DatasetSpec) -> tuple[bool, bool]:
    """(supervised, mixed) shards: supervised records among the documents (question/answer
    pairs written by a model count), and plain text too."""
    llm = spec.processing.augmentation.llm
    pairs_made = llm is not None and llm.question_answer is not None
    supervised = pairs_made or any(s.supervised for s in spec.sources)
    return supervised, supervised and not all(s.supervised for s in spec.sources)


def _augmented_chat(
    messages: list[Message], methods: Sequence[str], probability: float, seed: int
) -> list[Message]:
    """Noise in the user's turns only, as in the prompt of a pair: the targets stay clean."""
    return [
        (
            role,
            augment(content, methods, probability, seed + (i << 32)) if role == "user" else content,
        )
        for i, (role, content) in enumerate(messages)
    ]


class _Encoder:
    """The tokenizer of the version (the prepare stage's, or the model's) and chat rendering."""

    def __init__(self, dataset: Dataset, work_dir: Path) -> None:
        spec = dataset.spec
        self.chats: ChatEncoder | None = None
        if spec.tokenizer.from_model is not None:
            model = tok.model_tokenizer(spec)
            self.tokenizer = model.tokenizer
            if any(s.messages_field for s in spec.sources):
                self.chats = ChatEncoder(model.folder, model.tokenizer, model.eos_id)
        else:
            self.tokenizer = tok.load(prepare_dir(work_dir) / TOKENIZER)


def run_tokenize(dataset: Dataset, output_dir: Path, work_dir: Path, pod: int, pods: int) -> int:
    """Pod `pod` of `pods`: its units (see the module doc); returns how many it wrote."""
    if not 0 <= pod < pods:
        raise ValueError(f"tokenize pod {pod} outside 0..{pods - 1}")
    plan = read_plan(work_dir)
    mine = [u for u in range(pod, plan["units"], pods) if not _finished(work_dir, u, plan)]
    if not mine:
        log.info("tokenize pod %d/%d: nothing left to do", pod, pods)
        return 0
    tokenize_dir(work_dir).mkdir(parents=True, exist_ok=True)
    encoder = _Encoder(dataset, work_dir)
    index = None
    config = dataset.spec.processing.decontamination
    if config is not None and plan["decontamination"] is not None:
        saved = np.load(prepare_dir(work_dir) / "ngrams.npy")
        index = decontaminate.NgramIndex.of(config.ngram, saved)
    for unit in mine:
        _unit(dataset, output_dir, work_dir, plan, unit, encoder, index)
    return len(mine)


def _finished(work_dir: Path, unit: int, plan: dict[str, Any]) -> bool:
    marker = unit_path(work_dir, unit, "done")
    return marker.is_file() and marker.read_text() == plan["run"]


def _unit_docs(work_dir: Path, plan: dict[str, Any], unit: int) -> npt.NDArray[Any]:
    """The unit's documents (the prepare stage's rows, with their slice), in global order."""
    low, high = unit * plan["unitBytes"], (unit + 1) * plan["unitBytes"]
    parts, owners = [], []
    for number, (first, last) in enumerate(plan["slices"]):
        if not first <= unit <= last:
            continue
        table = np.load(docs_file(work_dir, number), mmap_mode="r")
        begin, end = np.searchsorted(table["start"], [low, high], side="left")
        parts.append(np.array(table[begin:end]))
        owners.append(np.full(end - begin, number, dtype=np.int64))
        del table
    if not parts:
        return np.zeros(0, dtype=[("slice", "<i8")])
    docs = np.concatenate(parts)
    order = np.argsort(docs["ordinal"], kind="stable")
    slices = np.concatenate(owners)[order]
    docs = docs[order]
    out = np.zeros(len(docs), dtype=[*docs.dtype.descr, ("slice", "<i8")])
    for name in docs.dtype.names or ():
        out[name] = docs[name]
    out["slice"] = slices
    return out


def _unit(
    dataset: Dataset,
    output_dir: Path,
    work_dir: Path,
    plan: dict[str, Any],
    unit: int,
    encoder: _Encoder,
    index: decontaminate.NgramIndex | None,
) -> None:
    started = time.monotonic()
    spec = dataset.spec
    docs = _unit_docs(work_dir, plan, unit)
    prefix = f"shard-{unit:06d}-"
    for name in SPLITS:  # what an interrupted attempt left
        for stale in (output_dir / name).glob(f"{prefix}*"):
            stale.unlink()
    supervised, _ = kinds(spec)
    writers = [
        ShardWriter(
            output_dir,
            name,
            plan["dtype"],
            plan["eosTokenId"],
            spec.sharding.tokens_per_shard,
            supervised,
            prefix=prefix,
        )
        for name in SPLITS
    ]
    weights = np.array([s.weight for s in spec.sources])
    augmentation = spec.processing.augmentation
    languages: Counter[str] = Counter()
    per_source = source_counts(spec)
    contaminated: Counter[str] = Counter()
    hits: list[tuple[int, int]] = []
    hit_bytes = 0
    kept_bytes = augmented = 0
    synthetic: Counter[str] = Counter()
    batches: list[list[_Item]] = [[], [], []]
    tokenizer, chats = encoder.tokenizer, encoder.chats

    def flush(split: int) -> None:
        batch = batches[split]
        if not batch:
            return
        if supervised:  # pairs, chats and plain text (sources may mix them), by kind
            texts = [b for b in batch if b.plain]
            pairs = [b for b in batch if not b.plain and b.messages is None]
            dialogues = [b.messages for b in batch if b.messages is not None]
            if dialogues and chats is None:
                raise ValueError("chat sources (messagesField) need tokenizer.fromModel")
            by_text = iter(tok.encode(tokenizer, [b.text for b in texts]))
            by_pair = iter(
                tok.encode_pairs(
                    tokenizer, [b.text for b in pairs], [b.response or "" for b in pairs]
                )
            )
            by_chat = iter(chats.encode(dialogues) if chats is not None else [])
            for item in batch:
                if item.plain:
                    ids = next(by_text)
                    writers[split].add_text(ids)
                else:
                    ids, mask = next(by_pair) if item.messages is None else next(by_chat)
                    writers[split].add(ids, mask)
                per_source[item.source]["tokens"] += len(ids) + 1
        else:
            for ids, item in zip(
                tok.encode(tokenizer, [b.text for b in batch]), batch, strict=True
            ):
                writers[split].add(ids)
                per_source[item.source]["tokens"] += len(ids) + 1
        batch.clear()

    handles: dict[int, Any] = {}
    try:
        for begin in range(0, len(docs), TOKENIZE_BATCH):
            chunk = docs[begin : begin + TOKENIZE_BATCH]
            records = []
            for doc in chunk:
                number = int(doc["slice"])
                if number not in handles:
                    handles[number] = (slice_dir(work_dir, number) / "docs.jsonl").open("rb")
                handles[number].seek(int(doc["offset"]))
                records.append(json.loads(handles[number].readline()))
            dropped = np.zeros(len(chunk), dtype=bool)
            train = np.flatnonzero(chunk["split"] == 0)
            if index is not None and len(index) and len(train):
                dropped[train[index.matches([text_of(records[i]) for i in train.tolist()])]] = True
            for at, record in enumerate(records):
                doc = chunk[at]
                source = int(doc["source"])
                name = spec.sources[source].name
                if dropped[at]:
                    contaminated[name] += 1
                    hits.append((int(doc["slice"]), int(doc["row"])))
                    hit_bytes += int(doc["bytes"])
                    continue
                split = int(doc["split"])
                _add(
                    record,
                    split,
                    int(doc["head"]),
                    name,
                    float(weights[source]),
                    augmentation,
                    batches,
                    per_source,
                    synthetic,
                )
                augmented += augmentation.copies if split == 0 and augmentation.enabled else 0
                languages[record["l"]] += 1
                per_source[name]["documents"] += 1
                kept_bytes += int(doc["bytes"])
                if len(batches[split]) >= TOKENIZE_BATCH:
                    flush(split)
        for split in range(3):
            flush(split)
    finally:
        for handle in handles.values():
            handle.close()
    infos: dict[str, SplitInfo] = {n: w.close() for n, w in zip(SPLITS, writers, strict=True)}
    result = {
        "splits": {name: asdict(info) for name, info in infos.items()},
        "languages": list(languages.items()),
        "sources": {name: dict(c) for name, c in per_source.items()},
        "keptBytes": kept_bytes,
        "augmented": augmented,
        "synthetic": dict(synthetic),
        "contaminated": {
            "documents": sum(contaminated.values()),
            "bytes": hit_bytes,
            "bySource": dict(contaminated),
        },
        "seconds": round(time.monotonic() - started, 3),
    }
    found = np.array(hits, dtype=np.int64).reshape(-1, 2)
    np.save(unit_path(work_dir, unit, "npy"), found)
    unit_path(work_dir, unit, "json").write_text(json.dumps(result))
    unit_path(work_dir, unit, "done").write_text(plan["run"])  # last: the unit is complete
    log.info("tokenize unit %d: %d documents (%.1fs)", unit, len(docs), result["seconds"])


def _add(
    record: dict[str, Any],
    split: int,
    head: int,
    name: str,
    weight: float,
    augmentation: Any,
    batches: list[list[_Item]],
    per_source: dict[str, Counter[str]],
    synthetic: Counter[str],
) -> None:
    """One document's items: its weighted copies, the records a model wrote from it and its
    augmented copies (the training split only)."""
    text, response = record.get("t", ""), record.get("r")
    messages: list[Message] | None = (
        [(role, content) for role, content in record["m"]] if "m" in record else None
    )
    copies = 1
    if split == 0:
        # Weights repeat or subsample a source in the training split (weighted_copies).
        copies = int(weighted_copies(weight, np.array([head], dtype=np.uint64))[0])
        per_source[name]["trainDocuments"] += copies
    for _ in range(copies):
        batches[split].append(_Item(text, response, messages, name))
    if record.get("s") == PSEUDO_LABEL:
        synthetic[PSEUDO_LABEL] += copies
        per_source[name]["syntheticDocuments"] += copies
    if split == 0:  # what a model wrote from a training document
        for made in record.get("g", ()):
            batches[split].append(_Item(made["t"], made.get("r"), None, name))
            synthetic[made["k"]] += 1
            per_source[name]["syntheticDocuments"] += 1
    if split == 0 and augmentation.enabled:
        methods, probability = list(augmentation.methods), augmentation.probability
        for copy in range(augmentation.copies):
            if messages is not None:
                noisy_chat = _augmented_chat(messages, methods, probability, head + copy)
                batches[split].append(_Item("", None, noisy_chat, name))
            else:
                noisy = augment(text, methods, probability, head + copy)
                batches[split].append(_Item(noisy, response, None, name))


def contaminated(work_dir: Path, plan: dict[str, Any]) -> npt.NDArray[np.int64]:
    """(slice, row of its meta.npz) of every contaminated document the units found."""
    found = [
        np.load(unit_path(work_dir, unit, "npy")).reshape(-1, 2) for unit in range(plan["units"])
    ]
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
