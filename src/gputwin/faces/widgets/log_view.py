"""The focused arm's stderr tail, shown under the panes while toggled on (key l)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from textual.widgets import Log

from ..formatting import display_path


class LogView(Log):
    """Replaces its lines only when the tail changed, so scrolling back is not lost on every poll."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, highlight=False, max_lines=2000)
        self._shown: tuple[str, tuple[str, ...]] | None = None

    def show_tail(self, arm: str, path: Path, lines: Sequence[str]) -> None:
        key = (arm, tuple(lines))
        self.border_title = f"stderr · {arm}"
        self.border_subtitle = f"{display_path(path)} · last {len(lines)} line(s) · l hides"
        if key == self._shown:
            return
        self._shown = key
        self.clear()
        if lines:
            self.write_lines(lines)
        else:
            self.write_line(f"({path.name} is empty or not written yet)")
