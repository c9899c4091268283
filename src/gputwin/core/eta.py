"""Step timing and ETA, pure and with an injected clock.

    StepTimer                      incremental mean step time: warm-up steps after each (re)start and
                                   intervals that contain a pause (checkpoint, milestone, validation) excluded
    mean_step_seconds(steps, ...)  the same over a list of (step, t) pairs, for scripts and tests
    eta(state, target_step, now)   -> Eta(seconds, clock "14:32", human "1h 12m") or None
    human_duration(seconds)        "45s", "12m 05s", "1h 12m", "2d 3h"
    clock_time(t, now)             "14:32"; "Tue 14:32" when not today; a date when over a week away

The mean is taken over the whole run after warm-up (as nanoGPT does), so one slow step or a pause
never makes the estimate jump.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Protocol

WARMUP_STEPS = 10  # first steps after a (re)start: compilation, allocator and cache warm-up


class StepTimer:
    """Running mean of seconds per step, O(1) per observation.

    Feed it every step event (``observe``) and tell it about pauses (``pause``) and restarts
    (``restart``); the interval that spans a pause or a restart is not counted.
    """

    __slots__ = ("warmup", "_last_step", "_last_t", "_skip_next", "_seen", "_sum", "_steps")

    def __init__(self, warmup: int = WARMUP_STEPS) -> None:
        self.warmup = warmup
        self._last_step: int | None = None
        self._last_t = 0.0
        self._skip_next = False
        self._seen = 0  # step events since the last restart
        self._sum = 0.0  # seconds counted
        self._steps = 0  # steps counted

    def observe(self, step: int, t: float) -> None:
        last = self._last_step
        self._seen += 1
        if last is not None and step > last and not self._skip_next and self._seen > self.warmup:
            dt = t - self._last_t
            if dt >= 0:
                self._sum += dt
                self._steps += step - last
        self._skip_next = False
        self._last_step = step
        self._last_t = t

    def pause(self) -> None:
        """Something other than training happened since the last step (checkpoint, validation)."""
        self._skip_next = True

    def restart(self) -> None:
        """A new trainer process started: warm-up again, and never bridge the gap."""
        self._last_step = None
        self._seen = 0
        self._skip_next = False

    @property
    def mean(self) -> float | None:
        """Seconds per step, or None before the first post-warm-up interval."""
        return self._sum / self._steps if self._steps else None

    @property
    def counted_steps(self) -> int:
        return self._steps


def mean_step_seconds(
    steps: Iterable[tuple[int, float]], pauses_after: Iterable[int] = (), warmup: int = WARMUP_STEPS
) -> float | None:
    """Mean seconds per step from (step, t) pairs of one trainer run.

    ``pauses_after`` lists steps after which training paused (checkpoint, validation); the
    interval that follows each is left out, as are the first ``warmup`` steps.
    """
    paused = set(pauses_after)
    timer = StepTimer(warmup)
    for step, t in steps:
        timer.observe(step, t)
        if step in paused:
            timer.pause()
    return timer.mean


@dataclass(frozen=True)
class Eta:
    """When a target step will be reached: seconds from now, wall-clock time, and a short duration."""

    seconds: float
    clock: str
    human: str


def human_duration(seconds: float) -> str:
    """Short, rounded duration for a status line."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m {s:02d}s" if m < 10 else f"{m}m"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h {m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d {h}h"


def clock_time(t: float, now: float) -> str:
    """Local "HH:MM" today; "Tue 14:32" within a week of ``now``; "2026-01-05 14:32" further away."""
    at, today = time.localtime(t), time.localtime(now)
    if (at.tm_year, at.tm_yday) == (today.tm_year, today.tm_yday):
        return time.strftime("%H:%M", at)
    if abs(t - now) < 6 * 86400:
        return time.strftime("%a %H:%M", at)
    return time.strftime("%Y-%m-%d %H:%M", at)


class Progress(Protocol):
    """What an ETA needs of an arm (state.ArmState has it), so this module stays below the state it serves."""

    step: int
    status: str
    timer: StepTimer
    last_step_t: float | None


def eta(state: Progress, target_step: int | None, now: float) -> Eta | None:
    """Estimated time ``state``'s arm reaches ``target_step``.

    None when it cannot be known: no target, not training, or no mean step time yet. A target
    already reached gives zero seconds.
    """
    if target_step is None:
        return None
    remaining_steps = target_step - state.step
    if remaining_steps <= 0:
        return Eta(0.0, clock_time(now, now), "0s")
    if state.status not in ("training", "stalled", "validating"):
        return None
    mean = state.timer.mean
    if mean is None or not math.isfinite(mean):
        return None
    # Count down from the last step seen, but by at most one step: a stalled arm keeps a sane
    # estimate instead of sliding to zero.
    since_step = 0.0 if state.last_step_t is None else max(0.0, now - state.last_step_t)
    seconds = max(0.0, remaining_steps * mean - min(since_step, mean))
    finish = now + seconds
    return Eta(seconds, clock_time(finish, now), human_duration(seconds))
