"""The per-arm supervisor: ``python -m gputwin.supervise ARM_DIR [-- COMMAND...]``.

The launcher starts one supervisor per arm in a session of its own; the supervisor runs the
trainer (``python -m gputwin.train ARM_DIR`` unless a command follows ``--``) as its child,
records ``"<pid> <create_time>"`` of the trainer in ``ARM_DIR/pid``, waits, and writes the
trainer's exit status to ``ARM_DIR/exit`` (negative = killed by that signal). Because the
supervisor waits on the trainer, even ``kill -9`` of the trainer is recorded. If the supervisor
itself dies, readers fall back to checking the pid file against the live process table.

This module also holds the launcher's side of that contract (spawn, liveness), so both ends
of the pid/exit files live in one place.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import psutil

from .paths import ArmPaths

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
EXEC_FAILED = 127  # exit status recorded when the trainer could not be started at all
PID_WAIT_S = 30.0  # how long the launcher waits for a fresh supervisor to report the trainer's pid
CREATE_TIME_SLACK_S = 0.05

# Supervisors this process started; kept so they are reaped (no zombies, no ResourceWarning).
_supervisors: list[subprocess.Popen[bytes]] = []


class SpawnError(RuntimeError):
    """The supervisor died before it could start the trainer."""


# ---------------------------------------------------------------- pid and exit files


def write_atomic(path: Path, text: str) -> None:
    """Readers poll these files: they must see the old content or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


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


def process_alive(pid: int, create_time: float) -> bool:
    """True when `pid` is running and is the very process that was recorded (not a reused pid)."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > CREATE_TIME_SLACK_S:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def arm_alive(arm: ArmPaths) -> bool:
    """Is this arm's trainer running now? Pid file plus a create-time match."""
    _reap()
    recorded = read_pid(arm)
    return recorded is not None and process_alive(*recorded)


def describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"killed by signal {-status} ({signal.Signals(-status).name})"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


# ---------------------------------------------------------------- launcher side


def trainer_command(arm: ArmPaths) -> list[str]:
    return [sys.executable, "-m", "gputwin.train", str(arm.root)]


def spawn_supervised(arm: ArmPaths, env: Mapping[str, str], command: Sequence[str] | None = None) -> int:
    """Start a detached supervisor for `arm` and return the trainer's pid once it is recorded.

    The supervisor gets its own session (no terminal, immune to the launcher's Ctrl-C and hang-up),
    stdin from /dev/null and the arm's stdout.log/stderr.log, appended. Stale pid and exit files
    are removed first so a respawned arm never looks finished or alive from its last life.
    """
    _reap()
    for stale in (arm.pid, arm.exit):
        stale.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "gputwin.supervise", str(arm.root), "--",
            *(trainer_command(arm) if command is None else command)]
    out = os.open(arm.stdout, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    err = os.open(arm.stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=dict(env),
            cwd=os.getcwd(), start_new_session=True, close_fds=True,
        )
    finally:
        os.close(out)
        os.close(err)
    _supervisors.append(proc)
    deadline = time.monotonic() + PID_WAIT_S
    while time.monotonic() < deadline:
        recorded = read_pid(arm)
        if recorded is not None:
            return recorded[0]
        if proc.poll() is not None and read_pid(arm) is None:
            raise SpawnError(f"the supervisor for arm {arm.name} exited ({describe_exit(proc.returncode)}) "
                             f"before starting the trainer; see {arm.stderr}")
        time.sleep(0.02)
    raise SpawnError(f"the supervisor for arm {arm.name} did not report a trainer pid within {PID_WAIT_S:.0f} s; "
                     f"see {arm.stderr}")


def _reap() -> None:
    """Collect supervisors that have ended so they do not linger as zombies of this process."""
    _supervisors[:] = [p for p in _supervisors if p.poll() is None]


# ---------------------------------------------------------------- supervisor process


def supervise(arm: ArmPaths, command: Sequence[str]) -> int:
    """Run `command`, record its pid and exit status; returns the status (negative = signal)."""
    try:
        child = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, close_fds=True)
    except OSError as exc:
        print(f"gputwin.supervise: cannot start {command[0]}: {exc}", file=sys.stderr, flush=True)
        write_atomic(arm.exit, f"{EXEC_FAILED}\n")
        return EXEC_FAILED

    def forward(signum: int, _frame: object) -> None:
        # Stopping the supervisor means stopping the trainer; keep waiting so the exit is recorded.
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    try:
        created = psutil.Process(child.pid).create_time()  # a zombie still has it: not yet waited for
    except psutil.NoSuchProcess:
        created = time.time()
    write_atomic(arm.pid, f"{child.pid} {created:.3f}\n")
    status = child.wait()
    write_atomic(arm.exit, f"{status}\n")
    if status != 0:
        print(f"gputwin.supervise: trainer {child.pid} ended: {describe_exit(status)}", file=sys.stderr, flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        print("usage: python -m gputwin.supervise ARM_DIR [-- COMMAND...]", file=sys.stderr)
        return 2
    arm = ArmPaths(Path(args[0]).resolve())
    command = args[2:] if len(args) > 1 and args[1] == "--" else trainer_command(arm)
    if not command:
        print("gputwin.supervise: empty command after --", file=sys.stderr)
        return 2
    status = supervise(arm, command)
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
