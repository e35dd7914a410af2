"""Merge stage: one pod, after every slice and dedup group has finished.

It joins the dedup groups' buckets into clusters and removal lists (data.dedup_stage),
orders every document by (input, position), so the result does not depend on the number
of slices, drops the exact copies across slices and the near duplicates, trains, builds or
loads the tokenizer, splits by document (a seeded hash of the content, or the position in
the stream; a source with a split of its own goes there whole),
drops the training documents that share an n-gram with the validation or test split or with
evaluation files (processing.decontamination), tokenizes in parallel and writes shards,
tokenizer, manifest and dataset card.

With `tokenizer.fromModel` the tokenizer is the model's: its `tokenizer.json` encodes the
text, its end-of-sequence token separates documents, its chat template renders chats (with
a loss mask on the assistant's turns), and its tokenizer files are copied into the output.

Sources may mix plain text with supervised records (pairs, chats): the shards are then
supervised, a plain-text document's mask is MASK_TEXT throughout (shards.py), and the
manifest says `mixed`. A source's weight repeats or subsamples its training documents
(`weighted_copies`).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llmops.api.dataset import Dataset, DatasetSpec, dedup_groups
from llmops_trainer.data import decontaminate, report
from llmops_trainer.data import tokenize as tok
from llmops_trainer.data.augment import augment
from llmops_trainer.data.chat import ChatEncoder, Message, contents
from llmops_trainer.data.corpus import Corpus, load_corpus
from llmops_trainer.data.dedup_stage import removal_list, run_cluster
from llmops_trainer.data.registry import Options, Registry
from llmops_trainer.data.slice_stage import AUGMENT_COUNTERS, config_key
from llmops_trainer.data.steps import CONTENTLESS, EXACT, NEAR, PIPELINE
from llmops_trainer.data.synthetic import PARAPHRASE, PSEUDO_LABEL, QUESTION_ANSWER
from llmops_trainer.shards import (
    MANIFEST,
    SPLITS,
    Manifest,
    ShardWriter,
    SplitInfo,
    TokenDtype,
    dtype_for_vocab,
    read_manifest,
    sha256_file,
    write_manifest,
)

log = logging.getLogger("llmops.data")
CARD = "README.md"
TOKENIZER = "tokenizer.json"
TOKENIZE_BATCH = 1024


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


def _deduplicate(corpus: Corpus, spec: DatasetSpec, work_dir: Path) -> None:
    """Applies the dedup stage's removal lists (data.dedup_stage): exact copies across
    slices first (the first copy in global order of every content hash stays, even if its
    slice dropped it for another reason), then near duplicates among the rest."""
    config = spec.processing.deduplication
    offsets, lookup = corpus.global_positions()
    exact_at, near_at = [], []
    for number in range(len(corpus.slices)):
        removed = np.load(removal_list(work_dir, number))
        exact_at.append(lookup[offsets[number] + removed["exact"]])
        near_at.append(lookup[offsets[number] + removed["near"]])
    if config.exact:  # off means off: duplicates across slices stay
        exact = corpus.code(EXACT)
        for reason in CONTENTLESS:
            corpus.code(reason)
        corpus.codes[np.concatenate(exact_at)] = exact
    if config.near.enabled and np.count_nonzero((corpus.codes == 0) & corpus.signed()) >= 2:
        corpus.codes[np.concatenate(near_at)] = corpus.code(NEAR)


def _decontaminate(
    corpus: Corpus, spec: DatasetSpec, split_of: npt.NDArray[np.int8]
) -> dict[str, Any] | None:
    """Drops (code `contaminated`, out of every split) the training documents sharing an
    n-gram with the documents of the `against` splits or the evaluation files; the splits
    of the other documents stay as assigned. Returns the step's counters, None when off."""
    config = spec.processing.decontamination
    if config is None:
        return None
    index = decontaminate.NgramIndex(config.ngram)
    wanted = np.isin(split_of, [SPLITS.index(name) for name in config.against])
    for _, record in corpus.documents(wanted):
        index.add(_text(record))
    split_texts = index.texts
    for text in decontaminate.file_texts(config.files):
        index.add(text)
    code = corpus.code(decontaminate.CONTAMINATED)
    source_of = corpus.source_index()
    by_source = {s.name: 0 for s in spec.sources}
    positions: list[int] = []
    texts: list[str] = []

    def flush() -> None:
        hits = np.asarray(positions, dtype=np.int64)[index.matches(texts)]
        corpus.codes[hits] = code
        split_of[hits] = -1
        for position in hits.tolist():
            by_source[spec.sources[int(source_of[position])].name] += 1
        positions.clear()
        texts.clear()

    if len(index):
        for position, record in corpus.documents(split_of == 0):
            positions.append(position)
            texts.append(_text(record))
            if len(texts) >= TOKENIZE_BATCH:
                flush()
        flush()
    log.info("decontamination: %d training documents dropped", sum(by_source.values()))
    return {
        "ngram": config.ngram,
        "splitTexts": split_texts,
        "fileTexts": index.texts - split_texts,
        "ngrams": len(index),
        "bySource": by_source,
    }


