"""`llmops status` / `llmops get`: the resources of the state directory as a table (the
columns `kubectl get` shows for each kind, in one table), or as YAML/JSON."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from llmops.local import state
from llmops.local.view import PHASE_STYLE, duration, number

SHORT_NAMES = {
    "dset": "Dataset",
    "ds": "Dataset",  # accepted as before; `dset` is the cluster's short name
    "dataset": "Dataset",
    "datasets": "Dataset",
    "tr": "TrainingRun",
    "trainingrun": "TrainingRun",
    "trainingruns": "TrainingRun",
    "md": "ModelDeployment",
    "modeldeployment": "ModelDeployment",
    "modeldeployments": "ModelDeployment",
    "sw": "Sweep",
    "sweep": "Sweep",
    "sweeps": "Sweep",
}


def details(body: Mapping[str, Any]) -> str:
    status = body.get("status") or {}
    kind = body["kind"]
    if kind == "Dataset":
        parts = []
        if status.get("documents") is not None:
            parts.append(f"{status['documents']} docs")
        if status.get("totalTokens") is not None:
            parts.append(f"{status['totalTokens']} tokens")
        if status.get("outputUri"):
            parts.append(str(status["outputUri"]))
        return ", ".join(parts)
    if kind == "TrainingRun":
        parts = []
        if status.get("totalSteps"):
            parts.append(f"step {status.get('step', 0)}/{status['totalSteps']}")
        metrics = status.get("metrics") or {}
        if metrics.get("trainLoss") is not None:
            parts.append(f"loss {number(metrics['trainLoss'])}")
        final = status.get("finalEvaluation") or {}
        perplexity = final.get("perplexity") or metrics.get("perplexity")
        if perplexity is not None:
            parts.append(f"ppl {number(perplexity)}")
        if status.get("estimatedRemainingSeconds") and status.get("phase") == "Running":
            parts.append(f"ETA {duration(status['estimatedRemainingSeconds'])}")
        return ", ".join(parts)
    if kind == "Sweep":
        return sweep_details(status)
    parts = [str(status.get("checkpoint") or "")]
    if status.get("url") and status.get("phase") == "Ready":
        parts.append(str(status["url"]))
    return " ".join(p for p in parts if p)


def sweep_details(status: Mapping[str, Any]) -> str:
    """Trials finished and the best value (with crossValidation: mean ± stdev of folds)."""
    parts = []
    trials = status.get("trials") or {}
    if trials:
        parts.append(f"{trials.get('finished', 0)} trial(s) finished")
    best = status.get("bestTrial") or {}
    if best.get("value") is not None:
        spread = f" ± {number(best['stdev'])}" if best.get("stdev") is not None else ""
        parts.append(f"best {best['name']}: {number(best['value'])}{spread}")
    return ", ".join(parts)


def last_message(body: Mapping[str, Any]) -> str:
    """The message of the most recent condition transition that has one."""
    conditions = sorted(
        (c for c in (body.get("status") or {}).get("conditions") or [] if c.get("message")),
        key=lambda c: str(c.get("lastTransitionTime", "")),
    )
    return str(conditions[-1]["message"]) if conditions else ""


def status_table(objects: Iterable[Mapping[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("KIND", "NAME", "PHASE", "DETAILS", "MESSAGE"):
        table.add_column(column, overflow="fold")
    for body in objects:
        phase = str((body.get("status") or {}).get("phase") or "Pending")
        table.add_row(
            body["kind"],
            body["metadata"]["name"],
            Text(phase, style=PHASE_STYLE.get(phase, "")),
            details(body),
            last_message(body),
        )
    return table


def select(
    objects: Iterable[dict[str, Any]], kind: str | None, names: list[str]
) -> list[dict[str, Any]]:
    wanted = SHORT_NAMES.get(kind.lower()) if kind else None
    if kind and wanted is None:
        # `llmops get NAME`: the first word is a name, not a kind.
        names = [kind, *names]
    return [
        o
        for o in objects
        if (wanted is None or o["kind"] == wanted) and (not names or o["metadata"]["name"] in names)
    ]


def show(
    state_dir: Path,
    kind: str | None = None,
    names: list[str] | None = None,
    output: str = "table",
    console: Console | None = None,
) -> int:
    console = console or Console()
    layout = state.Layout(state_dir.resolve())
    objects = select(state.all_objects(layout), kind, names or [])
    if output == "json":
        print(json.dumps(objects if len(objects) != 1 else objects[0], indent=2, default=str))
    elif output == "yaml":
        print(yaml.safe_dump_all(objects, sort_keys=False), end="")
    elif not objects:
        console.print(f"no resources in {layout.root} (run `llmops run -f FILE` first)")
        return 1
    else:
        console.print(status_table(objects))
    return 0
