"""The training curve as a PNG (train and validation loss by step), when matplotlib is
installed (`pip install llmops[local]`)."""

from __future__ import annotations

from pathlib import Path

from llmops.api.workload import read_metrics_history


def read_metrics(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (step, validation loss) pairs of a metrics history."""
    entries = read_metrics_history(path.read_text()) if path.is_file() else []
    train = [(e.step, e.train_loss) for e in entries if e.train_loss is not None]
    validation = [(e.step, e.val_loss) for e in entries if e.val_loss is not None]
    return train, validation


def training_curve(metrics: Path, target: Path) -> str:
    """Writes the plot; returns what to tell the user."""
    train, validation = read_metrics(metrics)
    if not train:
        return f"no training curve: {metrics} has no loss values"
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return "no training curve: matplotlib is not installed (pip install 'llmops[local]')"
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(*zip(*train, strict=True), label="train loss")
    if validation:
        axes.plot(*zip(*validation, strict=True), marker="o", label="validation loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return f"training curve: {target}"
