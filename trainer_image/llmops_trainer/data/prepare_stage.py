"""Prepare stage: one small pod after the dedup groups, before the tokenize pods.

It joins the dedup groups into removal lists (data.dedup_stage.run_cluster), then reads the
slices one at a time, twice:

1. every document's fate (the slice's drop reason, or the exact or near duplicate the
   removal lists name) and, per piece of input (input, part), how many documents, kept
   documents, free kept documents (those of a source without a split of its own) and kept
   bytes it holds. Sorted by (input, part), these counts give every document its global
   position in (input, position) order without holding the corpus: a piece lives in one
   slice, so a document's global ordinal is its piece's offset plus its rank in the piece.
2. the split of every kept document (a source's own split; else a seeded hash of the
   content, or the position among the free documents with `split.mode: contiguous`, the
   same documents in each split as one process over the whole corpus), written per slice,
   sorted by global ordinal, with the byte offset of its line in the slice's docs.jsonl and
   the global byte offset of its start among the kept documents (`start`): the tokenize
   units are the ranges of `unitBytes` of that offset, so they do not depend on the number
   of slices. It also indexes the n-grams of the `decontamination.against` splits and of
   the evaluation files, and draws the tokenizer's training sample.

The tokenizer (tokenizer.train or char) is trained on a deterministic sample of the training
split: the documents whose content hash, mixed with a fixed seed, falls below
`sampleBytes / kept bytes` (every training document when the corpus is smaller than the
budget), minus the contaminated ones, in global order. Which documents are drawn depends on
their content only, never on the slices. A byte tokenizer, a referenced Dataset's
(tokenizer.datasetRef) or a model's (tokenizer.fromModel) is loaded, not trained.

Files, under <work>/prepare: `docs-<slice>.npy` (the kept documents of a slice, in global
order), `decisions-<slice>.npz` (every document's input, position in its input and reason;
`decisions` joins them for audits), `ngrams.npy` (the decontamination index),
`tokenizer.json`, `plan.json` (units, vocabulary, dtype, fingerprint, the drop counts and
the decontamination counters), and `prepare.done`, written last (the config, the slices'
plan, the counts and the settings: a rerun with the same ones skips the stage).

Memory: one slice's metadata at a time, the per-piece counts, the decontamination index (it
grows with the evaluation text, not the training split) and the tokenizer sample (bounded by
its byte budget); the dedup clusters grow with the duplicates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llmops.api.dataset import Dataset, DatasetSpec, dedup_groups
from llmops_trainer.data import decontaminate
from llmops_trainer.data import tokenize as tok
from llmops_trainer.data.chat import contents
from llmops_trainer.data.corpus import inputs as input_entries
from llmops_trainer.data.dedup_stage import _identity, _slice_meta, removal_list, run_cluster
from llmops_trainer.data.registry import KEPT, Options
from llmops_trainer.data.slice_stage import config_key, slice_dir
from llmops_trainer.data.steps import EXACT, NEAR
from llmops_trainer.shards import SPLITS, TokenDtype, dtype_for_vocab, sha256_file

log = logging.getLogger("llmops.data")
PREPARE_DIR = "prepare"
PLAN = "plan.json"
PREPARED = "prepare.done"
TOKENIZER = "tokenizer.json"
TOKENIZER_SAMPLE_BYTES = 256 << 20  # the tokenizer's training sample, at most about this
BYTES_PER_TOKEN = 4  # a tokenize unit holds about a shard's worth of text
_SAMPLE_SEED = np.uint64(0x5851F42D4C957F2D)
DOC = np.dtype(
    [
        ("ordinal", "<i8"),  # among the kept documents, in global order
        ("start", "<i8"),  # global byte offset of the document among the kept documents
        ("offset", "<i8"),  # byte offset of its line in the slice's docs.jsonl
        ("row", "<i8"),  # its row of the slice's meta.npz
        ("bytes", "<i8"),
        ("head", "<u8"),  # the first 8 bytes of its content hash
        ("source", "<i4"),
        ("split", "i1"),
    ]
)
I64 = npt.NDArray[np.int64]


def prepare_dir(work_dir: Path) -> Path:
    return work_dir / PREPARE_DIR


def docs_file(work_dir: Path, number: int) -> Path:
    return prepare_dir(work_dir) / f"docs-{number:05d}.npy"


def unit_bytes(spec: DatasetSpec, options: Options | None = None) -> int:
    """Bytes of kept text per tokenize unit (Options.unit_bytes in tests)."""
    if options is not None and options.unit_bytes is not None:
        return options.unit_bytes
    return spec.sharding.tokens_per_shard * BYTES_PER_TOKEN


def sample_bytes(options: Options | None = None) -> int:
    if options is not None and options.tokenizer_sample_bytes is not None:
        return options.tokenizer_sample_bytes
    return TOKENIZER_SAMPLE_BYTES


def read_plan(work_dir: Path) -> dict[str, Any]:
    marker = prepare_dir(work_dir) / PREPARED
    if not marker.is_file():
        raise RuntimeError(f"the prepare stage has not finished (no {marker})")
    plan: dict[str, Any] = json.loads((prepare_dir(work_dir) / PLAN).read_text())
    return plan


def fingerprint(key: str, inputs: list[dict[str, Any]], tokenizer: str = "") -> str:
    """sha256 of the config key, then of each input's block digest in input order (the
    sha256 of the sha256 digests of its 1 MiB blocks, data.collect: the same however the
    inputs were cut into pieces and slices). `tokenizer`: the sha256 of a model's tokenizer
    files (tokenizer.fromModel), an input too: `hf://org/name` without a revision may change
    under the same spec."""
    digest = hashlib.sha256(key.encode())
    for item in inputs:
        digest.update(item["digest"].encode())
    if tokenizer:
        digest.update(tokenizer.encode())
    return digest.hexdigest()


def mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64 finalizer: spreads a hash evenly over [0, 2**64)."""
    x = np.array(x, dtype=np.uint64)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def text_of(record: dict[str, Any]) -> str:
    """A stored document's text: prompt and response, or a chat's contents."""
    if "m" in record:
        return contents(record["m"])
    return record["t"] if "r" not in record else f"{record['t']}\n{record['r']}"


