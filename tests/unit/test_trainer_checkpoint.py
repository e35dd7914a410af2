from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("numpy")

from llmops_trainer import checkpoint


def save(root: Path, step: int, payload: bytes = b"weights") -> Path:
    partial = root / checkpoint.partial_name(step)
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(payload)
    checkpoint.write_state(partial, {"step": step})
    checkpoint.seal(partial)
    return checkpoint.publish(root, step)


def test_publish_makes_a_verified_checkpoint_latest(tmp_path: Path) -> None:
    folder = save(tmp_path, 10)
    assert folder.name == "step-10" and checkpoint.problems(folder) == []
    assert checkpoint.read_pointer(tmp_path, "latest") == "step-10"
    assert checkpoint.read_state(folder) == {"step": 10}
    assert not list(tmp_path.glob(".partial-*"))


def test_corrupt_latest_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    save(tmp_path, 10)
    newest = save(tmp_path, 20)
    (newest / "mp_rank_00_model_states.pt").write_bytes(b"weightz")
    log: list[str] = []
    assert checkpoint.find_resumable(tmp_path, log) == tmp_path / "step-10"
    assert log == ["step-20/mp_rank_00_model_states.pt: checksum mismatch"]


def test_unfinished_and_missing_files_are_not_resumable(tmp_path: Path) -> None:
    save(tmp_path, 10)
    (tmp_path / "step-30").mkdir()  # no index: never finished
    broken = save(tmp_path, 20)
    (broken / "mp_rank_00_model_states.pt").unlink()
    assert checkpoint.find_resumable(tmp_path) == tmp_path / "step-10"
    assert checkpoint.find_resumable(tmp_path / "nothing-here") is None


def test_latest_pointer_wins_over_a_newer_folder(tmp_path: Path) -> None:
    save(tmp_path, 10)
    save(tmp_path, 20)
    checkpoint.write_pointer(tmp_path, "latest", "step-10")
    assert checkpoint.find_resumable(tmp_path) == tmp_path / "step-10"


def test_retention_keeps_the_last_k_and_the_best(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40, 50):
        save(tmp_path, step)
    checkpoint.write_pointer(tmp_path, "best", "step-20")
    deleted = checkpoint.retain(tmp_path, keep_last=2)
    assert sorted(p.name for p in deleted) == ["step-10", "step-30"]
    assert [p.name for _, p in checkpoint.published(tmp_path)] == ["step-50", "step-40", "step-20"]


def test_partials_are_cleaned_and_names_resolve(tmp_path: Path) -> None:
    save(tmp_path, 10)
    (tmp_path / ".partial-step-20").mkdir()
    checkpoint.clean_partials(tmp_path)
    assert not (tmp_path / ".partial-step-20").exists()
    assert checkpoint.resolve(tmp_path / "latest") == tmp_path / "step-10"
    assert checkpoint.resolve(tmp_path) == tmp_path / "step-10"
    assert checkpoint.resolve(tmp_path / "step-10") == tmp_path / "step-10"
