"""The per-arm supervisor: ``python -m gputwin.control.supervise ARM_DIR [-- COMMAND...]`` (and
``--group ARM_DIR ARM_DIR... [-- COMMAND...]`` for arms co-trained in one process: `supervise_group`).

The launcher starts one supervisor per arm in a session of its own; the supervisor runs the
trainer (``python -m gputwin.train ARM_DIR`` unless a command follows ``--``) as its child,
records ``"<pid> <create_time>"`` of the trainer in ``ARM_DIR/pid``, waits, and writes the
trainer's exit status to ``ARM_DIR/exit`` (negative = killed by that signal). Because the
supervisor waits on the trainer, even ``kill -9`` of the trainer is recorded. If the supervisor
itself dies, readers fall back to checking the pid file against the live process table.
An extend request that arrives while the trainer is already ending makes the supervisor start
the trainer again (see `supervise`), so "extend" never gets lost in that window.

This module also holds the launcher's side of that contract (spawn, liveness, how an arm's last
life ended), so both ends of the pid/exit files live in one place.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import psutil

from . import requests as control
from . import warmstart
from ..core.lifecycle import (CRASHED, FAILED, FINISHED, LIFE_ENDED, NOT_STARTED, RUNNING, STOPPED, Process,
                              between_lives, describe_exit, last_life)
from ..reading.liveness import process_alive, read_exit, read_pid
from ..core.paths import ArmPaths, write_atomic

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
EXEC_FAILED = 127  # exit status recorded when the trainer could not be started at all
PID_WAIT_S = 30.0  # how long the launcher waits for a fresh supervisor to report the trainer's pid
SUPERVISOR_FILE = "supervisor"
ENDED = LIFE_ENDED  # an arm's status between lives: gputwin.core.lifecycle.BETWEEN_LIVES
ARM_LOCK_FILE = "supervise.lock"

# Supervisors this process started; kept so they are reaped (no zombies, no ResourceWarning).
_supervisors: list[subprocess.Popen[bytes]] = []


class SpawnError(RuntimeError):
    """The supervisor died before it could start the trainer."""


# ---------------------------------------------------------------- pid and exit files


def supervisor_file(arm: ArmPaths) -> Path:
    """ "<pid> <create_time>" of the arm's supervisor."""
    return arm.root / SUPERVISOR_FILE


def supervisor_active(arm: ArmPaths) -> bool:
    """A supervisor still looks after this arm: it will see requests written now when its trainer ends.

    Done means it recorded the exit status (under the arm lock), or it is gone (killed).
    """
    if arm.exit.exists():
        return False
    try:
        pid_text, created_text = supervisor_file(arm).read_text().split()[:2]
        return process_alive(int(pid_text), float(created_text))
    except (OSError, ValueError):
        return False