def contiguous_sizes(count: int, spec: DatasetSpec) -> list[int]:
    """Documents per split in stream order: the first `count * train` (rounded) train, the
    next `count * validation` validate, the rest test; a split with a share above zero gets
    at least one document when the training split has more than one to give."""
    split = spec.split
    train = int(count * split.train + 0.5)
    sizes = [train, int(count * (split.train + split.validation) + 0.5) - train, 0]
    sizes[2] = count - sizes[0] - sizes[1]
    for target, share in ((1, split.validation), (2, split.test)):
        if share > 0 and sizes[target] == 0 and sizes[0] > 1:
            sizes[0] -= 1
            sizes[target] = 1
    return sizes


def _contiguous_split(count: int, spec: DatasetSpec) -> npt.NDArray[np.int8]:
    """0/1/2 per free document of `count`, in stream order (contiguous_sizes)."""
    return np.repeat(np.arange(3, dtype=np.int8), contiguous_sizes(count, spec))


def _hash_units(spec: DatasetSpec, heads: npt.NDArray[np.uint64]) -> npt.NDArray[np.float64]:
    seed = np.uint64(spec.split.seed * 0x9E3779B97F4A7C15 % 2**64)
    return mix(heads ^ seed).astype(np.float64) / 2.0**64


def _hash_split(spec: DatasetSpec, unit: npt.NDArray[np.float64]) -> npt.NDArray[np.int8]:
    split = spec.split
    out = np.zeros(len(unit), dtype=np.int8)
    out[unit >= split.train] = 1
    out[unit >= split.train + split.validation] = 2
    return out


