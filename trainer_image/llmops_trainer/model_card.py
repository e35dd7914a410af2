"""The model card: a markdown page with what was trained, on what, how, and how well."""

from __future__ import annotations

import json
from typing import Any

_BARS = " ▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """A one-line curve, so the card shows the shape of training without images."""
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(_BARS[round((v - low) / span * (len(_BARS) - 1))] for v in values)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _summary(model: dict[str, Any], objective: str) -> str:
    shape = (
        f"{model['num_layers']}-layer, {model['hidden_size']}-wide "
        f"{model.get('architecture', 'transformer')} ({model['parameters']:,} parameters)"
    )
    if "pretrained" not in model:
        return f"A {shape} trained with the `{objective}` objective by llmops."
    adapter = model.get("adapter")
    how = f"with LoRA adapters (rank {adapter['rank']})" if adapter else "in full"
    return (
        f"`{model['pretrained']}`, a {shape}, fine-tuned {how} with the `{objective}` "
        "objective by llmops."
    )


def render(
    name: str,
    spec: dict[str, Any],
    dataset: dict[str, Any],
    model: dict[str, Any],
    history: list[dict[str, Any]],
    final: dict[str, Any],
    worst: list[dict[str, Any]],
    examples: list[dict[str, str]],
    benchmarks: list[dict[str, Any]] | None = None,
) -> str:
    train = [h for h in history if h.get("trainLoss") is not None]
    val = [h for h in history if h.get("valLoss") is not None]
    lines = [
        f"# {name}",
        "",
        _summary(model, spec["model"]["objective"]),
        "",
        "## Data",
        "",
        f"- Dataset: `{dataset['name']}`, fingerprint `{dataset['fingerprint']}`",
        f"- Vocabulary: {dataset['vocab_size']} tokens; supervised: {dataset['supervised']}"
        + (" (mixed with plain text)" if dataset.get("mixed") else ""),
        f"- Training tokens seen: {_fmt(final.get('tokensSeen'))}",
        "",
        "## Training curves",
        "",
    ]
    if train:
        lines += [
            f"Training loss, step {train[0]['step']} to {train[-1]['step']}: "
            f"`{sparkline([h['trainLoss'] for h in train])}` "
            f"({_fmt(train[0]['trainLoss'])} -> {_fmt(train[-1]['trainLoss'])})",
            "",
        ]
    for key, what in (("trainLossText", "plain text"), ("trainLossSupervised", "supervised")):
        part = [h for h in train if h.get(key) is not None]  # a mixed dataset's two losses
        if part:
            lines += [
                f"Training loss on {what} tokens: `{sparkline([h[key] for h in part])}` "
                f"({_fmt(part[0][key])} -> {_fmt(part[-1][key])})",
                "",
            ]
    if val:
        lines += [
            "| step | validation loss | perplexity | accuracy |",
            "|---:|---:|---:|---:|",
            *(
                f"| {h['step']} | {_fmt(h['valLoss'])} | {_fmt(h.get('perplexity'))} "
                f"| {_fmt(h.get('accuracy'))} |"
                for h in val
            ),
            "",
        ]
    lines += ["## Final evaluation", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in final.items()]
    lines.append("")
    lines += _benchmarks(benchmarks or [])
    if examples:
        lines += ["## Generation examples", ""]
        for example in examples:
            lines += [
                f"- prompt: `{example['prompt'][:200]}`",
                f"  - generated: `{example['generated'][:200]}`",
                f"  - reference: `{example['reference'][:200]}`",
            ]
        lines.append("")
    if worst:
        lines += ["## Worst-predicted held-out passages", "", "| loss | passage |", "|---:|---|"]
        for item in worst:
            text = item["text"].replace("|", "\\|").replace("\n", " ")[:200]
            lines.append(f"| {_fmt(item['loss'])} | {text} |")
        lines.append("")
    lines += [
        "## Configuration",
        "",
        "```json",
        json.dumps(spec, indent=2, sort_keys=True),
        "```",
        "",
        "## Limitations",
        "",
        "Trained only on the dataset above; it reproduces its biases and knows nothing else. "
        + (
            "The final evaluation is on held-out splits of the same data; the benchmarks above "
            "are only as independent as their task data."
            if benchmarks
            else "Metrics are on held-out splits of the same data, not on an independent benchmark."
        ),
        "",
    ]
    return "\n".join(lines)


def _benchmarks(results: list[dict[str, Any]]) -> list[str]:
    """Scores (lm-evaluation-harness) and, for a group, each task's metrics."""
    if not results:
        return []
    lines = [
        "## Benchmarks",
        "",
        "Scored with EleutherAI's lm-evaluation-harness on the exported model.",
        "",
        "| benchmark | metric | value | stderr | documents | few-shot |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for result in results:
        score = result["score"]
        lines.append(
            f"| {result['name']} | {score['metric']} | {_fmt(score['value'])} "
            f"| {_fmt(score.get('stderr'))} | {_fmt(score.get('samples'))} "
            f"| {_fmt(result.get('numFewshot'))} |"
        )
    lines.append("")
    for result in results:
        tasks = result.get("tasks") or {}
        if len(tasks) < 2:
            continue
        lines += [f"### {result['name']} by task", "", "| task | metric | value |"]
        lines.append("|---|---|---:|")
        for task, metrics in sorted(tasks.items()):
            lines += [
                f"| {task} | {metric} | {_fmt(value)} |"
                for metric, value in sorted(metrics.items())
                if "_stderr" not in metric
            ]
        lines.append("")
    return lines
