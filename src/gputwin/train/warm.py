"""Warm starts: one idle process that has already imported what a trainer imports forks each arm's supervisor,
and the supervisor forks the trainer, so an arm's trainer starts with torch, transformers, peft and gputwin's
trainer imported (seconds of every start; bench/RESULTS.md).

    python -m gputwin.train.warm SOCKET --idle SECONDS     (started by the launcher: gputwin.control.warmstart)

The server imports, then listens on the Unix socket SOCKET; each request (one JSON line: the supervisor's
arguments, environment, working folder and log files) is answered with the pid of a forked supervisor, which
runs in a session of its own exactly as `python -m gputwin.control.supervise` would, except that it forks the
trainer instead of executing a fresh Python. The server holds SOCKET's lock file for its whole life (the
launcher starts no second one), exits once SECONDS have passed without a request and without any of its arms
running (the supervisors it forked, and those listed in SOCKET.watch), and never starts CUDA itself: each forked
trainer does (once, at start, a throwaway fork checks that one can). What is imported at start is fixed, so the launcher keys the server by the
Python, the installed packages and the environment that imports read (control/warmstart.py).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import io
import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..control.warmstart import GO
from ..reading.liveness import process_alive
from . import origin

# What `python -m gputwin.train` imports before its first step (gputwin.train.__main__, loop, setup, the engines,
# transformers' tokenizer and model classes, peft), and at its milestone (validation, the cooldown probe).
IMPORTS = ("gputwin.train.__main__", "gputwin.train.cotrain", "gputwin.train.fast", "gputwin.train.setup",
           "transformers.modeling_utils", "transformers.models.auto.modeling_auto",
           "transformers.models.auto.tokenization_auto", "peft", "gputwin.validate.run", "gputwin.validate.predict",
           "gputwin.train.probe")
TRAINER = ("-m", "gputwin.train")
WATCH_TICK_S = 30.0  # how often an idle server looks whether its arms still run


class ForkedProcess:
    """A forked child with the part of subprocess.Popen's interface the supervisor uses."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        while self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
            except InterruptedError:  # a forwarded signal arrived
                continue
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)


def fork_trainer(command: Sequence[str]) -> ForkedProcess | None:
    """The supervisor's way to start `python -m gputwin.train ...` in a warm process: a fork that runs it here.
    None for any other command (the supervisor then executes it as usual)."""
    if list(command[1:3]) != list(TRAINER) or command[0] != sys.executable:
        return None
    pid = os.fork()
    if pid:
        return ForkedProcess(pid)
    origin.FORKED, code = True, 1
    _name_process("gputwin-train")
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        from .__main__ import main

        sys.argv = ["python -m gputwin.train", *command[3:]]
        code = main(list(command[3:]))
    except SystemExit as exc:  # argparse's errors, as `python -m` would end
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # what `python -m` prints for an uncaught error
        traceback.print_exc()
        code = 1
    finally:
        _flush()
        os._exit(code)


def _name_process(name: str) -> None:
    """The name `top`, `ps -o comm` and the kernel show (15 bytes; Linux): a fork keeps the server's command
    line, so this is what tells a forked supervisor and trainer apart from the server."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def prepare_loading() -> None:
    """What every model load would otherwise redo in each fork, done once here: transformers' table of checkpoint
    conversions (hundreds of regular expressions compiled; built on the first load of a process)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # a transformers without it (4.x) has no such table to build
        return
    get_checkpoint_conversion_mapping("llama")


def _become_supervisor(request: dict[str, Any]) -> int:
    """In the forked child: the session, folder, environment and log files of `python -m gputwin.control.supervise`."""
    os.setsid()
    _name_process("gputwin-superv")
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the server ignores it; a supervisor waits for its trainer
    if sys.path and sys.path[0] == os.getcwd():  # `python -m` put the server's folder first: the launch's instead
        sys.path[0] = request["cwd"]
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for fd, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), write_through=True)
    from ..control import supervise

    sys.argv = ["python -m gputwin.control.supervise", *request["argv"]]
    return supervise.main(request["argv"], start=fork_trainer)


def _serve_one(conn: socket.socket, listener: socket.socket, lock_fd: int) -> int:
    """Fork a supervisor for this request; its pid. The fork waits for the launcher's GO after the pid: a launcher
    that gave up waiting for this server (stalled, swapping) has started the arm itself, and its fork then ends
    without starting the arm a second time."""
    with conn, conn.makefile("rb") as reader:
        request = json.loads(reader.readline())
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                listener.close()
                os.close(lock_fd)  # the server's lock is the server's alone
                if reader.readline() == GO:  # (the connection's timeout bounds the wait)
                    reader.close()  # (the socket's descriptor stays open while a file made from it is)
                    conn.close()
                    code = _become_supervisor(request)
                else:  # the launcher is gone: it started the arm itself
                    code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                _flush()
                os._exit(code)
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        return pid