class _Slice:
    """One slice's documents after the dedup removal lists, sorted in global order."""

    def __init__(self, dataset: Dataset, work_dir: Path, number: int) -> None:
        spec = dataset.spec
        meta, reasons = _slice_meta(work_dir, number)
        stats = json.loads((slice_dir(work_dir, number) / "stats.json").read_text())
        names = list(reasons)
        for name in (EXACT, NEAR):
            if name not in names:
                names.append(name)
        codes = np.asarray(meta["reasons"], dtype=np.int64)
        removed = np.load(removal_list(work_dir, number))
        if spec.processing.deduplication.exact:  # off means off: copies across slices stay
            codes[removed["exact"]] = names.index(EXACT)
        if spec.processing.deduplication.near.enabled:
            codes[removed["near"]] = names.index(NEAR)
        order = np.lexsort((meta["positions"], meta["parts"], meta["inputs"]))
        self.number = number
        self.pieces = stats["inputs"]
        self.stats = stats
        self.names = names
        self.meta_row = order.astype(np.int64)
        self.inp = np.asarray(meta["inputs"], dtype=np.int64)[order]
        self.part = np.asarray(meta["parts"], dtype=np.int64)[order]
        self.codes = codes[order]
        self.rows = np.asarray(meta["rows"], dtype=np.int64)[order]
        self.out_bytes = np.asarray(meta["out_bytes"], dtype=np.int64)[order]
        self.raw_bytes = int(np.asarray(meta["raw_bytes"], dtype=np.int64).sum())
        hashes = np.ascontiguousarray(meta["hashes"]).view("<u8").reshape(-1, 2)
        self.heads = hashes[order, 0] if len(order) else np.zeros(0, np.uint64)
        self.kept = self.codes == names.index(KEPT)
        by_input = {int(p["index"]): int(p["source"]) for p in stats["inputs"]}
        self.source = np.array([by_input[i] for i in self.inp.tolist()], dtype=np.int64)
        fixed = np.array(
            [-1 if s.split is None else SPLITS.index(s.split) for s in spec.sources] or [-1]
        )
        self.fixed = fixed[self.source] if len(self.source) else np.zeros(0, np.int64)
        self.free = self.kept & (self.fixed < 0)
        # Pieces (input, part) of this slice, in order, and each document's piece.
        change = np.ones(len(self.inp), dtype=bool)
        change[1:] = (self.inp[1:] != self.inp[:-1]) | (self.part[1:] != self.part[:-1])
        self.group_start = np.flatnonzero(change)
        self.group_of = np.cumsum(change) - 1

    def piece_keys(self) -> list[tuple[int, int]]:
        inputs = self.inp[self.group_start].tolist()
        return list(zip(inputs, self.part[self.group_start].tolist(), strict=True))

    def per_piece(self, values: npt.NDArray[Any]) -> I64:
        return np.bincount(self.group_of, weights=values, minlength=len(self.group_start)).astype(
            np.int64
        )

    def rank(self, values: npt.NDArray[Any]) -> I64:
        """Each document's exclusive running sum of `values` inside its piece."""
        counts = np.asarray(values, dtype=np.int64)
        running: I64 = np.cumsum(counts) - counts
        out: I64 = running - running[self.group_start][self.group_of]
        return out


