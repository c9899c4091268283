"""Messages from the file-reading thread to the UI: small, and each owned by the UI once posted."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual.message import Message

from ...core.state import ExperimentState


@dataclass
class StateUpdated(Message):
    """A copy of the experiment state after a change (the watcher keeps mutating its own)."""

    state: ExperimentState
    changed: frozenset[str]
    applied: list[str]  # verdict actions recorded in actions.jsonl, one line each


@dataclass
class LogTailRead(Message):
    """The latest lines of an arm's stderr.log, for the log view."""

    arm: str
    path: Path
    lines: list[str]
