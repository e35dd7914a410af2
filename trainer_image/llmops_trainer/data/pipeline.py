"""The two stages of a preprocessing Job and `run_local`, which runs both in-process.

`slice` (one pod of an Indexed Job per slice) streams its share of the inputs through
normalize -> exact dedup (within the slice) -> quality filters -> language -> PII and
computes MinHash signatures of the survivors. It writes, under the work folder:

    slice-00003/docs.jsonl        surviving documents, in input order
    slice-00003/signatures.bin    uint32 MinHash rows, one per surviving document
    slice-00003/meta.npz          one row per document read: input, position, content hash,
                                  drop reason, sizes, row in docs.jsonl
    slice-00003/stats.json        inputs (with sha256) and counters
    slice-00003/DONE              written last; holds the config key (a rerun skips the slice)

`merge` (one pod) orders every document by (input, position), so the result does not depend
on the number of slices, finds exact duplicates across slices and near-duplicates with LSH
over all signatures, trains or loads the tokenizer, splits by document (seeded hash),
tokenizes in parallel and writes shards, tokenizer, manifest and dataset card.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llmops.api.dataset import Dataset, DatasetSpec
from llmops_trainer.data import dedup, filters, language, report
from llmops_trainer.data import tokenize as tok
from llmops_trainer.data.augment import augment
from llmops_trainer.data.collect import (
    list_inputs,
    open_input,
    read_documents,
    slice_inputs,
)
from llmops_trainer.data.normalize import Normalizer
from llmops_trainer.data.pii import PiiScrubber
from llmops_trainer.shards import (
    MANIFEST,
    SPLITS,
    Manifest,
    ShardWriter,
    SplitInfo,
    TokenDtype,
    dtype_for_vocab,
    read_manifest,
    write_manifest,
)

log = logging.getLogger("llmops.data")
ENGINE_VERSION = 1
DONE = "DONE"
CARD = "README.md"
TOKENIZER = "tokenizer.json"
MINHASH_BATCH = 1024
TOKENIZE_BATCH = 1024
KEPT = "kept"
EMPTY = "empty"
EXACT = "exact-duplicate"
NEAR = "near-duplicate"
LANGUAGE = "language"


@dataclass
class Options:
    """Engine settings the Dataset spec does not carry (the benchmark and tests set them)."""

    rules: filters.QualityRules | None = None  # None: from spec.processing.filters
    detect_language: bool = True


def config_key(spec: DatasetSpec) -> str:
    """Hash of everything that shapes the output; parallelism, resources and the output
    location do not, so changing them reuses finished work."""
    relevant = spec.to_dict()
    for name in ("parallelism", "resources", "output", "scheduling", "retainPolicy"):
        relevant.pop(name, None)
    payload = json.dumps({"engine": ENGINE_VERSION, "spec": relevant}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def slice_dir(work_dir: Path, index: int) -> Path:
    return work_dir / f"slice-{index:05d}"


# ----------------------------------------------------------------------------- slice stage


@dataclass
class _SliceState:
    inputs: array[int] = field(default_factory=lambda: array("i"))
    positions: array[int] = field(default_factory=lambda: array("q"))
    hashes: bytearray = field(default_factory=bytearray)
    reasons: array[int] = field(default_factory=lambda: array("H"))
    raw_bytes: array[int] = field(default_factory=lambda: array("q"))
    out_bytes: array[int] = field(default_factory=lambda: array("q"))
    rows: array[int] = field(default_factory=lambda: array("q"))
    reason_names: dict[str, int] = field(default_factory=lambda: {KEPT: 0})
    kept: int = 0

    def reason(self, name: str) -> int:
        return self.reason_names.setdefault(name, len(self.reason_names))


def run_slice(
    dataset: Dataset, work_dir: Path, index: int, count: int, options: Options | None = None
) -> Path:
    """Process slice `index` of `count`; returns its folder. Skips a finished slice."""
    options = options or Options()
    spec = dataset.spec
    key = config_key(spec)
    folder = slice_dir(work_dir, index)
    marker = folder / DONE
    if marker.is_file() and json.loads(marker.read_text()).get("config") == key:
        log.info("slice %d/%d already done, skipping", index, count)
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    started = time.monotonic()

    processing = spec.processing
    normalize = Normalizer(processing.normalization)
    rules = options.rules or filters.QualityRules.from_spec(processing.filters)
    allow = set(processing.languages.allow)
    min_confidence = processing.languages.min_confidence
    scrub = PiiScrubber(processing.pii.kinds) if processing.pii.enabled else None
    near = processing.deduplication.near
    hasher = dedup.MinHasher(near.num_permutations, near.shingle_size) if near.enabled else None
    exact = processing.deduplication.exact

    state = _SliceState()
    seen: set[bytes] = set()
    pending: list[str] = []
    has_signature = array("B")
    c4_lines: Counter[str] = Counter()
    inputs = list_inputs(spec)
    mine = slice_inputs(inputs, index, count)
    input_stats = []

    with (
        (folder / "docs.jsonl").open("w", encoding="utf-8") as docs_out,
        (folder / "signatures.bin").open("wb") as signatures_out,
    ):

        def flush_signatures() -> None:
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
            has_signature.extend(mask.astype(np.uint8).tolist())
            signatures_out.write(full.astype("<u4").tobytes())
            pending.clear()

        for input_index in mine:
            ref = inputs[input_index]
            source = spec.sources[ref.source]
            supervised = source.prompt_field is not None
            with open_input(spec, ref) as (stream, hashing):
                for position, document in enumerate(read_documents(stream, source)):
                    raw = len(document.text.encode("utf-8", "surrogatepass"))
                    if document.response is not None:
                        raw += len(document.response.encode("utf-8", "surrogatepass"))
                    text = normalize(document.text)
                    response = None if document.response is None else normalize(document.response)
                    combined = text if response is None else f"{text}\n{response}"
                    digest = dedup.content_hash(text, response)
                    state.inputs.append(input_index)
                    state.positions.append(position)
                    state.hashes += digest
                    state.raw_bytes.append(raw)
                    state.out_bytes.append(len(combined.encode("utf-8", "surrogatepass")))
                    reason = _judge(
                        text,
                        response,
                        combined,
                        supervised,
                        digest,
                        seen,
                        exact,
                        rules,
                        options.detect_language,
                        allow,
                        min_confidence,
                        c4_lines,
                    )
                    if isinstance(reason, str):
                        state.reasons.append(state.reason(reason))
                        state.rows.append(-1)
                        continue
                    text, lang = reason
                    if scrub is not None:
                        text = scrub(text)
                        response = None if response is None else scrub(response)
                    record: dict[str, Any] = {"t": text, "l": lang}
                    if response is not None:
                        record["r"] = response
                    docs_out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    state.reasons.append(0)
                    state.rows.append(state.kept)
                    state.kept += 1
                    pending.append(text if response is None else f"{text}\n{response}")
                    if len(pending) >= MINHASH_BATCH:
                        flush_signatures()
                while hashing.read(1 << 20):
                    pass  # hash the rest (e.g. trailing bytes) for the fingerprint
            input_stats.append(
                {
                    "index": input_index,
                    "source": ref.source,
                    "location": _display(ref.location),
                    "sha256": hashing.sha256.hexdigest(),
                    "bytes": hashing.size,
                }
            )
        flush_signatures()

    np.savez(
        folder / "meta.npz",
        inputs=np.frombuffer(state.inputs, dtype=np.int32),
        positions=np.frombuffer(state.positions, dtype=np.int64),
        hashes=np.frombuffer(bytes(state.hashes), dtype=np.uint8).reshape(-1, 16),
        reasons=np.frombuffer(state.reasons, dtype=np.uint16),
        raw_bytes=np.frombuffer(state.raw_bytes, dtype=np.int64),
        out_bytes=np.frombuffer(state.out_bytes, dtype=np.int64),
        rows=np.frombuffer(state.rows, dtype=np.int64),
        has_signature=np.frombuffer(has_signature, dtype=np.uint8).astype(bool),
    )
    stats = {
        "index": index,
        "count": count,
        "inputs": input_stats,
        "reasons": sorted(state.reason_names, key=state.reason_names.__getitem__),
        "kept": state.kept,
        "pii": dict(scrub.counts) if scrub else {},
        "c4LinesRemoved": dict(c4_lines),
        "seconds": round(time.monotonic() - started, 3),
    }
    (folder / "stats.json").write_text(json.dumps(stats, indent=2))
    marker.write_text(json.dumps({"config": key, "documents": len(state.reasons)}))
    log.info("slice %d/%d: %d documents, %d kept", index, count, len(state.reasons), state.kept)
    return folder


def _display(location: str) -> str:
    return location.split("#", 1)[0]


def _judge(
    text: str,
    response: str | None,
    combined: str,
    supervised: bool,
    digest: bytes,
    seen: set[bytes],
    exact: bool,
    rules: filters.QualityRules,
    detect: bool,
    allow: set[str],
    min_confidence: float,
    c4_lines: Counter[str],
) -> str | tuple[str, str]:
    """A drop reason, or the (possibly line-filtered) text and its language."""
    if not text or (response is not None and not response):
        return EMPTY
    if exact:
        if digest in seen:
            return EXACT
        seen.add(digest)
    lang, confidence = language.detect(combined) if detect else (language.UNKNOWN, 0.0)
    if rules.quality:
        reason = filters.gopher_quality(combined, rules, english=True)
        if reason == "gopher_enough_stop_words" and lang not in ("en", language.UNKNOWN):
            reason = None  # the stop-word rule is English-only
        if reason:
            return reason
    if rules.repetition and (reason := filters.gopher_repetition(combined, rules)):
        return reason
    if rules.c4_lines and not supervised:
        result = filters.c4_lines(text, rules)
        c4_lines.update(result.detail)
        if result.reason:
            return result.reason
        text = result.text
    if allow and (lang not in allow or confidence < min_confidence):
        return LANGUAGE
    return text, lang


# ----------------------------------------------------------------------------- merge stage


@dataclass
class _Corpus:
    """Every document read by every slice, in global (input, position) order."""

    slices: list[Path]
    slice_of: npt.NDArray[np.int64]
    input_of: npt.NDArray[np.int64]
    position_of: npt.NDArray[np.int64]
    rows: npt.NDArray[np.int64]
    reasons: list[str]
    codes: npt.NDArray[np.int64]
    hashes: npt.NDArray[np.uint8]
    raw_bytes: npt.NDArray[np.int64]
    out_bytes: npt.NDArray[np.int64]
    has_signature: list[npt.NDArray[np.bool_]]
    inputs: list[dict[str, Any]]
    slice_stats: list[dict[str, Any]]


def _load(work_dir: Path, count: int, key: str) -> _Corpus:
    folders = [slice_dir(work_dir, i) for i in range(count)]
    names: dict[str, int] = {KEPT: 0}
    parts: dict[str, list[Any]] = {
        k: [] for k in ("slice", "inp", "pos", "code", "hash", "raw", "out", "rows")
    }
    has_signature, inputs, slice_stats = [], [], []
    for number, folder in enumerate(folders):
        marker = folder / DONE
        if not marker.is_file() or json.loads(marker.read_text()).get("config") != key:
            raise RuntimeError(f"slice {number} of {count} has not finished (no {marker})")
        stats = json.loads((folder / "stats.json").read_text())
        meta = np.load(folder / "meta.npz")
        local = np.array([names.setdefault(n, len(names)) for n in stats["reasons"]])
        parts["slice"].append(np.full(len(meta["reasons"]), number))
        parts["inp"].append(meta["inputs"])
        parts["pos"].append(meta["positions"])
        parts["code"].append(
            local[meta["reasons"]] if len(meta["reasons"]) else np.zeros(0, np.int64)
        )
        parts["hash"].append(meta["hashes"])
        parts["raw"].append(meta["raw_bytes"])
        parts["out"].append(meta["out_bytes"])
        parts["rows"].append(meta["rows"])
        has_signature.append(meta["has_signature"])
        inputs += stats["inputs"]
        slice_stats.append(stats)
    joined = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in parts.items()}
    order = np.lexsort((joined["pos"], joined["inp"]))
    return _Corpus(
        slices=folders,
        slice_of=joined["slice"][order].astype(np.int64),
        input_of=joined["inp"][order].astype(np.int64),
        position_of=joined["pos"][order].astype(np.int64),
        rows=joined["rows"][order],
        reasons=sorted(names, key=names.__getitem__),
        codes=joined["code"][order].astype(np.int64),
        hashes=joined["hash"].reshape(-1, 16)[order].astype(np.uint8),
        raw_bytes=joined["raw"][order],
        out_bytes=joined["out"][order],
        has_signature=has_signature,
        inputs=sorted(inputs, key=lambda x: x["index"]),
        slice_stats=slice_stats,
    )


def fingerprint(key: str, inputs: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256(key.encode())
    for item in inputs:
        digest.update(item["sha256"].encode())
    return digest.hexdigest()


def _code(corpus: _Corpus, name: str) -> int:
    if name not in corpus.reasons:
        corpus.reasons.append(name)
    return corpus.reasons.index(name)


def _cross_slice_exact(corpus: _Corpus) -> None:
    """The first copy (in global order) of every content hash stays; a later copy is an
    exact duplicate even if its slice dropped it for another reason."""
    empty, exact = _code(corpus, EMPTY), _code(corpus, EXACT)
    candidates = np.flatnonzero((corpus.codes != empty) & (corpus.codes != exact))
    if not len(candidates):
        return
    keys = np.ascontiguousarray(corpus.hashes[candidates]).view("V16").ravel()
    _, first = np.unique(keys, return_index=True)
    later = np.ones(len(candidates), dtype=bool)
    later[first] = False
    corpus.codes[candidates[later]] = exact


def _signature_maps(corpus: _Corpus, permutations: int) -> list[npt.NDArray[np.uint32]]:
    maps = []
    for folder, flags in zip(corpus.slices, corpus.has_signature, strict=True):
        path = folder / "signatures.bin"
        if len(flags) and path.stat().st_size:
            maps.append(np.memmap(path, dtype="<u4", mode="r").reshape(len(flags), permutations))
        else:
            maps.append(np.zeros((0, permutations), dtype=np.uint32))
    return maps


def _near(corpus: _Corpus, spec: DatasetSpec) -> None:
    near = spec.processing.deduplication.near
    if not near.enabled:
        return
    kept = np.flatnonzero(corpus.codes == 0)
    slices, rows = corpus.slice_of[kept], corpus.rows[kept]
    flags = np.array(
        [corpus.has_signature[s][r] for s, r in zip(slices.tolist(), rows.tolist(), strict=True)],
        dtype=bool,
    )
    candidates, slices, rows = kept[flags], slices[flags], rows[flags]
    if len(candidates) < 2:
        return
    maps = _signature_maps(corpus, near.num_permutations)

    def gather(positions: npt.NDArray[np.int64]) -> npt.NDArray[np.uint32]:
        out = np.empty((len(positions), near.num_permutations), dtype=np.uint32)
        for number, matrix in enumerate(maps):
            mask = slices[positions] == number
            if mask.any():
                out[mask] = matrix[rows[positions[mask]]]
        return out

    keys = np.empty((len(candidates), near.bands), dtype=np.uint64)
    for start in range(0, len(candidates), 65536):
        block = np.arange(start, min(start + 65536, len(candidates)))
        keys[block] = dedup.band_keys(gather(block), near.bands)

    def similarity(a: npt.NDArray[np.int64], b: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        return dedup.jaccard_estimate(gather(a), gather(b))

    drop = dedup.near_duplicates(keys, near.threshold, similarity)
    corpus.codes[candidates[drop]] = _code(corpus, NEAR)


def _documents(
    corpus: _Corpus, wanted: npt.NDArray[np.bool_]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(global index, stored record) of the wanted documents, in global order."""
    handles = [(folder / "docs.jsonl").open(encoding="utf-8") for folder in corpus.slices]
    cursor = [0] * len(handles)
    try:
        for index in np.flatnonzero(corpus.rows >= 0).tolist():
            number, row = int(corpus.slice_of[index]), int(corpus.rows[index])
            handle = handles[number]
            while cursor[number] <= row:
                line = handle.readline()
                cursor[number] += 1
            if wanted[index]:
                yield index, json.loads(line)
    finally:
        for handle in handles:
            handle.close()