def run_prepare(
    dataset: Dataset,
    output_dir: Path,
    work_dir: Path,
    count: int,
    options: Options | None = None,
    groups: int | None = None,
) -> dict[str, Any]:
    """After the slices and the dedup groups (`groups`: their number, by default the Job's):
    see the module doc. Returns the plan."""
    spec = dataset.spec
    groups = groups or dedup_groups(spec)
    identity = {
        **_identity(dataset, work_dir, count, groups),
        "unitBytes": unit_bytes(spec, options),
        "sampleBytes": sample_bytes(options),
    }
    folder = prepare_dir(work_dir)
    marker = folder / PREPARED
    if marker.is_file() and json.loads(marker.read_text()) == identity:
        log.info("prepare already done, skipping")
        return read_plan(work_dir)
    started = time.monotonic()
    run_cluster(dataset, work_dir, count, groups)
    # What the tokenize units and the finalize step wrote from another plan is stale.
    from llmops_trainer.data.tokenize_stage import tokenize_dir

    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(tokenize_dir(work_dir), ignore_errors=True)
    (output_dir / "manifest.json").unlink(missing_ok=True)
    for name in SPLITS:
        shutil.rmtree(output_dir / name, ignore_errors=True)
    folder.mkdir(parents=True)

    # Pass 1: per piece, counts; the drops; the candidates of the hash split's fallback.
    pieces: dict[tuple[int, int], npt.NDArray[np.int64]] = {}
    dropped: dict[str, list[int]] = {}
    all_pieces: list[dict[str, Any]] = []
    documents = raw_bytes = 0
    split_counts = np.zeros(3, dtype=np.int64)
    candidates: list[tuple[float, int, int, int]] = []  # (-unit, input, part, position)
    names = {KEPT}
    for number in range(count):
        part = _Slice(dataset, work_dir, number)
        names.update(part.names)
        all_pieces += part.pieces
        documents += len(part.codes)
        raw_bytes += part.raw_bytes
        counts = np.stack(
            [
                part.per_piece(np.ones(len(part.codes))),
                part.per_piece(part.kept),
                part.per_piece(part.free),
                part.per_piece(np.where(part.kept, part.out_bytes, 0)),
            ],
            axis=1,
        )
        for key, row in zip(part.piece_keys(), counts, strict=True):
            pieces[key] = row
        for code, name in enumerate(part.names):
            mask = part.codes == code
            if code != part.names.index(KEPT) and mask.any():
                entry = dropped.setdefault(name, [0, 0])
                entry[0] += int(mask.sum())
                entry[1] += int(part.out_bytes[mask].sum())
        if spec.split.mode != "contiguous":
            free = np.flatnonzero(part.free)
            unit = _hash_units(spec, part.heads[free])
            assigned = _hash_split(spec, unit)
            split_counts += np.bincount(assigned, minlength=3)
            train = free[assigned == 0]
            positions = _meta_positions(work_dir, number, part.meta_row)
            best = np.argsort(-unit[assigned == 0], kind="stable")[:2]
            for at in best.tolist():
                doc = int(train[at])
                candidates.append(
                    (
                        -float(unit[assigned == 0][at]),
                        int(part.inp[doc]),
                        int(part.part[doc]),
                        int(positions[doc]),
                    )
                )
    keys = sorted(pieces)
    table = np.array([pieces[k] for k in keys], dtype=np.int64).reshape(-1, 4)
    offsets = np.cumsum(table, axis=0) - table  # kept ordinal, free ordinal, kept bytes
    # The position of a piece's first document in its input: the documents of its earlier
    # pieces.
    input_offset = np.zeros(len(keys), dtype=np.int64)
    for at in range(1, len(keys)):
        if keys[at][0] == keys[at - 1][0]:
            input_offset[at] = input_offset[at - 1] + table[at - 1, 0]
    piece_index = {k: i for i, k in enumerate(keys)}
    kept_total, free_total, kept_bytes = (
        (int(v) for v in table[:, 1:].sum(axis=0)) if len(keys) else (0, 0, 0)
    )

    # The hash split's fallback, as over the whole corpus: a split with a share above zero
    # and no document takes the training document of the highest hash (the first in global
    # order on a tie), while the training split has more than one.
    moved: dict[tuple[int, int, int], int] = {}
    if spec.split.mode != "contiguous":
        ranked = sorted(candidates)
        train_count = int(split_counts[0])
        for target, share in ((1, spec.split.validation), (2, spec.split.test)):
            if share > 0 and split_counts[target] == 0 and train_count > 1 and ranked:
                _, inp, part_, position = ranked.pop(0)
                moved[(inp, part_, position)] = target
                train_count -= 1
    sizes = np.cumsum(contiguous_sizes(free_total, spec))

    # Pass 2: splits, the per-slice files, the decontamination index, the tokenizer sample.
    config = spec.processing.decontamination
    index = decontaminate.NgramIndex(config.ngram) if config is not None else None
    against = [SPLITS.index(n) for n in config.against] if config is not None else []
    # Only a trained (or character) tokenizer reads a sample: a loaded one needs no text.
    trains = spec.tokenizer.from_model is None and (
        spec.tokenizer.train is not None or spec.tokenizer.char is not None
    )
    rate = 0.0 if not trains else sample_bytes(options) / kept_bytes if kept_bytes else 1.0
    sample: list[tuple[int, str]] = []
    reasons = [KEPT, *sorted(names - {KEPT})]
    if config is not None and decontaminate.CONTAMINATED not in reasons:
        reasons.append(decontaminate.CONTAMINATED)
    slice_units: list[list[int]] = []
    unit_size = identity["unitBytes"]
    for number in range(count):
        part = _Slice(dataset, work_dir, number)
        piece = np.array([piece_index[k] for k in part.piece_keys()], dtype=np.int64)
        of = piece[part.group_of] if len(piece) else np.zeros(0, np.int64)
        positions = input_offset[of] + part.rank(np.ones(len(part.codes), dtype=np.int64))
        global_codes = np.array([reasons.index(n) for n in part.names], dtype=np.int64)
        np.savez(
            prepare_dir(work_dir) / f"decisions-{number:05d}.npz",
            inputs=part.inp,
            positions=positions,
            codes=global_codes[part.codes] if len(part.codes) else part.codes,
            rows=part.meta_row,
        )
        ordinal = offsets[of, 1] + part.rank(part.kept) if len(of) else of
        free_ordinal = offsets[of, 2] + part.rank(part.free) if len(of) else of
        start = (
            offsets[of, 3] + part.rank(np.where(part.kept, part.out_bytes, 0)) if len(of) else of
        )
        split = part.fixed.astype(np.int8)
        free = part.free
        if spec.split.mode == "contiguous":
            split[free] = np.searchsorted(sizes, free_ordinal[free], side="right").astype(np.int8)
        else:
            split[free] = _hash_split(spec, _hash_units(spec, part.heads[free]))
            at_part = _meta_positions(work_dir, number, part.meta_row) if moved else positions
            for (inp, part_, position), target in moved.items():
                hit = (part.inp == inp) & (part.part == part_) & (at_part == position)
                split[hit & free] = target
        kept = np.flatnonzero(part.kept)
        docs = np.zeros(len(kept), dtype=DOC)
        line_offsets = _line_offsets(slice_dir(work_dir, number) / "docs.jsonl")
        docs["ordinal"] = ordinal[kept]
        docs["start"] = start[kept]
        docs["offset"] = line_offsets[part.rows[kept]] if len(kept) else 0
        docs["row"] = part.meta_row[kept]
        docs["bytes"] = part.out_bytes[kept]
        docs["head"] = part.heads[kept]
        docs["source"] = part.source[kept]
        docs["split"] = split[kept]
        np.save(docs_file(work_dir, number), docs)
        units = docs["start"] // unit_size
        slice_units.append([int(units.min()), int(units.max())] if len(units) else [0, -1])
        # Texts to read: the evaluation splits' (indexed) and the sampled training ones.
        wanted = np.zeros(len(kept), dtype=bool)
        if index is not None:
            wanted |= np.isin(docs["split"], against)
        drawn = (docs["split"] == 0) & (
            mix(docs["head"] ^ _SAMPLE_SEED).astype(np.float64) / 2.0**64 < rate
        )
        wanted |= drawn
        for at, record in _records(slice_dir(work_dir, number) / "docs.jsonl", docs, wanted):
            text = text_of(record)
            if index is not None and docs["split"][at] in against:
                index.add(text)
            if drawn[at]:
                sample.append((int(docs["ordinal"][at]), text))

    contamination = None
    if index is not None and config is not None:
        split_texts = index.texts
        for text in decontaminate.file_texts(config.files):
            index.add(text)
        contamination = {
            "ngram": config.ngram,
            "splitTexts": split_texts,
            "fileTexts": index.texts - split_texts,
            "ngrams": len(index),
        }
        np.save(folder / "ngrams.npy", index.hashes())
    sample.sort()
    texts = [text for _, text in sample]
    if index is not None and len(index) and texts:
        texts = [t for t, hit in zip(texts, index.matches(texts), strict=True) if not hit]
    model = tok.model_tokenizer(spec) if spec.tokenizer.from_model is not None else None
    extra = _model_digest(model) if model else ""
    if config is not None and config.files:
        extra += decontaminate.files_digest(config.files)
    if model is not None:
        vocab, eos = model.vocab_size, model.eos_id
    else:
        tokenizer, special = _tokenizer(spec, texts)
        tokenizer.save(str(folder / TOKENIZER))
        vocab = tok.vocab_size(tokenizer)
        eos = tok.eos_id(tokenizer, special)
    dtype: TokenDtype = (
        dtype_for_vocab(vocab) if spec.sharding.token_dtype == "auto" else spec.sharding.token_dtype
    )
    if dtype == "uint16" and vocab > 2**16:
        raise ValueError(
            f"spec.sharding.tokenDtype: a vocabulary of {vocab} does not fit uint16 tokens "
            "(ids up to 65535); use uint32 or auto"
        )
    units = max((hi for _, hi in slice_units), default=-1) + 1
    plan = {
        "run": hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(),
        "fingerprint": fingerprint(config_key(spec), input_entries(all_pieces), extra),
        "units": units,
        "unitBytes": unit_size,
        "slices": slice_units,
        "vocabSize": vocab,
        "eosTokenId": eos,
        "dtype": dtype,
        "documents": documents,
        "keptDocuments": kept_total,
        "rawBytes": raw_bytes,
        "dropped": [[name, n, size] for name, (n, size) in sorted(dropped.items())],
        "decontamination": contamination,
        "tokenizerSample": {"documents": len(texts), "bytes": sum(len(t.encode()) for t in texts)},
        "inputs": input_entries(all_pieces),
        "reasons": reasons,
        "seconds": round(time.monotonic() - started, 3),
    }
    (folder / PLAN).write_text(json.dumps(plan))
    marker.write_text(json.dumps(identity))  # last: the stage is complete
    log.info(
        "prepare: %d of %d documents kept, %d tokenize units, tokenizer sample of %d documents",
        kept_total,
        documents,
        units,
        len(texts),
    )
    return plan


