"""Report: per-step statistics (in the camelCase shape of DatasetStatus) and the dataset card."""

from __future__ import annotations

from collections import Counter
from typing import Any

from llmops.api.dataset import Dataset, LlmEndpoint
from llmops_trainer.data.registry import Registry


def step_stats(
    registry: Registry,
    documents: int,
    raw_bytes: int,
    dropped: list[tuple[str, int, int]],
    kept_bytes: int,
    slice_stats: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The registry's steps with documents and bytes in/out, drop reasons and counters, from
    the count and size of the documents read, (reason, documents, bytes) of every drop and
    the slices' statistics."""
    by_step: dict[str, Counter[str]] = {s.name: Counter() for s in registry.steps}
    bytes_by_step: Counter[str] = Counter()
    for reason, count, size in dropped:
        name = registry.step_of(reason)
        by_step[name][reason] += count
        bytes_by_step[name] += size
    steps = []
    docs, size = documents, raw_bytes
    for number, step in enumerate(registry.steps):
        out = docs - sum(by_step[step.name].values())
        out_size = size - bytes_by_step[step.name]
        if number == 0:
            # Sizes are counted after normalization, which happens before the first step:
            # what leaves it is the sum of what follows.
            out_size = kept_bytes + sum(b for s, b in bytes_by_step.items() if s != step.name)
        entry: dict[str, Any] = {
            "name": step.name,
            "documentsIn": docs,
            "documentsOut": out,
            "bytesIn": size,
            "bytesOut": out_size,
            "dropped": dict(sorted(by_step[step.name].items())),
        }
        if step.counters is not None:
            total: Counter[str] = Counter()
            for stats in slice_stats:
                total.update(stats.get(step.counters.slice_key, {}))
            entry[step.counters.report_key] = dict(total)
        steps.append(entry)
        docs, size = out, out_size
    return steps


def _table(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _source_location(dataset: Dataset, index: int) -> str:
    source = dataset.spec.sources[index]
    if source.path is not None:
        return f"path `{source.path}`"
    if source.volume is not None:
        return f"volume `{source.volume.claim_name}:{source.volume.path or '/'}`"
    if source.urls is not None:
        return f"{len(source.urls)} URL(s), first `{source.urls[0]}`"
    if source.hf is not None:
        return f"Hub dataset `{source.hf.repo}@{source.hf.revision or 'main'}`"
    assert source.s3 is not None
    return f"`s3://{source.s3.bucket}/{source.s3.prefix}`"


def _license(dataset: Dataset, index: int) -> str:
    source = dataset.spec.sources[index]
    given = getattr(source, "license", None)
    if given:
        return str(given)
    annotations = dataset.metadata.annotations
    return annotations.get(
        f"llmops.dev/license.{source.name}", annotations.get("llmops.dev/license", "not given")
    )


def _tokenizer(dataset: Dataset) -> str:
    config = dataset.spec.tokenizer
    if config.from_model is not None:
        chats = any(s.messages_field for s in dataset.spec.sources)
        extra = "; chats rendered with its chat template, loss on the assistant's turns"
        return f"the model's, `{config.from_model.uri}`" + (extra if chats else "")
    if config.train is not None:
        return f"byte-level BPE trained on the training split ({config.train.vocab_size} tokens)"
    if config.byte is not None:
        return "bytes (256 tokens) and the special tokens"
    if config.char is not None:
        fallback = "their UTF-8 bytes" if config.char.fallback == "bytes" else "`<|unk|>`"
        return (
            "the characters of the training split and the special tokens; other characters "
            f"become {fallback}"
        )
    if config.path is not None:
        return f"`{config.path}`"
    assert config.dataset_ref is not None
    return f"that of Dataset `{config.dataset_ref.name}`"


def _split(dataset: Dataset) -> str:
    split = dataset.spec.split
    ratios = f"{split.train:g}/{split.validation:g}/{split.test:g}"
    how = f"split seed {split.seed}" if split.mode == "hash" else "contiguous split"
    text = f"{how}, ratios {ratios}"
    held = [f"{s.name} to {s.split}" for s in dataset.spec.sources if s.split is not None]
    return text + (f"; whole sources: {', '.join(held)}" if held else "")


def _endpoint(endpoint: LlmEndpoint) -> str:
    where = (
        f"ModelDeployment `{endpoint.model_deployment.name}`"
        if endpoint.model_deployment is not None
        else f"`{endpoint.url}`"
    )
    return where + (f" (model `{endpoint.model}`)" if endpoint.model else "")


def _synthetic(dataset: Dataset, stats: dict[str, Any]) -> str:
    """What language models wrote, and how much of the output it is."""
    made = stats.get("synthetic") or {}
    parts = []
    for source in dataset.spec.sources:
        if source.pseudo_label is not None:
            config = source.pseudo_label
            parts.append(
                f"responses of source `{source.name}` by {_endpoint(config.endpoint)}, kept at "
                f"a mean token log-probability of at least {config.min_mean_logprob:g}"
            )
    llm = dataset.spec.processing.augmentation.llm
    if llm is not None:
        kinds = [
            f"{config.count} {what} per training document"
            for config, what in (
                (llm.paraphrases, "paraphrase(s)"),
                (llm.question_answer, "question/answer pair(s)"),
            )
            if config is not None
        ]
        parts.append(f"{' and '.join(kinds)} by {_endpoint(llm.endpoint)}")
    if not parts:
        return "none"
    counts = (
        f"{stats.get('syntheticDocuments', 0)} synthetic documents in the output: "
        f"{made.get('pseudoLabelled', 0)} pseudo-labelled, {made.get('paraphrases', 0)} "
        f"paraphrases, {made.get('questionAnswer', 0)} question/answer pairs"
    )
    return "; ".join(parts) + f" ({counts})"


def _decontamination(dataset: Dataset, stats: dict[str, Any]) -> str:
    config = dataset.spec.processing.decontamination
    if config is None:
        return "off"
    step = next((s for s in stats.get("steps", []) if "decontamination" in s), None)
    against = [*config.against, *(f"`{f}`" for f in config.files)]
    text = f"{config.ngram}-grams of words shared with {', '.join(against)}"
    if step is None:
        return text
    counts = step["decontamination"]
    per_source = ", ".join(
        f"{name} {entry.get('contaminatedDocuments', 0)}"
        for name, entry in stats.get("sources", {}).items()
    )
    dropped = step["documentsIn"] - step["documentsOut"]
    return (
        f"{text} ({counts['splitTexts']} split and {counts['fileTexts']} file texts, "
        f"{counts['ngrams']} distinct n-grams): {dropped} training documents dropped "
        f"({per_source})"
    )


def dataset_card(dataset: Dataset, stats: dict[str, Any], fingerprint: str) -> str:
    spec = dataset.spec
    processing = spec.processing
    near = processing.deduplication.near
    sources = [
        ["source", "location", "format", "weight", "licence", "documents kept", "training copies"]
    ]
    for i, source in enumerate(spec.sources):
        counts = stats.get("sources", {}).get(source.name, {})
        kept = counts.get("documents", 0)
        kind: str = source.format
        if source.messages_field:
            kind += " (chats)"
        elif source.pseudo_label is not None:
            kind += " (prompts, pseudo-labelled: synthetic responses)"
        elif source.prompt_field:
            kind += " (prompt/response pairs)"
        sources.append(
            [
                source.name,
                _source_location(dataset, i),
                kind,
                f"{source.weight:g}",
                _license(dataset, i),
                str(kept),
                str(counts.get("trainDocuments", "-")),
            ]
        )
    llm = processing.augmentation.llm
    made_pairs = llm is not None and llm.question_answer is not None
    mixed = len({s.supervised for s in spec.sources} | ({True} if made_pairs else set())) > 1
    steps = [["step", "documents in", "documents out", "MB in", "MB out", "dropped"]]
    for step in stats.get("steps", []):
        dropped = ", ".join(f"{k}: {v}" for k, v in step.get("dropped", {}).items()) or "-"
        steps.append(
            [
                step["name"],
                str(step["documentsIn"]),
                str(step["documentsOut"]),
                f"{step.get('bytesIn', 0) / 1e6:.2f}",
                f"{step.get('bytesOut', 0) / 1e6:.2f}",
                dropped,
            ]
        )
    tokens = stats.get("tokens", {})
    languages = ", ".join(f"{k} {v:.1%}" for k, v in stats.get("languages", {}).items()) or "-"
    allow = ", ".join(processing.languages.allow) or "any"
    pii = ", ".join(processing.pii.kinds) if processing.pii.enabled else "off"
    augmentation = processing.augmentation
    augmentation_text = ", ".join(augmentation.methods) if augmentation.enabled else "off"
    lines = [
        f"# Dataset card: {dataset.metadata.name}",
        "",
        f"Fingerprint `{fingerprint}`; {stats.get('documents', 0)} documents, "
        f"{stats.get('totalTokens', 0)} tokens, vocabulary of {stats.get('vocabSize', 0)}.",
        "",
        f"Tokenizer: {_tokenizer(dataset)}.",
        "",
        "## Sources",
        "",
        _table(sources),
        "",
        "Weights repeat (above 1) or subsample (below 1) a source's documents in the training "
        "split: floor(weight) copies of each, one more for the documents whose content hash "
        "falls below the fraction; validation and test are not weighted.",
        "",
        *(
            [
                "Plain text and supervised records are mixed: with objective `sft` plain text "
                "is learned on every token, supervised records on their responses only.",
                "",
            ]
            if mixed
            else []
        ),
        "## Processing",
        "",
        f"1. Normalization: Unicode {processing.normalization.unicode}, "
        f"lowercase {processing.normalization.lowercase}, "
        f"whitespace collapsed {processing.normalization.collapse_whitespace}.",
        f"2. Exact deduplication: {processing.deduplication.exact}.",
        f"3. Quality filters (Gopher quality and repetition): at least "
        f"{processing.filters.min_words} words, symbol ratio at most "
        f"{processing.filters.max_symbol_ratio}, alphabetic words at least "
        f"{processing.filters.min_alpha_word_ratio}, duplicate lines at most "
        f"{processing.filters.max_duplicate_line_ratio}; C4 line rules "
        f"{'on' if processing.filters.c4_lines else 'off'}.",
        f"4. Languages allowed: {allow} (confidence at least "
        f"{processing.languages.min_confidence}).",
        f"5. PII scrubbing: {pii}.",
        f"6. Near-duplicate removal: {near.enabled} (MinHash, {near.num_permutations} "
        f"permutations in {near.bands} bands, {near.shingle_size}-word shingles, "
        f"Jaccard threshold {near.threshold}).",
        f"7. Augmentation: {augmentation_text}.",
        f"8. Synthetic data (written by language models): {_synthetic(dataset, stats)}.",
        f"9. Decontamination: {_decontamination(dataset, stats)}.",
        "",
        "## Statistics",
        "",
        _table(steps),
        "",
        f"Tokens: train {tokens.get('train', 0)}, validation {tokens.get('validation', 0)}, "
        f"test {tokens.get('test', 0)} ({_split(dataset)}).",
        "",
        f"Languages of the kept documents: {languages}.",
        "",
    ]
    return "\n".join(lines)