def _watched(path: Path) -> set[int]:
    """The supervisors that launches started as fresh Pythons and asked this server to watch (KEY.watch, a line
    "PID [CREATE_TIME]" each, appended by the launcher) that still run; a supervisor that has ended but not yet
    been waited for by its launcher (a zombie) does not count. The file goes once none of them runs. A line
    appended between the reading and the removal is lost: the server then stays only GPUTWIN_WARM minutes for
    that arm."""
    watch = Path(f"{path}.watch")
    try:
        lines = [line.split() for line in watch.read_text().splitlines()]
    except OSError:
        return set()
    alive = set()
    for fields in lines:
        try:
            pid, created = int(fields[0]), float(fields[1]) if len(fields) > 1 else None
        except (IndexError, ValueError):
            continue
        if process_alive(pid, created):
            alive.add(pid)
    if not alive:
        watch.unlink(missing_ok=True)
    return alive


def _cuda_problem() -> str | None:
    """Why a forked trainer could not use CUDA, or None: CUDA must not be started here, and a fork must be able
    to start it (checked once, in a throwaway fork, where there is a GPU)."""
    import torch

    if torch.cuda.is_initialized():
        return "the imports started CUDA"
    if not torch.cuda.is_available():
        return None
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.zeros(1, device="cuda").add_(1)
            torch.cuda.synchronize()
            code = 0
        except BaseException:  # noqa: BLE001 - why, in the server's log
            traceback.print_exc()
        finally:
            _flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return None if code == 0 else f"a forked process could not use CUDA ({code})"


def _may_leave_idle() -> bool:
    """Whether this process could go back from Linux's idle scheduling to the usual one: root with CAP_SYS_NICE,
    or an RLIMIT_NICE that allows nice 0; most users and containers cannot. Tried in a throwaway fork: a process
    that went idle and cannot come back would fork every trainer idle."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            code = 0
        except BaseException:  # noqa: BLE001 - (PermissionError where it may not come back)
            pass
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


@contextlib.contextmanager
def _idle_priority() -> Iterator[None]:
    """Linux's idle scheduling inside, the usual one after (which forked trainers inherit), where this process
    may come back from it; the usual scheduling throughout elsewhere."""
    if not _may_leave_idle():
        yield
        return
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    try:
        yield
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def serve(path: Path, idle_seconds: float) -> int:
    folder = path.parent.stat()
    if folder.st_uid != os.getuid() or folder.st_mode & 0o077:
        print(f"gputwin.warm: {path.parent} must be this user's alone (mode 700): whoever can reach the socket "
              "can start processes as this user; no warm starts", file=sys.stderr)
        return 1
    lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"gputwin.warm: another server holds {path}.lock", file=sys.stderr)
        return 0
    os.ftruncate(lock_fd, 0)
    os.write(lock_fd, f"{os.getpid()}\n".encode())  # who serves: `kill $(cat SOCKET.lock)` ends it
    began = time.perf_counter()
    # An import that asks torch.cuda.is_available() must not start the CUDA driver here: a fork of a process
    # that has started it cannot use CUDA. NVML answers instead (the forked trainers get their own environment).
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    with _idle_priority():  # the imports yield to the arms that start cold meanwhile
        for name in IMPORTS:
            importlib.import_module(name)
        prepare_loading()
    problem = _cuda_problem()
    if problem is not None:
        Path(f"{path}.refused").write_text(problem + "\n")  # the launcher starts no server for this key again
        print(f"gputwin.warm: {problem}; no warm starts", file=sys.stderr)
        return 1
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # forked supervisors are nobody's to wait for: reaped at once
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    # Idle means: no request, and no arm of ours running (forked here, or started cold by the launch that left
    # this server behind), for idle_seconds. So an extend or a resume after a run of hours still starts warm.
    listener.settimeout(min(idle_seconds, WATCH_TICK_S))
    print(f"gputwin.warm: imports took {time.perf_counter() - began:.2f} s; serving on {path}", file=sys.stderr, flush=True)
    forked: set[int] = set()
    last = time.monotonic()
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                forked = {pid for pid in forked if process_alive(pid, None)}
                if forked or _watched(path):
                    last = time.monotonic()
                elif time.monotonic() - last >= idle_seconds:
                    break
                continue
            last = time.monotonic()
            conn.settimeout(10)
            try:
                forked.add(_serve_one(conn, listener, lock_fd))
            except (OSError, ValueError, KeyError) as exc:  # a broken request: that caller cold-starts
                print(f"gputwin.warm: request failed: {exc}", file=sys.stderr, flush=True)
    finally:
        listener.close()
        path.unlink(missing_ok=True)
    print("gputwin.warm: idle; exiting", file=sys.stderr, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gputwin.train.warm", description=__doc__.split("\n\n")[0])
    parser.add_argument("socket", type=Path)
    parser.add_argument("--idle", type=float, default=1200.0,
                        help="seconds without a request and without a running arm before exiting")
    args = parser.parse_args(argv)
    return serve(args.socket, args.idle)


if __name__ == "__main__":
    sys.exit(main())