def _meta_positions(work_dir: Path, number: int, meta_row: I64) -> I64:
    meta = np.load(slice_dir(work_dir, number) / "meta.npz")
    return np.asarray(meta["positions"], dtype=np.int64)[meta_row]


def _line_offsets(path: Path) -> I64:
    """The byte offset of every line of a file."""
    sizes = []
    with path.open("rb") as handle:
        for line in handle:
            sizes.append(len(line))
    lengths = np.asarray(sizes, dtype=np.int64)
    return np.cumsum(lengths) - lengths


def _records(
    path: Path, docs: npt.NDArray[Any], wanted: npt.NDArray[np.bool_]
) -> Iterable[tuple[int, dict[str, Any]]]:
    """(index into docs, stored record) of the wanted documents."""
    with path.open("rb") as handle:
        for at in np.flatnonzero(wanted).tolist():
            handle.seek(int(docs["offset"][at]))
            yield at, json.loads(handle.readline())


def _tokenizer(spec: DatasetSpec, texts: list[str]) -> tuple[Any, list[str] | None]:
    config = spec.tokenizer
    if config.train is not None:
        return tok.train(iter(texts), config.train), list(config.train.special_tokens)
    if config.byte is not None:
        return tok.byte_level(config.byte), list(config.byte.special_tokens)
    if config.char is not None:
        return tok.characters(texts, config.char), list(config.char.special_tokens)
    path = config.path if config.path is not None else str(tok.ref_tokenizer_path())
    return tok.load(path), None


