"""Slice stage: one pod of an Indexed Job per slice.

It streams its pieces of the inputs (data.pieces: every slice computes the same plan of
pieces and owners from the listing), normalizes every document, runs the registered steps
(data.steps: exact dedup within the slice, quality filters, language, PII, ...), asks
language models for pseudo-labels and synthetic records (data.synthetic; in batches, through
a cache on the output volume) and computes MinHash signatures of the survivors. It writes,
under the work folder:

    slice-00003/docs.jsonl        surviving documents, in input order (a pseudo-labelled
                                  one marked `"s"` with its score `"lp"`; records a model
                                  wrote from one in `"g"`)
    slice-00003/signatures.bin    uint32 MinHash rows, one per surviving document
    slice-00003/meta.npz          one row per document read: input, part, position in the
                                  part, content hash, drop reason, sizes, row in docs.jsonl
    slice-00003/stats.json        pieces read (input, start, end, bytes, digest blocks), the
                                  plan's digest and counters
    slice-00003/DONE              written last; holds the config key and the plan's digest (a
                                  rerun with both unchanged skips the slice)
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from llmops.api.dataset import Dataset, DatasetSpec
from llmops_trainer.data import dedup
from llmops_trainer.data.chat import contents
from llmops_trainer.data.collect import Document as RawDocument
from llmops_trainer.data.collect import list_inputs
from llmops_trainer.data.normalize import Normalizer
from llmops_trainer.data.pieces import make_plan, piece_size, read_piece
from llmops_trainer.data.registry import KEPT, Document, Options
from llmops_trainer.data.steps import PIPELINE
from llmops_trainer.data.synthetic import BATCH, PSEUDO_LABEL, LlmStage, Pending
from llmops_trainer.data.tokenize import model_tokenizer

log = logging.getLogger("llmops.data")
ENGINE_VERSION = 3  # 2: Gopher words as spaCy splits them; 3: tokenize units, shard names
DONE = "DONE"
MINHASH_BATCH = 1024
AUGMENT_COUNTERS = "llmAugment"  # the slice's counters of data.synthetic's augmentation


def config_key(spec: DatasetSpec) -> str:
    """Hash of everything that shapes the output; parallelism, resources and the output
    location do not, so changing them reuses finished work."""
    relevant = spec.to_dict()
    for name in ("parallelism", "sliceBytes", "resources", "output", "scheduling", "retainPolicy"):
        relevant.pop(name, None)
    payload = json.dumps({"engine": ENGINE_VERSION, "spec": relevant}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def slice_dir(work_dir: Path, index: int) -> Path:
    return work_dir / f"slice-{index:05d}"


@dataclass
class _SliceState:
    inputs: array[int] = field(default_factory=lambda: array("i"))
    parts: array[int] = field(default_factory=lambda: array("q"))
    positions: array[int] = field(default_factory=lambda: array("q"))
    hashes: bytearray = field(default_factory=bytearray)
    reasons: array[int] = field(default_factory=lambda: array("H"))
    raw_bytes: array[int] = field(default_factory=lambda: array("q"))
    out_bytes: array[int] = field(default_factory=lambda: array("q"))
    rows: array[int] = field(default_factory=lambda: array("q"))
    has_signature: array[int] = field(default_factory=lambda: array("B"))
    reason_names: dict[str, int] = field(default_factory=lambda: {KEPT: 0})
    kept: int = 0

    def reason(self, name: str) -> int:
        return self.reason_names.setdefault(name, len(self.reason_names))


class _Signatures:
    """MinHash rows of the kept documents, computed in batches and appended to a file; a
    document without shingles gets a zero row and no signature flag."""

    def __init__(self, hasher: dedup.MinHasher | None, out: IO[bytes], flags: array[int]):
        self.hasher, self.out, self.flags = hasher, out, flags
        self.pending: list[str] = []

    def add(self, text: str) -> None:
        self.pending.append(text)
        if len(self.pending) >= MINHASH_BATCH:
            self.flush()

    def flush(self) -> None:
        hasher, pending = self.hasher, self.pending
        if hasher is None or not pending:
            pending.clear()
            return
        shingles = [hasher.shingles(text) for text in pending]
        present = [s for s in shingles if len(s)]
        rows = hasher.signatures(present) if present else None
        full = np.zeros((len(shingles), hasher.num_permutations), dtype=np.uint32)
        mask = np.fromiter((len(s) > 0 for s in shingles), bool, len(shingles))
        if rows is not None:
            full[mask] = rows
        self.flags.extend(mask.astype(np.uint8).tolist())
        self.out.write(full.astype("<u4").tobytes())
        pending.clear()


def run_slice(
    dataset: Dataset, work_dir: Path, index: int, count: int, options: Options | None = None
) -> Path:
    """Process slice `index` of `count`; returns its folder. Skips a finished slice."""
    options = options or Options()
    spec = dataset.spec
    key = config_key(spec)
    folder = slice_dir(work_dir, index)
    marker = folder / DONE
    inputs = list_inputs(spec)
    plan = make_plan(spec, inputs, count, piece_size(spec, options.slice_bytes))
    done = json.loads(marker.read_text()) if marker.is_file() else {}
    if done.get("config") == key and done.get("plan") == plan.digest:
        log.info("slice %d/%d already done, skipping", index, count)
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    started = time.monotonic()
    if spec.tokenizer.from_model is not None:
        model_tokenizer(spec)  # fail now, not after slicing, when the model does not fit

    normalize = Normalizer(spec.processing.normalization)
    checks = (options.steps or PIPELINE).build(spec, options)
    near = spec.processing.deduplication.near
    hasher = dedup.MinHasher(near.num_permutations, near.shingle_size) if near.enabled else None
    state = _SliceState()
    input_stats = []
    augment_counts: Counter[str] = Counter()

    llm = (
        LlmStage(
            spec,
            options.llm_cache or work_dir / "llm-cache",
            checks.counter("pseudo-label"),
            augment_counts,
        )
        if LlmStage.wanted(spec)
        else None
    )
    pending: list[Pending] = []

    with (
        (folder / "docs.jsonl").open("w", encoding="utf-8") as docs_out,
        (folder / "signatures.bin").open("wb") as signatures_out,
    ):
        signatures = _Signatures(hasher, signatures_out, state.has_signature)

        def keep(item: Pending) -> None:
            """Write a kept document (or, after its answers, drop it)."""
            if item.reason is not None:
                state.reasons[item.row] = state.reason(item.reason)
                return
            document = item.document
            record: dict[str, Any]
            if document.messages is not None:
                record = {"m": document.messages, "l": document.language}
            else:
                record = {"t": document.text, "l": document.language}
            if document.response is not None:
                record["r"] = document.response
            if item.score is not None:
                record.update(s=PSEUDO_LABEL, lp=item.score)
            if item.generated:
                record["g"] = item.generated
            docs_out.write(json.dumps(record, ensure_ascii=False) + "\n")
            state.rows[item.row] = state.kept
            state.kept += 1
            signatures.add(document.combined)

        def flush() -> None:
            if llm is not None and pending:
                llm.run(pending)
            for item in pending:
                keep(item)
            pending.clear()

        for piece in plan.of(index):
            input_index = piece.input
            ref = inputs[input_index]
            supervised = spec.sources[ref.source].supervised
            with read_piece(spec, ref, piece) as (documents, finish):
                part, position = -1, 0
                for at, read in documents:
                    position = position + 1 if at == part else 0
                    part = at
                    document = _normalized(read, normalize, supervised, options.detect_language)
                    state.inputs.append(input_index)
                    state.parts.append(part)
                    state.positions.append(position)
                    state.hashes += document.digest
                    state.raw_bytes.append(_raw_size(read))
                    state.out_bytes.append(_size(document.normalized))
                    reason = checks(document)
                    if reason is not None:
                        state.reasons.append(state.reason(reason))
                        state.rows.append(-1)
                        continue
                    state.reasons.append(0)
                    state.rows.append(-1)  # set when written
                    pending.append(Pending(len(state.rows) - 1, document, ref.source))
                    if llm is None or len(pending) >= BATCH:
                        flush()
                blocks, read_bytes = finish()  # hashes the rest of the piece's blocks
            input_stats.append(
                {
                    "index": input_index,
                    "source": ref.source,
                    "location": ref.location.split("#", 1)[0],
                    "start": piece.start,
                    "end": piece.start + read_bytes,
                    "bytes": read_bytes,
                    "size": read_bytes if piece.whole else piece.size,
                    "blocks": [block.hex() for block in blocks],
                }
            )
        flush()
        signatures.flush()

    _write_meta(folder, state)
    stats = {
        "index": index,
        "count": count,
        "plan": plan.digest,
        "inputs": input_stats,
        "reasons": sorted(state.reason_names, key=state.reason_names.__getitem__),
        "kept": state.kept,
        **checks.counters(),
        **({AUGMENT_COUNTERS: dict(augment_counts)} if augment_counts else {}),
        "seconds": round(time.monotonic() - started, 3),
    }
    (folder / "stats.json").write_text(json.dumps(stats, indent=2))
    done = {"config": key, "plan": plan.digest, "documents": len(state.reasons)}
    marker.write_text(json.dumps(done))
    log.info("slice %d/%d: %d documents, %d kept", index, count, len(state.reasons), state.kept)
    return folder


def _size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _raw_size(read: RawDocument) -> int:
    if read.messages is not None:
        return sum(_size(content) for _, content in read.messages)
    return _size(read.text) + _size(read.response or "")


def _normalized(
    read: RawDocument, normalize: Normalizer, supervised: bool, detect: bool
) -> Document:
    if read.messages is not None:
        messages = [(role, normalize(content)) for role, content in read.messages]
        text = contents(messages)
        return Document(
            text=text,
            response=None,
            supervised=True,
            digest=dedup.chat_hash(messages),
            normalized=text,
            detect_language=detect,
            messages=messages,
        )
    text = normalize(read.text)
    response = None if read.response is None else normalize(read.response)
    return Document(
        text=text,
        response=response,
        supervised=supervised,
        digest=dedup.content_hash(text, response),
        normalized=text if response is None else f"{text}\n{response}",
        detect_language=detect,
        unreadable=read.unreadable,
    )


def _write_meta(folder: Path, state: _SliceState) -> None:
    np.savez(
        folder / "meta.npz",
        inputs=np.frombuffer(state.inputs, dtype=np.int32),
        parts=np.frombuffer(state.parts, dtype=np.int64),
        positions=np.frombuffer(state.positions, dtype=np.int64),
        hashes=np.frombuffer(bytes(state.hashes), dtype=np.uint8).reshape(-1, 16),
        reasons=np.frombuffer(state.reasons, dtype=np.uint16),
        raw_bytes=np.frombuffer(state.raw_bytes, dtype=np.int64),
        out_bytes=np.frombuffer(state.out_bytes, dtype=np.int64),
        rows=np.frombuffer(state.rows, dtype=np.int64),
        has_signature=np.frombuffer(state.has_signature, dtype=np.uint8).astype(bool),
    )
