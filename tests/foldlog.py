"""A realistic event log, and a way to compare two folds of it, for the saved-fold tests."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gputwin.core import events as ev
from gputwin.core import state as st

BAD_LINE = "this line is not an event\n"


def _line(kind: str, t: float, **fields: Any) -> str:
    return ev.dumps(ev.make(kind, t=t, **fields)) + "\n"


def _steps(first: int, last: int, t: float) -> tuple[list[str], float]:
    lines = []
    for step in range(first, last + 1):
        t += 0.5 + (step % 7) * 0.01
        loss: float = 2.5 * math.exp(-step / 400) + 0.1 * (step % 5) / 5
        if step == 333:
            loss = math.nan  # written as "nan": kept, never poisons the curve
        lines.append(_line(ev.STEP, t, step=step, epoch=round(step / 600, 6), loss=loss, lr=1e-4 * (1 - step / 2000),
                           grad_norm=0.9, tokens_per_s=4800.0))
        if step % 250 == 0:
            lines.append(_line(ev.CHECKPOINT, t + 0.1, step=step, path=f"/runs/a/checkpoints/step-{step:06d}"))
            t += 0.2
    return lines, t


def realistic_lines(arm: str = "a") -> list[str]:
    """About 1,500 lines as a trainer writes them: steps past 512 loss buckets, checkpoints, the milestone and
    its validation, a stop, a resume from an earlier checkpoint (steps logged again), an extension, a
    bad line, a failure, another resume and the end."""
    t = 1_767_600_000.0
    started = {"arm": arm, "pid": 11, "device": "cuda:0 NVIDIA H200", "samples": 2400, "steps_per_epoch": 600,
               "milestone_step": 600}
    lines = [_line(ev.STARTED, t, total_steps=1200, step=0, **started)]
    more, t = _steps(1, 600, t)
    lines += more
    lines += [_line(ev.MILESTONE, t + 0.1, step=600),
              _line(ev.VALIDATION, t + 5, step=600, precision=0.81, recall=0.77, f1=0.79, sample_size=500)]
    more, t = _steps(601, 720, t + 6)
    lines += more + [_line(ev.STOPPED, t + 1, step=720, reason="request", by="cli")]
    t += 60
    lines += [_line(ev.STARTED, t, total_steps=1200, step=500, **{**started, "pid": 12}),
              _line(ev.RESUMED, t + 1, step=500, checkpoint="/runs/a/checkpoints/step-000500"),
              _line(ev.EXTENDED, t + 2, step=500, epochs=3.0, total_steps=1800)]
    more, t = _steps(501, 900, t + 2)
    lines += more[:150] + [BAD_LINE] + more[150:]
    lines.append(_line(ev.FAILED, t + 1, error="OutOfMemory", message="CUDA out of memory", hint="lower batch_size",
                       step=900))
    t += 30
    lines += [_line(ev.STARTED, t, total_steps=1800, step=750, **{**started, "pid": 13}),
              _line(ev.RESUMED, t + 1, step=750, checkpoint="/runs/a/checkpoints/step-000750")]
    more, t = _steps(751, 1100, t + 1)
    return lines + more + [_line(ev.FINISHED, t + 1, step=1100)]


def comparable(value: Any) -> str:
    """A fold as text, every attribute included (the loss curve's and the step timer's too): two folds of
    the same events give the same text. NaN compares equal to itself here."""
    return repr(_plain(value))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "__slots__"):
        return {name: _plain(getattr(value, name)) for name in value.__slots__}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def whole_fold(path: Any, name: str = "a") -> st.ArmState:
    """The fold of a whole log read at once, bad lines included, as a reader without a saved fold makes it."""
    result = ev.read_events(path)
    state = st.fold(name, result.events)
    state.add_bad_lines(result.bad_lines)
    return state