def _splits(
    corpus: _Corpus, spec: DatasetSpec, kept: npt.NDArray[np.int64]
) -> npt.NDArray[np.int8]:
    """0/1/2 (train/validation/test) per kept document from a seeded hash of its content;
    a split with a share above zero gets at least one document when there are enough."""
    split = spec.split
    head = np.ascontiguousarray(corpus.hashes[kept, :8]).view("<u8").ravel()
    unit = _mix(head ^ np.uint64(split.seed * 0x9E3779B97F4A7C15 % 2**64)).astype(np.float64)
    unit /= 2.0**64
    out = np.zeros(len(kept), dtype=np.int8)
    out[unit >= split.train] = 1
    out[unit >= split.train + split.validation] = 2
    for target, share in ((1, split.validation), (2, split.test)):
        if share > 0 and not (out == target).any() and (out == 0).sum() > 1:
            train = np.flatnonzero(out == 0)
            out[train[np.argmax(unit[train])]] = target
    return out


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64 finalizer: spreads a hash evenly over [0, 2**64)."""
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _tokenizer(dataset: Dataset, corpus: _Corpus, train_mask: npt.NDArray[np.bool_]) -> Any:
    config = dataset.spec.tokenizer
    if config.train is not None:

        def texts() -> Iterator[str]:
            for _, record in _documents(corpus, train_mask):
                yield record["t"] if "r" not in record else f"{record['t']}\n{record['r']}"

        return tok.train(texts(), config.train), list(config.train.special_tokens)
    path = config.path if config.path is not None else str(tok.ref_tokenizer_path())
    return tok.load(path), None


def run_merge(
    dataset: Dataset, output_dir: Path, work_dir: Path, count: int, options: Options | None = None
) -> Manifest:
    spec = dataset.spec
    key = config_key(spec)
    corpus = _load(work_dir, count, key)
    print_ = fingerprint(key, corpus.inputs)
    manifest_path = output_dir / MANIFEST
    if manifest_path.is_file():
        existing = read_manifest(output_dir)
        if existing.fingerprint == print_:
            log.info("merge already done (fingerprint %s), skipping", print_[:12])
            return existing
    started = time.monotonic()
    _cross_slice_exact(corpus)
    _near(corpus, spec)

    # Every document's fate, for audits and for comparing engines (benchmarks/).
    np.savez(
        work_dir / "decisions.npz",
        inputs=corpus.input_of,
        positions=corpus.position_of,
        codes=corpus.codes,
        reasons=np.array(corpus.reasons),
    )
    kept = np.flatnonzero(corpus.codes == 0)
    split_of = np.full(len(corpus.codes), -1, dtype=np.int8)
    split_of[kept] = _splits(corpus, spec, kept)
    tokenizer, special = _tokenizer(dataset, corpus, split_of == 0)
    vocab = int(tokenizer.get_vocab_size())
    eos = tok.eos_id(tokenizer, special)
    dtype: TokenDtype = (
        dtype_for_vocab(vocab) if spec.sharding.token_dtype == "auto" else spec.sharding.token_dtype
    )
    if dtype == "uint16" and vocab > 2**16:
        raise ValueError(f"vocabulary of {vocab} does not fit uint16 tokens")

    for name in SPLITS:
        shutil.rmtree(output_dir / name, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    supervised = all(s.prompt_field is not None for s in spec.sources)
    writers = [
        ShardWriter(output_dir, name, dtype, eos, spec.sharding.tokens_per_shard, supervised)
        for name in SPLITS
    ]
    source_of = _source_index(corpus)
    weights = np.array([s.weight for s in spec.sources])
    augmentation = spec.processing.augmentation
    languages: Counter[str] = Counter()
    per_source: dict[str, Counter[str]] = {s.name: Counter() for s in spec.sources}
    kept_bytes = 0
    augmented = 0
    batches: list[list[tuple[str, str | None, str]]] = [[], [], []]

    def flush(split: int) -> None:
        batch = batches[split]
        if not batch:
            return
        if supervised:
            encoded = tok.encode_pairs(
                tokenizer, [b[0] for b in batch], [b[1] or "" for b in batch]
            )
            for (ids, mask), item in zip(encoded, batch, strict=True):
                writers[split].add(ids, mask)
                per_source[item[2]]["tokens"] += len(ids) + 1
        else:
            for ids, item in zip(tok.encode(tokenizer, [b[0] for b in batch]), batch, strict=True):
                writers[split].add(ids)
                per_source[item[2]]["tokens"] += len(ids) + 1
        batch.clear()

    for index, record in _documents(corpus, split_of >= 0):
        split = int(split_of[index])
        text, response, lang = record["t"], record.get("r"), record["l"]
        source = int(source_of[index])
        name = spec.sources[source].name
        languages[lang] += 1
        per_source[name]["documents"] += 1
        kept_bytes += int(corpus.out_bytes[index])
        copies = 1
        if split == 0:
            # Weights repeat a source in the training split: 2.5 -> twice, plus a third
            # copy for half of its documents (chosen by content hash, so reruns agree).
            weight = float(weights[source])
            frac = float(_mix(corpus.hashes[index, :8].view("<u8").copy())[0]) / 2.0**64
            copies = int(weight) + (1 if frac < weight - int(weight) else 0)
        for _ in range(copies):
            batches[split].append((text, response, name))
        if split == 0 and augmentation.enabled:
            seed = int.from_bytes(corpus.hashes[index, :8].tobytes(), "little")
            for copy in range(augmentation.copies):
                noisy = augment(text, augmentation.methods, augmentation.probability, seed + copy)
                batches[split].append((noisy, response, name))
                augmented += 1
        if len(batches[split]) >= TOKENIZE_BATCH:
            flush(split)
    for split in range(3):
        flush(split)
    infos: dict[str, SplitInfo] = {n: w.close() for n, w in zip(SPLITS, writers, strict=True)}

    stats = _stats(corpus, infos, languages, per_source, kept_bytes, augmented, vocab, print_)
    stats["seconds"] = {
        "slices": sum(s.get("seconds", 0) for s in corpus.slice_stats),
        "merge": round(time.monotonic() - started, 3),
    }
    tokenizer.save(str(output_dir / TOKENIZER))
    manifest = Manifest(
        fingerprint=print_,
        dtype=dtype,
        vocab_size=vocab,
        eos_token_id=eos,
        tokenizer=TOKENIZER,
        supervised=supervised,
        splits=infos,
        stats=stats,
    )
    (output_dir / CARD).write_text(report.dataset_card(dataset, stats, print_))
    write_manifest(output_dir, manifest)  # last: its presence means the output is complete
    log.info("merge: %d documents, %d tokens", stats["documents"], stats["totalTokens"])
    return manifest


def _source_index(corpus: _Corpus) -> npt.NDArray[np.int64]:
    lookup = np.zeros(max((i["index"] for i in corpus.inputs), default=0) + 1, dtype=np.int64)
    for item in corpus.inputs:
        lookup[item["index"]] = item["source"]
    return lookup[corpus.input_of]


def _stats(
    corpus: _Corpus,
    infos: dict[str, SplitInfo],
    languages: Counter[str],
    per_source: dict[str, Counter[str]],
    kept_bytes: int,
    augmented: int,
    vocab: int,
    print_: str,
) -> dict[str, Any]:
    dropped = []
    for code, name in enumerate(corpus.reasons):
        if code == 0:
            continue
        mask = corpus.codes == code
        if mask.any():
            dropped.append((name, int(mask.sum()), int(corpus.out_bytes[mask].sum())))
    steps = report.step_stats(len(corpus.codes), int(corpus.raw_bytes.sum()), dropped, kept_bytes)
    kept = sum(languages.values())
    tokens = {name: info.tokens for name, info in infos.items()}
    written = sum(info.documents for info in infos.values())
    steps.append(
        {"name": "augment", "documentsIn": kept, "documentsOut": kept + augmented, "dropped": {}}
    )
    steps.append(
        {"name": "tokenize", "documentsIn": written, "documentsOut": written, "dropped": {}}
    )
    by_name = {s["name"]: s for s in steps}
    exact_in = by_name["dedup-exact"]["documentsIn"]
    near_in = by_name["dedup-near"]["documentsIn"]
    pii: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    for stats in corpus.slice_stats:
        pii.update(stats.get("pii", {}))
        lines.update(stats.get("c4LinesRemoved", {}))
    by_name["pii"]["replaced"] = dict(pii)
    by_name["filter-lines"]["linesRemoved"] = dict(lines)
    return {
        "steps": steps,
        "documents": kept,
        "tokens": tokens,
        "totalTokens": sum(tokens.values()),
        "exactDuplicateRatio": _ratio(exact_in - by_name["dedup-exact"]["documentsOut"], exact_in),
        "nearDuplicateRatio": _ratio(near_in - by_name["dedup-near"]["documentsOut"], near_in),
        "languages": {k: round(v / kept, 6) for k, v in languages.most_common()} if kept else {},
        "vocabSize": vocab,
        "fingerprint": print_,
        "documentsPerSplit": {name: info.documents for name, info in infos.items()},
        "inputs": {
            "files": len(corpus.inputs),
            "bytes": sum(int(i["bytes"]) for i in corpus.inputs),
        },
        "sources": {name: dict(c) for name, c in per_source.items()},
    }


def _ratio(part: int, whole: int) -> float:
    return round(part / whole, 6) if whole else 0.0


# ----------------------------------------------------------------------------- local run


def run_local(
    dataset: Dataset,
    output_dir: Path,
    num_slices: int = 1,
    work_dir: Path | None = None,
    options: Options | None = None,
) -> Manifest:
    """All slices, then the merge, in this process (tests and the local runtime)."""
    work = work_dir or output_dir / ".work"
    for index in range(num_slices):
        run_slice(dataset, work, index, num_slices, options)
    return run_merge(dataset, output_dir, work, num_slices, options)
