"""What the user sees during `llmops run`: a live table per resource (phase, step/total,
loss, tokens/s, ETA) on a terminal, plain progress lines otherwise (CI logs, pipes)."""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from llmops.local.context import Key

PLAIN_PROGRESS_SECONDS = 10.0
PHASE_STYLE = {
    "Succeeded": "green",
    "Ready": "green",
    "Failed": "red",
    "Running": "cyan",
    "Deploying": "cyan",
    "Suspended": "yellow",
    "Restarting": "yellow",
}


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def number(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


class RunView:
    def __init__(self, console: Console, keys: list[Key], *, live: bool | None = None) -> None:
        self.console = console
        self.rows: dict[Key, dict[str, Any]] = {key: {} for key in keys}
        self.live_mode = console.is_terminal if live is None else live
        self.lock = threading.RLock()
        self._live: Live | None = None
        self._printed: dict[Key, tuple[Any, ...]] = {}
        self._printed_at: dict[Key, float] = {}

    def __enter__(self) -> RunView:
        if self.live_mode:
            self._live = Live(
                self.render(), console=self.console, refresh_per_second=4, transient=False
            )
            self._live.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.update(self.render())
            self._live.__exit__(kind, error, trace)
            self._live = None

    def update(self, key: Key, **fields: Any) -> None:
        with self.lock:
            row = self.rows.setdefault(key, {})
            status = fields.pop("status", None)
            if status is not None:
                row["phase"] = status.get("phase")
            row.update(fields)
            if self._live is not None:
                self._live.update(self.render())
            else:
                self._plain(key, row)

    def message(self, text: str) -> None:
        with self.lock:
            self.console.print(text)

    def failure(self, key: Key, log_file: str, tail: str) -> None:
        with self.lock:
            title = f"{key[0]}/{key[2]} failed" + (f" — log: {log_file}" if log_file else "")
            self.console.print(Panel(Text(tail or "(no output)"), title=title, style="red"))

    def _plain(self, key: Key, row: dict[str, Any]) -> None:
        """One line per phase or note change, progress at most every few seconds."""
        identity = (row.get("phase"), row.get("note"))
        now = time.monotonic()
        changed = self._printed.get(key) != identity
        due = "step" in row and now - self._printed_at.get(key, 0.0) >= PLAIN_PROGRESS_SECONDS
        if not changed and not due:
            return
        self._printed[key] = identity
        self._printed_at[key] = now
        parts = [f"{key[0]}/{key[2]}", str(row.get("phase") or "Pending")]
        if row.get("total"):
            parts.append(f"step {row.get('step', 0)}/{row['total']}")
        if row.get("loss") is not None:
            parts.append(f"loss {number(row['loss'])}")
        if row.get("tokens_per_second") is not None:
            parts.append(f"{number(row['tokens_per_second'])} tok/s")
        if row.get("eta") is not None:
            parts.append(f"ETA {duration(row['eta'])}")
        if row.get("note"):
            parts.append(f"— {row['note']}")
        self.console.print("  ".join(parts), highlight=False, soft_wrap=True)

    def render(self) -> Group:
        table = Table(expand=False, box=None, header_style="bold")
        for column in ("RESOURCE", "PHASE", "STEP", "LOSS", "TOK/S", "ETA", ""):
            table.add_column(column)
        for key, row in self.rows.items():
            phase = str(row.get("phase") or "Pending")
            step = f"{row.get('step', 0)}/{row['total']}" if row.get("total") else ""
            table.add_row(
                f"{key[0]}/{key[2]}",
                Text(phase, style=PHASE_STYLE.get(phase, "")),
                step,
                number(row.get("loss")),
                number(row.get("tokens_per_second")),
                duration(row.get("eta")),
                str(row.get("note") or ""),
            )
        return Group(table)
