"""The event schema: one JSON object a line in ``<arm>/events.jsonl``.

This is the contract between the trainer and everything that reads its log (UI, ``status``,
reports, users' own scripts). docs/events.md documents every kind and field.

Every event carries ``v`` (schema version), ``t`` (unix seconds) and ``kind``.
Readers skip kinds they do not know and report lines from a newer schema instead of crashing.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

STARTED = "started"
STEP = "step"
CHECKPOINT = "checkpoint"
MILESTONE = "milestone"
VALIDATION = "validation"
EXTENDED = "extended"
STOPPED = "stopped"
FINISHED = "finished"
FAILED = "failed"
RESUMED = "resumed"
PROBE = "probe"  # a cooldown probe's validation: the arm as if its schedule ended at `step`
QUEUED = "queued"  # on a Ray cluster: the arm waits in the cluster's queue for its CPUs or GPU (docs/cluster.md)
PLACED = "placed"  # on a Ray cluster: the arm has its node; the trainer starts there

KINDS = frozenset(
    {STARTED, STEP, CHECKPOINT, MILESTONE, VALIDATION, EXTENDED, STOPPED, FINISHED, FAILED, RESUMED, PROBE,
     QUEUED, PLACED}
)
TERMINAL_KINDS = frozenset({STOPPED, FINISHED, FAILED})

# Fields every event of a kind must carry (beyond v, t, kind). Extra fields are allowed.
REQUIRED: dict[str, tuple[str, ...]] = {
    STARTED: ("arm", "pid", "device", "samples", "steps_per_epoch", "total_steps", "milestone_step"),
    STEP: ("step", "epoch", "loss", "lr"),
    CHECKPOINT: ("step", "path"),
    MILESTONE: ("step",),
    VALIDATION: ("step", "precision", "recall", "f1"),
    EXTENDED: ("step", "epochs", "total_steps"),
    STOPPED: ("step",),
    FINISHED: ("step",),
    FAILED: ("error", "message", "hint"),
    RESUMED: ("step", "checkpoint"),
    PROBE: ("step", "steps"),
    QUEUED: ("arm",),
    PLACED: ("arm", "node"),
}


class EventError(ValueError):
    """A line that is not a valid event; the message says why."""


@dataclass(frozen=True)
class Event:
    """One parsed event; ``data`` holds every field of the JSON object."""

    kind: str
    t: float
    data: dict[str, Any] = field(repr=False)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: encode them as strings so lines stay valid JSON everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def make(kind: str, *, t: float | None = None, **fields: Any) -> dict[str, Any]:
    """Build an event dict, checking the required fields are present."""
    if kind not in KINDS:
        raise EventError(f"unknown event kind {kind!r}")
    missing = [f for f in REQUIRED[kind] if f not in fields]
    if missing:
        raise EventError(f"{kind} event is missing {', '.join(missing)}")
    return {"v": SCHEMA_VERSION, "t": time.time() if t is None else t, "kind": kind, **_clean(fields)}


def dumps(event: dict[str, Any]) -> str:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


def parse(line: str | bytes) -> Event:
    """Parse one log line; raises EventError with the reason on anything malformed."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EventError(f"not JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(obj, dict):
        raise EventError("not a JSON object")
    version = obj.get("v")
    if not isinstance(version, int):
        raise EventError("no schema version 'v'")
    if version > SCHEMA_VERSION:
        raise EventError(f"schema version {version} is newer than this gputwin reads ({SCHEMA_VERSION}); upgrade gputwin")
    kind = obj.get("kind")
    t = obj.get("t")
    if not isinstance(kind, str) or not isinstance(t, (int, float)):
        raise EventError("missing 'kind' or 't'")
    if kind in REQUIRED:
        missing = [f for f in REQUIRED[kind] if f not in obj]
        if missing:
            raise EventError(f"{kind} event is missing {', '.join(missing)}")
    return Event(kind=kind, t=float(t), data=obj)


@dataclass
class ReadResult:
    events: list[Event]
    bad_lines: list[tuple[int, str]]  # (line number, reason)


def read_events(path: Path) -> ReadResult:
    """Read a whole log at once (reports, tests). Live readers use the incremental tailer."""
    events: list[Event] = []
    bad: list[tuple[int, str]] = []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ReadResult(events, bad)
    lines = data.split(b"\n")
    if not data.endswith(b"\n"):
        lines = lines[:-1]  # a partial last line is still being written
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            events.append(parse(line))
        except EventError as exc:
            bad.append((number, str(exc)))
    return ReadResult(events, bad)
