"""The reading side of the UI, run in a worker thread: the experiment's files, the verdict actions
already taken, and the stderr tail of the arm whose log is open.

No Textual here: the app's worker calls it and posts what it returns. The watcher mutates its state
in place, so the UI only ever gets deep copies.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

from ...control.launcher import ACTIONS_FILE, read_actions
from ...core.paths import ExperimentPaths
from ...core.state import ExperimentState
from ...reading import watcher
from ...reading.watcher import ExperimentWatcher

LOG_LINES = 200  # stderr lines the log view shows
LOG_TAIL_BYTES = 64 * 1024


def read_tail(path: Path, lines: int = LOG_LINES) -> list[str]:
    """The last `lines` lines of a text file that may be growing; [] when it is not there."""
    return watcher.read_tail(path, lines, LOG_TAIL_BYTES)


def action_line(entry: dict[str, Any]) -> str:
    """One line of actions.jsonl as the verdict pane lists it."""
    epochs = f" by {entry['epochs']} epoch(s)" if entry.get("action") == "extend" and entry.get("epochs") else ""
    return f"{entry.get('action')} {entry.get('arm')}{epochs} (by {entry.get('by')})"


def _signature(path: Path) -> tuple[int, float] | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_size, info.st_mtime


class ExperimentFeed:
    """Call ``poll()`` as often as you like; ``snapshot()`` when it said something changed."""

    def __init__(self, exp: ExperimentPaths, clock: Callable[[], float]) -> None:
        self.exp = exp
        self.watcher = ExperimentWatcher(exp, clock)
        self.applied: list[str] = []  # verdict actions recorded in actions.jsonl
        self._actions_sig: tuple[int, float] | None = None
        self._log_sig: tuple[str, tuple[int, float] | None] | None = None

    def poll(self) -> set[str]:
        """Arm names whose state changed; "" stands for the experiment (actions taken)."""
        changed = set(self.watcher.poll())
        if self.watcher.state.verdict is not None:
            signature = _signature(self.exp.root / ACTIONS_FILE)
            if signature != self._actions_sig:
                self._actions_sig = signature
                self.applied = [action_line(a) for a in read_actions(self.exp)]
                changed.add("")
        return changed

    def snapshot(self) -> tuple[ExperimentState, list[str]]:
        """A copy the UI thread owns: the watcher goes on changing its own (about 1.5 ms a copy)."""
        return copy.deepcopy(self.watcher.state), list(self.applied)

    def news(self) -> tuple[Any, ...]:
        """What a user waits to see at once, not at the next timed update: each arm's status, its
        validations, extensions and restarts, and the verdict actions taken. New steps are not news."""
        arms = tuple((name, a.status, len(a.validations), len(a.extended), a.restarts, a.failure is not None)
                     for name, a in self.watcher.state.arms.items())
        return arms, len(self.applied)

    def stderr_tail(self, arm: str | None) -> tuple[Path, list[str]] | None:
        """The arm's stderr tail when it (or the arm asked for) changed since the last call, else None."""
        if arm is None:
            self._log_sig = None
            return None
        path = self.exp.arm(arm).stderr
        signature = (arm, _signature(path))
        if signature == self._log_sig:
            return None
        self._log_sig = signature
        return path, read_tail(path)