def _splits(corpus: Corpus, spec: DatasetSpec, kept: npt.NDArray[np.int64]) -> npt.NDArray[np.int8]:
    """0/1/2 (train/validation/test) per kept document: a source with a split of its own
    (sources[].split) goes there whole; the others are divided by the ratios, by a seeded
    hash of the content (mode hash) or by position in global order (mode contiguous)."""
    fixed = np.array([-1 if s.split is None else SPLITS.index(s.split) for s in spec.sources])
    assigned = fixed[corpus.source_index()[kept]].astype(np.int8)
    free = np.flatnonzero(assigned < 0)
    if spec.split.mode == "contiguous":
        assigned[free] = _contiguous_split(len(free), spec)
    else:
        assigned[free] = _hash_split(corpus, spec, kept[free])
    return assigned


def _hash_split(
    corpus: Corpus, spec: DatasetSpec, documents: npt.NDArray[np.int64]
) -> npt.NDArray[np.int8]:
    """By a seeded hash of each document's content; a split with a share above zero gets at
    least one document when there are enough."""
    split = spec.split
    head = np.ascontiguousarray(corpus.hashes[documents, :8]).view("<u8").ravel()
    unit = _mix(head ^ np.uint64(split.seed * 0x9E3779B97F4A7C15 % 2**64)).astype(np.float64)
    unit /= 2.0**64
    out = np.zeros(len(documents), dtype=np.int8)
    out[unit >= split.train] = 1
    out[unit >= split.train + split.validation] = 2
    for target, share in ((1, split.validation), (2, split.test)):
        if share > 0 and not (out == target).any() and (out == 0).sum() > 1:
            train = np.flatnonzero(out == 0)
            out[train[np.argmax(unit[train])]] = target
    return out


