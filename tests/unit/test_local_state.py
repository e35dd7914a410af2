"""The state directory: resources as the API server would hold them, and `llmops status`."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from rich.console import Console

from llmops.cli import main
from llmops.local import state
from llmops.local.context import Context
from llmops.local.status import details, select, status_table

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = list(yaml.safe_load_all((ROOT / "examples" / "quickstart.yaml").read_text()))


class NoView:
    def update(self, key, **fields) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def failure(self, key, log_file: str, tail: str) -> None:
        pass


def test_adopt_fills_metadata_and_bumps_the_generation_on_spec_changes(tmp_path: Path) -> None:
    layout = state.Layout(tmp_path)
    body = state.adopt(layout, QUICKSTART[0])
    meta = body["metadata"]
    assert (meta["namespace"], meta["generation"]) == ("default", 1)
    assert meta["uid"] == state.uid_for("Dataset", "default", "python-stdlib")
    body["status"] = {"phase": "Succeeded", "observedGeneration": 1}
    state.save_object(layout, body)

    again = state.adopt(layout, QUICKSTART[0])
    assert again["metadata"]["generation"] == 1
    assert again["status"]["phase"] == "Succeeded"  # an earlier run's status is kept

    changed = json.loads(json.dumps(QUICKSTART[0]))
    changed["spec"]["sharding"]["tokensPerShard"] = 2048
    bumped = state.adopt(layout, changed)
    assert bumped["metadata"]["generation"] == 2
    assert bumped["metadata"]["uid"] == meta["uid"]


def test_save_writes_status_observed_generation_and_events(tmp_path: Path) -> None:
    layout = state.Layout(tmp_path)
    ctx = Context(layout=layout, view=NoView())
    body = state.adopt(layout, QUICKSTART[1])
    condition = {
        "type": "Complete",
        "status": "True",
        "reason": "TrainingComplete",
        "message": "done",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    ctx.save(body, {"phase": "Succeeded", "conditions": [condition]})
    ctx.save(body, {"phase": "Succeeded", "conditions": [condition]})  # no new transition
    saved = state.load_object(layout, "TrainingRun", "default", "stdlib-gpt")
    assert saved is not None
    assert saved["status"]["observedGeneration"] == 1
    assert saved["status"]["phase"] == "Succeeded"
    events = layout.resource_dir("TrainingRun", "default", "stdlib-gpt") / "events.jsonl"
    assert len(events.read_text().splitlines()) == 1


def test_status_table_and_selection(tmp_path: Path, capsys) -> None:
    layout = state.Layout(tmp_path)
    for doc, status in zip(
        QUICKSTART,
        [
            {"phase": "Succeeded", "documents": 12, "totalTokens": 3400},
            {"phase": "Running", "step": 50, "totalSteps": 200, "metrics": {"trainLoss": 3.5}},
            {"phase": "Ready", "checkpoint": "stdlib-gpt/step-100", "url": "http://127.0.0.1:1/v1"},
        ],
        strict=True,
    ):
        body = state.adopt(layout, doc)
        body["status"] = status
        state.save_object(layout, body)
    objects = list(state.all_objects(layout))
    assert [o["kind"] for o in objects] == ["Dataset", "TrainingRun", "ModelDeployment"]
    assert details(objects[0]) == "12 docs, 3400 tokens"
    assert details(objects[1]) == "step 50/200, loss 3.5"
    assert "http://127.0.0.1:1/v1" in details(objects[2])
    console = Console(width=200, record=True)
    console.print(status_table(objects))
    text = console.export_text()
    assert "python-stdlib" in text and "Running" in text and "Ready" in text
    assert [o["kind"] for o in select(objects, "tr", [])] == ["TrainingRun"]
    assert [o["kind"] for o in select(objects, "stdlib-gpt", [])] == [
        "TrainingRun",
        "ModelDeployment",
    ]

    capsys.readouterr()
    assert main(["get", "ds", "--state-dir", str(tmp_path), "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"]["documents"] == 12
    assert main(["status", "--state-dir", str(tmp_path / "empty")]) == 1


def test_live_view_renders_progress_and_plain_lines_report_changes() -> None:
    from llmops.local.view import RunView

    key = ("TrainingRun", "default", "stdlib-gpt")
    live = Console(width=160, record=True, force_terminal=True)
    with RunView(live, [key], live=True) as view:
        view.update(key, status={"phase": "Running"}, step=50, total=200, loss=3.25)
        view.update(key, tokens_per_second=4560.0, eta=95.0, note="Training")
    text = live.export_text()
    assert "50/200" in text and "3.25" in text and "4,560" in text and "1m35s" in text

    plain = Console(width=160, record=True)
    view = RunView(plain, [key], live=False)
    view.update(key, status={"phase": "Running"})
    view.update(key, status={"phase": "Running"})  # nothing new: no line
    view.update(key, status={"phase": "Succeeded"})
    lines = plain.export_text().splitlines()
    assert lines == ["TrainingRun/stdlib-gpt  Running", "TrainingRun/stdlib-gpt  Succeeded"]