@contextmanager
def arm_lock(arm: ArmPaths) -> Iterator[None]:
    """Serialises "respawn or just ask?" in the launcher with "restart or record the exit?" here."""
    fd = os.open(arm.root / ARM_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def arm_alive(arm: ArmPaths) -> bool:
    """Is this arm's trainer running now? Pid file plus a create-time match."""
    _reap()
    recorded = read_pid(arm)
    if recorded is None or not process_alive(*recorded):
        return False
    # An arm on a Ray cluster names its mirror (gputwin.control.ray_backend) in both files: once the mirror has
    # recorded the exit, the arm has ended, though the mirror may take a moment to leave.
    return not (arm.exit.exists() and _supervisor_record(arm) == recorded)


def _supervisor_record(arm: ArmPaths) -> tuple[int, float] | None:
    try:
        pid_text, created_text = supervisor_file(arm).read_text().split()[:2]
        return int(pid_text), float(created_text)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- an arm's lives


def _last_life(arm: ArmPaths) -> tuple[str, int | None]:
    """What the event log says about the arm's last life, and the pid its `started` event names.

    From the fold saved beside the log plus what follows it (foldcache), so a log of a million events
    costs what was appended since the fold was saved, not a parse of every line.
    """
    from ..reading import foldcache

    fold, _ = foldcache.fold_log(arm.events, arm.name)
    return last_life(fold), fold.pid


def arm_status(arm: ArmPaths) -> str:
    """running / finished / stopped / failed / crashed / not started (gputwin.core.lifecycle.between_lives)."""
    from ..reading import foldcache

    if arm_alive(arm):  # running whatever its log says: no need to read the log
        return RUNNING
    fold, _ = foldcache.fold_log(arm.events, arm.name)
    recorded = read_pid(arm) is not None or read_exit(arm) is not None
    return between_lives(fold, Process(alive=False, recorded=recorded))


def ending(arm: ArmPaths) -> str | None:
    """For a live trainer that has already written its final event (it is saving and exiting): that event.

    A life is told apart by the pid in its `started` event; an older life's final event does not count.
    """
    recorded = read_pid(arm)
    if recorded is None:
        return None
    status, pid = _last_life(arm)
    return status if pid == recorded[0] and status in (FINISHED, STOPPED, FAILED) else None


# ---------------------------------------------------------------- launcher side


class Supervisor(Protocol):
    """A started supervisor as the launcher watches it: a subprocess.Popen, or a warmstart.WarmSupervisor."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...


def trainer_command(arm: ArmPaths) -> list[str]:
    return [sys.executable, "-m", "gputwin.train", str(arm.root)]


def start_supervisor(arm: ArmPaths, env: Mapping[str, str],
                     command: Sequence[str] | None = None) -> Supervisor:
    """Start a detached supervisor for `arm` without waiting for it (wait_for_trainer does), so the
    supervisors of several arms start side by side.

    The supervisor gets its own session (no terminal, immune to the launcher's Ctrl-C and hang-up),
    stdin from /dev/null and the arm's stdout.log/stderr.log, appended. Stale pid and exit files
    are removed first so a respawned arm never looks finished or alive from its last life.
    """
    _reap()
    for stale in (arm.pid, arm.exit):
        stale.unlink(missing_ok=True)
    args = [str(arm.root), "--", *(trainer_command(arm) if command is None else command)]
    return _launch_supervisor(args, env, arm.stdout, arm.stderr)


def _launch_supervisor(args: Sequence[str], env: Mapping[str, str], stdout: Path, stderr: Path) -> Supervisor:
    """`python -m gputwin.control.supervise ARGS`, forked by a warm server where one serves this environment
    (gputwin.control.warmstart), else started fresh, leaving a warm server starting for the next launch."""
    warm = warmstart.request(args, env, stdout=stdout, stderr=stderr)
    if warm is not None:
        return warm
    out = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    err = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gputwin.control.supervise", *args], stdin=subprocess.DEVNULL, stdout=out,
            stderr=err, env=dict(env), cwd=os.getcwd(), start_new_session=True, close_fds=True,
        )
    finally:
        os.close(out)
        os.close(err)
    _supervisors.append(proc)
    warmstart.keep_warm(env, watch=proc.pid)
    return proc


def wait_for_trainer(arm: ArmPaths, proc: Supervisor) -> int:
    """The pid of the trainer that `proc` (start_supervisor's) started, once recorded; SpawnError if none."""
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


class Child(Protocol):
    """The trainer as the supervisor sees it: a subprocess.Popen, or a fork (gputwin.train.warm.ForkedProcess)."""

    pid: int

    def wait(self) -> int: ...

    def send_signal(self, signum: int) -> None: ...


# How a warm process starts the trainer (gputwin.train.warm.fork_trainer): a Child, or None to execute the command
Starter = Callable[[Sequence[str]], "Child | None"]


def _start(command: Sequence[str], start: Starter | None = None) -> Child | None:
    if start is not None:
        forked = start(command)
        if forked is not None:
            return forked
    try:
        return subprocess.Popen(list(command), stdin=subprocess.DEVNULL, close_fds=True)
    except OSError as exc:
        print(f"gputwin.supervise: cannot start {command[0]}: {exc}", file=sys.stderr, flush=True)
        return None


def _pending_extends(arm: ArmPaths) -> set[Path]:
    return {path for path, r in control.pending(arm.control) if isinstance(r, control.Request) and r.action == control.EXTEND}


def supervise(arm: ArmPaths, command: Sequence[str], start: Starter | None = None) -> int:
    """Run `command`, record its pid and exit status; returns the status (negative = signal).

    An extend request that arrives while the trainer is finishing or stopping would never be read;
    so when the trainer ends cleanly with one waiting, it is started again: it resumes from the
    checkpoint it just wrote and applies the request. The decision and the exit file are made under
    the arm lock, which the launcher also takes before it chooses between a request and a respawn.
    """
    write_atomic(supervisor_file(arm), f"{os.getpid()} {psutil.Process().create_time():.3f}\n")
    child: Child | None = None
    restarted_for: set[Path] = set()  # requests a restart was for: never restart twice for one
    _forward_signals(lambda: child)
    while True:
        child = _start(command, start)
        status = EXEC_FAILED if child is None else _run_recorded(child, [arm])
        with arm_lock(arm):
            waiting = _pending_extends(arm) if status == 0 else set()
            if waiting - restarted_for:
                restarted_for |= waiting
                print("gputwin.supervise: an extend request arrived as the trainer ended; starting it again to "
                      "apply it", file=sys.stderr, flush=True)
                continue
            write_atomic(arm.exit, f"{status}\n")
        break
    if status != 0:
        pid = child.pid if child is not None else "-"
        print(f"gputwin.supervise: trainer {pid} ended: {describe_exit(status)}", file=sys.stderr, flush=True)
    return status


def _forward_signals(current: Callable[[], Child | None]) -> None:
    """Stopping the supervisor means stopping the trainer; the supervisor keeps waiting so the exit is recorded."""
    def forward(signum: int, _frame: object) -> None:
        child = current()
        if child is not None:
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)


def _run_recorded(child: Child, arms: Sequence[ArmPaths]) -> int:
    """Write the child's pid (with its create time) into each arm's pid file, wait for it; its status."""
    try:
        created = psutil.Process(child.pid).create_time()  # a zombie still has it: not yet waited for
    except psutil.NoSuchProcess:
        created = time.time()
    for arm in arms:
        write_atomic(arm.pid, f"{child.pid} {created:.3f}\n")
    return child.wait()


# ---------------------------------------------------------------- a group's supervisor (co-trained arms)


def group_trainer_command(arms: Sequence[ArmPaths]) -> list[str]:
    return [sys.executable, "-m", "gputwin.train", "--group", *(str(arm.root) for arm in arms)]


def release_arm(arm: ArmPaths, status: int) -> bool:
    """Called by a co-training process when one of its arms ends while it trains the others on: record the
    arm's exit now (as the supervisor does when a process ends) and drop its pid, so it reads as ended and
    `resume`/`extend` start it again in a process of its own. Under the arm lock, like the supervisor's
    decision: an extend request already waiting is not lost; it returns False, records nothing, and the
    process trains the arm on."""
    with arm_lock(arm):
        if status == 0 and _pending_extends(arm):
            return False
        write_atomic(arm.exit, f"{status}\n")
        arm.pid.unlink(missing_ok=True)
    return True


def supervise_group(arms: Sequence[ArmPaths], command: Sequence[str], start: Starter | None = None) -> int:
    """Run one process for several arms: its pid goes into every arm's pid file, and when it ends its status
    goes into the exit file of every arm it still held (the process has already given back the arms that
    ended before it: release_arm). A kill -9 of the process thus marks each of its arms crashed."""
    for arm in arms:
        write_atomic(supervisor_file(arm), f"{os.getpid()} {psutil.Process().create_time():.3f}\n")
    child: Child | None = None
    _forward_signals(lambda: child)
    child = _start(command, start)
    status = EXEC_FAILED if child is None else _run_recorded(child, arms)
    for arm in arms:
        with arm_lock(arm):
            held = read_pid(arm)
            if child is None or (held is not None and held[0] == child.pid):
                write_atomic(arm.exit, f"{status}\n")
    if status != 0:
        pid = child.pid if child is not None else "-"
        print(f"gputwin.supervise: trainer {pid} of {', '.join(a.name for a in arms)} ended: "
              f"{describe_exit(status)}", file=sys.stderr, flush=True)
    return status


def start_group_supervisor(arms: Sequence[ArmPaths], env: Mapping[str, str],
                           command: Sequence[str] | None = None) -> Supervisor:
    """start_supervisor for a co-trained group: one detached supervisor and process for all of `arms`.

    The process's stdout/stderr go to the first arm's logs; every other arm's stderr.log says where."""
    _reap()
    for arm in arms:
        for stale in (arm.pid, arm.exit):
            stale.unlink(missing_ok=True)
    for arm in arms[1:]:
        with open(arm.stderr, "a", encoding="utf-8") as fh:
            fh.write(f"gputwin: {arm.name} trains in one process with {', '.join(a.name for a in arms if a != arm)}; "
                     f"that process writes to {arms[0].stderr}\n")
    args = ["--group", *(str(a.root) for a in arms), "--", *(group_trainer_command(arms) if command is None else command)]
    return _launch_supervisor(args, env, arms[0].stdout, arms[0].stderr)


def main(argv: Sequence[str] | None = None, start: Starter | None = None) -> int:
    """`start`: how a warm process (gputwin.train.warm) starts the trainer; None executes it."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--group"]:
        folders = args[1:args.index("--")] if "--" in args else args[1:]
        arms = [ArmPaths(Path(f).resolve()) for f in folders]
        command = args[args.index("--") + 1:] if "--" in args else group_trainer_command(arms)
        if len(arms) < 2 or not command:
            print("usage: python -m gputwin.control.supervise --group ARM_DIR ARM_DIR... [-- COMMAND...]", file=sys.stderr)
            return 2
        return 0 if supervise_group(arms, command, start) == 0 else 1
    if not args or args[0].startswith("-"):
        print("usage: python -m gputwin.control.supervise ARM_DIR [-- COMMAND...]", file=sys.stderr)
        return 2
    arm = ArmPaths(Path(args[0]).resolve())
    command = args[2:] if len(args) > 1 and args[1] == "--" else trainer_command(arm)
    if not command:
        print("gputwin.supervise: empty command after --", file=sys.stderr)
        return 2
    status = supervise(arm, command, start)
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