def _contiguous_split(count: int, spec: DatasetSpec) -> npt.NDArray[np.int8]:
    """In stream order: the first `count * train` documents (rounded) train, the next
    `count * validation` validate, the rest test; a split with a share above zero gets at
    least one document when the training split has more than one to give."""
    split = spec.split
    train = int(count * split.train + 0.5)
    sizes = [train, int(count * (split.train + split.validation) + 0.5) - train, 0]
    sizes[2] = count - sizes[0] - sizes[1]
    for target, share in ((1, split.validation), (2, split.test)):
        if share > 0 and sizes[target] == 0 and sizes[0] > 1:
            sizes[0] -= 1
            sizes[target] = 1
    return np.repeat(np.arange(3, dtype=np.int8), sizes)


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64 finalizer: spreads a hash evenly over [0, 2**64)."""
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _text(record: dict[str, Any]) -> str:
    """A stored document's text: prompt and response, or a chat's contents."""
    if "m" in record:
        return contents(record["m"])
    return record["t"] if "r" not in record else f"{record['t']}\n{record['r']}"


def _tokenizer(dataset: Dataset, corpus: Corpus, train_mask: npt.NDArray[np.bool_]) -> Any:
    config = dataset.spec.tokenizer

    def texts() -> Iterator[str]:
        for _, record in corpus.documents(train_mask):
            yield _text(record)

    if config.train is not None:
        return tok.train(texts(), config.train), list(config.train.special_tokens)
    if config.byte is not None:
        return tok.byte_level(config.byte), list(config.byte.special_tokens)
    if config.char is not None:
        return tok.characters(texts(), config.char), list(config.char.special_tokens)
    path = config.path if config.path is not None else str(tok.ref_tokenizer_path())
    return tok.load(path), None


def _model_digest(model: tok.ModelTokenizer) -> str:
    digest = hashlib.sha256()
    for relative in tok.model_files(model.folder):
        digest.update(f"{relative.as_posix()}\x00".encode())
        digest.update(bytes.fromhex(sha256_file(model.folder / relative)))
    return digest.hexdigest()


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


def weighted_copies(weight: float, heads: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    """How many times each of the documents whose content hashes start with `heads` (their
    first 8 bytes, little-endian) goes into the training split under a source weight:
    floor(weight), plus one when the document's hash, spread evenly over [0, 1), is below
    the fraction. So 2.5 writes every document twice and about half of them a third time,
    0.3 keeps about 30% of them and drops the rest, and reruns (and reorderings) agree."""
    unit = _mix(np.asarray(heads, dtype=np.uint64)).astype(np.float64) / 2.0**64
    whole = int(weight)
    return whole + (unit < weight - whole).astype(np.int64)


def run_merge(
    dataset: Dataset,
    output_dir: Path,
    work_dir: Path,
    count: int,
    options: Options | None = None,
    groups: int | None = None,
) -> Manifest:
    """After the slices and the dedup groups (`groups`: their number, by default the
    Job's, `dedup_groups`): joins the groups' clusters, then splits, tokenizes and shards."""
    spec = dataset.spec
    registry = (options or Options()).steps or PIPELINE
    key = config_key(spec)
    corpus = load_corpus(work_dir, count, key)
    model = tok.model_tokenizer(spec) if spec.tokenizer.from_model is not None else None
    decontamination = spec.processing.decontamination
    extra = _model_digest(model) if model else ""
    if decontamination is not None and decontamination.files:
        extra += decontaminate.files_digest(decontamination.files)
    print_ = fingerprint(key, corpus.inputs, extra)
    manifest_path = output_dir / MANIFEST
    if manifest_path.is_file():
        existing = read_manifest(output_dir)
        if existing.fingerprint == print_:
            log.info("merge already done (fingerprint %s), skipping", print_[:12])
            return existing
    started = time.monotonic()
    run_cluster(dataset, work_dir, count, groups or dedup_groups(spec))
    _deduplicate(corpus, spec, work_dir)
    kept = np.flatnonzero(corpus.codes == 0)
    split_of = np.full(len(corpus.codes), -1, dtype=np.int8)
    split_of[kept] = _splits(corpus, spec, kept)
    contamination = _decontaminate(corpus, spec, split_of)

    # Every document's fate, for audits and for comparing engines (benchmarks/).
    np.savez(
        work_dir / "decisions.npz",
        inputs=corpus.input_of,
        positions=corpus.position_of,
        codes=corpus.codes,
        reasons=np.array(corpus.reasons),
    )
    if model is not None:
        tokenizer, vocab, eos = model.tokenizer, model.vocab_size, model.eos_id
    else:
        tokenizer, special = _tokenizer(dataset, corpus, split_of == 0)
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
    chats = (
        ChatEncoder(model.folder, model.tokenizer, model.eos_id)
        if model is not None and any(s.messages_field for s in spec.sources)
        else None
    )

    for name in SPLITS:
        shutil.rmtree(output_dir / name, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    # Plain-text documents of a mixed dataset go into supervised shards, marked MASK_TEXT.
    supervised, mixed = kinds(spec)
    writers = [
        ShardWriter(output_dir, name, dtype, eos, spec.sharding.tokens_per_shard, supervised)
        for name in SPLITS
    ]
    source_of = corpus.source_index()
    weights = np.array([s.weight for s in spec.sources])
    augmentation = spec.processing.augmentation
    languages: Counter[str] = Counter()
    per_source: dict[str, Counter[str]] = {
        s.name: Counter(documents=0, trainDocuments=0, tokens=0) for s in spec.sources
    }
    kept_bytes = 0
    augmented = 0
    synthetic: Counter[str] = Counter()
    batches: list[list[_Item]] = [[], [], []]

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

    for index, record in corpus.documents(split_of >= 0):
        split = int(split_of[index])
        text, response, lang = record.get("t", ""), record.get("r"), record["l"]
        messages: list[Message] | None = (
            [(role, content) for role, content in record["m"]] if "m" in record else None
        )
        source = int(source_of[index])
        name = spec.sources[source].name
        languages[lang] += 1
        per_source[name]["documents"] += 1
        kept_bytes += int(corpus.out_bytes[index])
        copies = 1
        if split == 0:
            # Weights repeat or subsample a source in the training split (weighted_copies).
            head = corpus.hashes[index, :8].view("<u8").copy()
            copies = int(weighted_copies(float(weights[source]), head)[0])
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
            seed = int.from_bytes(corpus.hashes[index, :8].tobytes(), "little")
            methods, probability = list(augmentation.methods), augmentation.probability
            for copy in range(augmentation.copies):
                if messages is not None:
                    noisy_chat = _augmented_chat(messages, methods, probability, seed + copy)
                    batches[split].append(_Item("", None, noisy_chat, name))
                else:
                    noisy = augment(text, methods, probability, seed + copy)
                    batches[split].append(_Item(noisy, response, None, name))
                augmented += 1
        if len(batches[split]) >= TOKENIZE_BATCH:
            flush(split)
    for split in range(3):
        flush(split)
    infos: dict[str, SplitInfo] = {n: w.close() for n, w in zip(SPLITS, writers, strict=True)}

    stats = _stats(
        registry, corpus, infos, languages, per_source, kept_bytes, augmented, vocab, print_
    )
    _synthetic_stats(stats, corpus, synthetic)
    if contamination is not None:
        by_source = contamination.pop("bySource")
        step = next(
            s for s in stats["steps"] if s["name"] == registry.step_of(decontaminate.CONTAMINATED)
        )
        step["decontamination"] = contamination
        for name, count in by_source.items():
            stats["sources"][name]["contaminatedDocuments"] = count
    for declared in spec.sources:  # what the counts were weighted with, and of which kind
        entry = stats["sources"][declared.name]
        entry["weight"] = declared.weight
        entry["kind"] = "supervised" if declared.supervised else "text"
    stats["seconds"] = {
        "slices": sum(s.get("seconds", 0) for s in corpus.slice_stats),
        "merge": round(time.monotonic() - started, 3),
    }
    if model is not None:
        tok.copy_model_files(model.folder, output_dir)  # tokenizer.json, config, templates
    else:
        tokenizer.save(str(output_dir / TOKENIZER))
    manifest = Manifest(
        fingerprint=print_,
        dtype=dtype,
        vocab_size=vocab,
        eos_token_id=eos,
        tokenizer=TOKENIZER,
        supervised=supervised,
        mixed=mixed,
        splits=infos,
        stats=stats,
    )
    (output_dir / CARD).write_text(report.dataset_card(dataset, stats, print_))
    write_manifest(output_dir, manifest)  # last: its presence means the output is complete
    log.info("merge: %d documents, %d tokens", stats["documents"], stats["totalTokens"])
    return manifest


def _stats(
    registry: Registry,
    corpus: Corpus,
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
    steps = report.step_stats(
        registry,
        len(corpus.codes),
        int(corpus.raw_bytes.sum()),
        dropped,
        kept_bytes,
        corpus.slice_stats,
    )
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
    exact = by_name[registry.step_of(EXACT)]
    near = by_name[registry.step_of(NEAR)]
    return {
        "steps": steps,
        "documents": kept,
        "tokens": tokens,
        "totalTokens": sum(tokens.values()),
        "exactDuplicateRatio": _drop_ratio(exact),
        "nearDuplicateRatio": _drop_ratio(near),
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


def kinds(spec: DatasetSpec) -> tuple[bool, bool]:
    """(supervised, mixed) shards: supervised records among the documents (question/answer
    pairs written by a model count), and plain text too."""
    llm = spec.processing.augmentation.llm
    pairs_made = llm is not None and llm.question_answer is not None
    supervised = pairs_made or any(s.supervised for s in spec.sources)
    return supervised, supervised and not all(s.supervised for s in spec.sources)


def _synthetic_stats(stats: dict[str, Any], corpus: Corpus, written: Counter[str]) -> None:
    """Documents written by a language model: in the augment step (with the slices' request
    counts) and, with the pseudo-labelled ones, as `syntheticDocuments`."""
    requests: Counter[str] = Counter()
    for slice_stats in corpus.slice_stats:
        requests.update(slice_stats.get(AUGMENT_COUNTERS, {}))
    augment = next(s for s in stats["steps"] if s["name"] == "augment")
    made = written[PARAPHRASE] + written[QUESTION_ANSWER]
    augment["documentsOut"] += made
    if requests or made:
        augment["synthetic"] = {
            "paraphrases": written[PARAPHRASE],
            "questionAnswer": written[QUESTION_ANSWER],
            "requests": dict(requests),
        }
    stats["syntheticDocuments"] = made + written[PSEUDO_LABEL]
    stats["synthetic"] = {
        "pseudoLabelled": written[PSEUDO_LABEL],
        "paraphrases": written[PARAPHRASE],
        "questionAnswer": written[QUESTION_ANSWER],
    }


def _drop_ratio(step: dict[str, Any]) -> float:
    """The share of the documents entering a step that it dropped."""
    whole = step["documentsIn"]
    return round((whole - step["documentsOut"]) / whole, 6) if whole else 0.0
