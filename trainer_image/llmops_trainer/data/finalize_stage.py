"""Finalize stage: one small pod after every tokenize unit has finished.

It lists every unit's shards, in unit order, in the manifest (per split: the token stream
of one process over the whole corpus), sums the units' counters with the prepare stage's
drop counts into the statistics, copies the tokenizer (the prepare stage's, or the model's
files with `tokenizer.fromModel`) next to the shards and writes the dataset card and, last,
the manifest (its fingerprint: data.prepare_stage.fingerprint). A rerun whose manifest
already holds the fingerprint does nothing.

Memory: the shard list and the counters; it reads no document.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from llmops.api.dataset import Dataset
from llmops_trainer.data import decontaminate, report
from llmops_trainer.data import tokenize as tok
from llmops_trainer.data.prepare_stage import TOKENIZER, prepare_dir, read_plan, source_counts
from llmops_trainer.data.registry import Options, Registry
from llmops_trainer.data.slice_stage import AUGMENT_COUNTERS, slice_dir
from llmops_trainer.data.steps import EXACT, NEAR, PIPELINE
from llmops_trainer.data.synthetic import PARAPHRASE, PSEUDO_LABEL, QUESTION_ANSWER
from llmops_trainer.data.tokenize_stage import _finished, kinds, unit_path
from llmops_trainer.shards import (
    MANIFEST,
    SPLITS,
    Manifest,
    ShardInfo,
    SplitInfo,
    read_manifest,
    write_manifest,
)

log = logging.getLogger("llmops.data")
CARD = "README.md"


def run_finalize(
    dataset: Dataset, output_dir: Path, work_dir: Path, count: int, options: Options | None = None
) -> Manifest:
    """After the tokenize units: manifest, statistics, tokenizer and card."""
    spec = dataset.spec
    registry = (options or Options()).steps or PIPELINE
    plan = read_plan(work_dir)
    print_ = plan["fingerprint"]
    if (output_dir / MANIFEST).is_file():
        existing = read_manifest(output_dir)
        if existing.fingerprint == print_:
            log.info("finalize already done (fingerprint %s), skipping", print_[:12])
            return existing
    started = time.monotonic()
    missing = [u for u in range(plan["units"]) if not _finished(work_dir, u, plan)]
    if missing:
        raise RuntimeError(f"tokenize units {missing[:5]} of {plan['units']} have not finished")
    infos = {name: SplitInfo() for name in SPLITS}
    languages: Counter[str] = Counter()
    per_source = source_counts(spec)
    synthetic: Counter[str] = Counter()
    contaminated: Counter[str] = Counter()
    kept_bytes = augmented = hit_documents = hit_bytes = 0
    unit_seconds = 0.0
    for unit in range(plan["units"]):
        result = json.loads(unit_path(work_dir, unit, "json").read_text())
        for name, split in result["splits"].items():
            info = infos[name]
            info.shards += [ShardInfo(**shard) for shard in split["shards"]]
            info.tokens += split["tokens"]
            info.documents += split["documents"]
        languages.update(dict(result["languages"]))
        for name, counts in result["sources"].items():
            per_source[name].update(counts)
        synthetic.update(result["synthetic"])
        contaminated.update(result["contaminated"]["bySource"])
        hit_documents += result["contaminated"]["documents"]
        hit_bytes += result["contaminated"]["bytes"]
        kept_bytes += result["keptBytes"]
        augmented += result["augmented"]
        unit_seconds += result["seconds"]
    dropped = [tuple(entry) for entry in plan["dropped"]]
    if hit_documents:
        dropped.append((decontaminate.CONTAMINATED, hit_documents, hit_bytes))
    slice_stats = [
        json.loads((slice_dir(work_dir, number) / "stats.json").read_text())
        for number in range(count)
    ]
    stats = _stats(
        registry,
        plan,
        dropped,
        slice_stats,
        infos,
        languages,
        per_source,
        kept_bytes,
        augmented,
    )
    _synthetic_stats(stats, slice_stats, synthetic)
    if plan["decontamination"] is not None:
        step = next(
            s for s in stats["steps"] if s["name"] == registry.step_of(decontaminate.CONTAMINATED)
        )
        step["decontamination"] = dict(plan["decontamination"])
        for declared in spec.sources:
            stats["sources"][declared.name]["contaminatedDocuments"] = contaminated[declared.name]
    for declared in spec.sources:  # what the counts were weighted with, and of which kind
        entry = stats["sources"][declared.name]
        entry["weight"] = declared.weight
        entry["kind"] = "supervised" if declared.supervised else "text"
    stats["tokenizerSample"] = plan["tokenizerSample"]
    stats["seconds"] = {
        "slices": sum(s.get("seconds", 0) for s in slice_stats),
        "prepare": plan["seconds"],
        "tokenize": round(unit_seconds, 3),
        "finalize": round(time.monotonic() - started, 3),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    if spec.tokenizer.from_model is not None:
        model = tok.model_tokenizer(spec)
        tok.copy_model_files(model.folder, output_dir)  # tokenizer.json, config, templates
    else:
        shutil.copyfile(prepare_dir(work_dir) / TOKENIZER, output_dir / TOKENIZER)
    supervised, mixed = kinds(spec)
    manifest = Manifest(
        fingerprint=print_,
        dtype=plan["dtype"],
        vocab_size=plan["vocabSize"],
        eos_token_id=plan["eosTokenId"],
        tokenizer=TOKENIZER,
        supervised=supervised,
        mixed=mixed,
        splits=infos,
        stats=stats,
    )
    (output_dir / CARD).write_text(report.dataset_card(dataset, stats, print_))
    write_manifest(output_dir, manifest)  # last: its presence means the output is complete
    log.info("finalize: %d documents, %d tokens", stats["documents"], stats["totalTokens"])
    return manifest


def _stats(
    registry: Registry,
    plan: dict[str, Any],
    dropped: list[tuple[Any, ...]],
    slice_stats: list[dict[str, Any]],
    infos: dict[str, SplitInfo],
    languages: Counter[str],
    per_source: dict[str, Counter[str]],
    kept_bytes: int,
    augmented: int,
) -> dict[str, Any]:
    steps = report.step_stats(
        registry,
        plan["documents"],
        plan["rawBytes"],
        [(str(name), int(n), int(size)) for name, n, size in dropped],
        kept_bytes,
        slice_stats,
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
    by_count = sorted(languages.items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "steps": steps,
        "documents": kept,
        "tokens": tokens,
        "totalTokens": sum(tokens.values()),
        "exactDuplicateRatio": _drop_ratio(exact),
        "nearDuplicateRatio": _drop_ratio(near),
        "languages": {k: round(v / kept, 6) for k, v in by_count} if kept else {},
        "vocabSize": plan["vocabSize"],
        "fingerprint": plan["fingerprint"],
        "documentsPerSplit": {name: info.documents for name, info in infos.items()},
        "inputs": {
            "files": len(plan["inputs"]),
            "bytes": sum(int(i["bytes"]) for i in plan["inputs"]),
        },
        "sources": {name: dict(c) for name, c in per_source.items()},
    }


def _synthetic_stats(
    stats: dict[str, Any], slice_stats: list[dict[str, Any]], written: Counter[str]
) -> None:
    """Documents written by a language model: in the augment step (with the slices' request
    counts) and, with the pseudo-labelled ones, as `syntheticDocuments`."""
    requests: Counter[str] = Counter()
    for one in slice_stats:
        requests.update(one.get(AUGMENT_COUNTERS, {}))
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