def _model_digest(model: tok.ModelTokenizer) -> str:
    digest = hashlib.sha256()
    for relative in tok.model_files(model.folder):
        digest.update(f"{relative.as_posix()}\x00".encode())
        digest.update(bytes.fromhex(sha256_file(model.folder / relative)))
    return digest.hexdigest()


def decisions(work_dir: Path, count: int) -> dict[str, npt.NDArray[Any]]:
    """Every document's fate in global (input, position) order, for audits and for
    comparing engines (benchmarks/): inputs, positions, codes and the reasons they index
    (the contaminated training documents the tokenize units found included)."""
    plan = read_plan(work_dir)
    from llmops_trainer.data.tokenize_stage import contaminated

    reasons = list(plan["reasons"])
    parts: dict[str, list[Any]] = {"inputs": [], "positions": [], "codes": []}
    hits = contaminated(work_dir, plan)
    for number in range(count):
        found = np.load(prepare_dir(work_dir) / f"decisions-{number:05d}.npz")
        codes = found["codes"].copy()
        mine = hits[hits[:, 0] == number, 1] if len(hits) else np.zeros(0, np.int64)
        if len(mine):
            codes[np.isin(found["rows"], mine)] = reasons.index(decontaminate.CONTAMINATED)
        parts["inputs"].append(found["inputs"])
        parts["positions"].append(found["positions"])
        parts["codes"].append(codes)
    joined = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in parts.items()}
    order = np.lexsort((joined["positions"], joined["inputs"]))
    out = {k: v[order] for k, v in joined.items()}
    out["reasons"] = np.array(reasons)
    return out


def source_counts(spec: DatasetSpec) -> dict[str, Counter[str]]:
    return {s.name: Counter(documents=0, trainDocuments=0, tokens=0) for s in spec.sources}
