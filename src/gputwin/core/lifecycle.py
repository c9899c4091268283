"""An arm's lifecycle: the one vocabulary of its statuses, and the pure rules that give them.

    QUEUED STARTING TRAINING VALIDATING STOPPED FINISHED CRASHED STALLED   what the live view shows (LIVE)
    RUNNING FINISHED STOPPED FAILED CRASHED NOT_STARTED             an arm between lives (BETWEEN_LIVES)

    last_life(fold) -> status          what the event log says the arm's last life ended as
    between_lives(fold, process)       the launcher's question: may I resume, extend, respawn?
    stalled(fold, now) -> bool         no step for max(60 s, 10 x the mean step time)
    crash_failure(arm, exit_status, stderr_path, cause) -> Failure   why a trainer that left no final event crashed
    describe_exit(status) -> "exit status 1", "killed by signal 9 (SIGKILL)"
    Failure                            why an arm ended badly (a `failed` event, or a crash)

The event fold (gputwin.core.state) gives starting, training, validating, stopped and finished. The rest needs
what the log alone cannot say: whether the process lives and how it exited (the pid and exit files its
supervisor writes, read by gputwin.reading.liveness) and the time. Those arrive here as plain values, so every rule
is a function of (fold, process, now) and is tested without a process.

The two views differ in grain, not in words. The live view says what a running trainer is doing (training,
validating); the launcher only needs to know that one runs (running), and tells a trainer that reported
its own failure (failed) from one that died without a word (crashed). The live view shows both as crashed,
with the failure beside it.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

QUEUED = "queued"  # on a Ray cluster, waiting for a node with the CPUs or GPU it asks for
STARTING, TRAINING, VALIDATING = "starting", "training", "validating"
STOPPED, FINISHED, CRASHED, STALLED = "stopped", "finished", "crashed", "stalled"
RUNNING, FAILED, NOT_STARTED = "running", "failed", "not started"

LIVE = (QUEUED, STARTING, TRAINING, VALIDATING, STOPPED, FINISHED, CRASHED, STALLED)
BETWEEN_LIVES = (RUNNING, FINISHED, STOPPED, FAILED, CRASHED, NOT_STARTED)
ENDED = frozenset({STOPPED, FINISHED, CRASHED})  # live view: the trainer process is gone
LIFE_ENDED = frozenset({FINISHED, STOPPED, FAILED, CRASHED})  # between lives: nothing runs

STALL_MIN_S = 60.0
STALL_STEPS = 10


@dataclass(frozen=True)
class Failure:
    """Why an arm ended badly: from a ``failed`` event, or from a process that died without one."""

    error: str
    message: str
    hint: str = ""
    t: float | None = None


class Fold(Protocol):
    """What the rules read of an arm's fold (gputwin.core.state.ArmState)."""

    status: str
    step: int
    failure: Failure | None
    last_step_t: float | None
    timer: Any


@dataclass(frozen=True)
class Process:
    """What the arm's pid and exit files say, read by gputwin.reading.liveness."""

    alive: bool  # the recorded trainer runs (pid and create time match)
    recorded: bool = False  # a pid or an exit file exists: a trainer was started at some point


def last_life(fold: Fold) -> str:
    """finished / stopped / failed / not started / crashed: how the log's last life ended.

    A life that ran and has no final event (yet) is crashed: killed, out of memory, power lost.
    """
    if fold.status in (FINISHED, STOPPED):
        return fold.status
    if fold.failure is not None:
        return FAILED
    if fold.status in (STARTING, QUEUED) and not fold.step:
        return NOT_STARTED
    return CRASHED


def between_lives(fold: Fold, process: Process) -> str:
    """running, or what the last life ended as; a trainer that left files but no events crashed."""
    if process.alive:
        return RUNNING
    status = last_life(fold)
    if status == NOT_STARTED and process.recorded:
        return CRASHED
    return status


def stalled(fold: Fold, now: float) -> bool:
    """A training arm that has not logged a step for max(STALL_MIN_S, STALL_STEPS x its mean step time)."""
    if fold.last_step_t is None:
        return False
    mean = fold.timer.mean
    limit = max(STALL_MIN_S, STALL_STEPS * mean) if mean is not None else STALL_MIN_S
    return now - fold.last_step_t > limit


def describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"killed by signal {-status} ({signal.Signals(-status).name})"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


def crash_failure(arm: str, exit_status: int | None, stderr_path: Path, cause: str | None = None) -> Failure:
    """The failure shown for a trainer that ended without a final event; `cause` is what the exit file adds
    after the status (an arm on a Ray cluster whose worker or node was lost)."""
    if exit_status is None:
        how = "the trainer process is gone and no exit status was recorded (supervisor killed or machine restarted)"
    elif cause is not None:
        how = f"the trainer ended without a final event: {cause}"
    else:
        how = f"the trainer ended without a final event: {describe_exit(exit_status)}"
    return Failure(
        error="exited" if exit_status is not None and exit_status >= 0 else "killed" if exit_status is not None
        else "gone",
        message=how,
        hint=f"see {stderr_path}; `gputwin resume {arm}` restarts it from its last checkpoint",
        t=None,
    )
