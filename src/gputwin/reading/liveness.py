"""Whether an arm's trainer still lives, from the pid and exit files its supervisor writes.

    read_pid(arm) -> (pid, create_time) | None     read_exit(arm) -> status | None
    read_exit_cause(arm) -> words | None           (an arm on a Ray cluster: "its node left the cluster ...")
    process_alive(pid, create_time | None)

Readers (the watcher, `status`) and the supervisor both need these; they live below both so that reading
an experiment never imports the code that starts and steers trainers.
"""

from __future__ import annotations

import psutil

from ..core.paths import ArmPaths

CREATE_TIME_SLACK_S = 0.05


def read_pid(arm: ArmPaths) -> tuple[int, float] | None:
    """``(pid, create_time)`` from the pid file, or None when absent or unreadable."""
    try:
        pid_text, created_text = arm.pid.read_text().split()[:2]
        return int(pid_text), float(created_text)
    except (OSError, ValueError):
        return None


def read_exit(arm: ArmPaths) -> int | None:
    """The trainer's exit status as the supervisor recorded it (negative = signal)."""
    try:
        return int(arm.exit.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_exit_cause(arm: ArmPaths) -> str | None:
    """What follows the status in the exit file: why a trainer that could not report its own end ended.

    The local supervisor writes the status alone; the mirror of an arm on a Ray cluster (gputwin.control.ray_backend)
    adds the cause when the worker or the node under the trainer was lost."""
    try:
        parts = arm.exit.read_text(encoding="utf-8").split(None, 1)
    except (OSError, UnicodeDecodeError):
        return None
    return parts[1].strip() or None if len(parts) > 1 else None


def process_alive(pid: int, create_time: float | None) -> bool:
    """True when `pid` is running (a zombie is not) and is the very process that was recorded (not a reused
    pid); create_time None: any process under that pid."""
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > CREATE_TIME_SLACK_S:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
