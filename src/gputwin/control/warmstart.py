"""The launcher's side of warm starts (the server is gputwin.train.warm, on the trainer's side).

An arm's supervisor is asked of a warm server when one is serving, and started as a fresh Python otherwise;
after a cold start the launcher leaves a server starting in the background (at idle priority while it imports),
so the next launch within its idle time starts its arms with their imports done. The server stays while the
arms it serves, or the cold-started ones of the launch that left it (KEY.watch), run, and `GPUTWIN_WARM=MINUTES`
after (default 20): an extend or resume at the end of a long run starts warm. `GPUTWIN_WARM=off` turns it off.

A server serves launches whose imports would come out the same: the same Python, the same installed torch,
transformers, peft, the libraries they import and gputwin (by their files' times), and the same environment
variables that imports read; and whose forks would come out the same: the same umask, nice value, CPUs,
resource limits and batch job. Anything else gets a server of its own. Servers and their logs live in ~/.cache/gputwin/warm
($XDG_CACHE_HOME honoured), each as KEY.sock, KEY.lock (the server's pid), KEY.log, and KEY.refused where a
server found that a fork of it could not use CUDA (no server is started for that key for an hour; KEY.log says
why).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import psutil

SETTING = "GPUTWIN_WARM"
DEFAULT_IDLE_MINUTES = 20.0
# what the launcher sets per arm (the forked supervisor gets the arm's own values)
PER_ARM = frozenset({"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "GPUTWIN_THREADS", "PYTHONUNBUFFERED"})
# variables that an import may read (Hugging Face caches and switches, torch, CUDA, threads, Python itself)
# (gputwin's own modules read none at import)
READ_AT_IMPORT = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "PEFT_", "TORCH", "PYTORCH_", "PYTHON", "CUDA_",
                  "NVIDIA_", "LD_", "OMP_", "MKL_", "TOKENIZERS_", "XDG_", "HOME", "USE_")
# what the server imports, whose reinstall must give a new server (each package's __init__ is stamped)
PACKAGES = ("torch", "transformers", "peft", "tokenizers", "huggingface_hub", "safetensors", "accelerate", "numpy",
            "jinja2", "triton", "liger_kernel", "kernels", "scipy", "sympy")
SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes

_servers: list[subprocess.Popen[bytes]] = []  # started here: reaped by the next keep_warm


def idle_seconds(env: Mapping[str, str]) -> float | None:
    """How long a server waits for a request; None where warm starts are off (or the setting is unreadable)."""
    value = env.get(SETTING, "").strip().lower()
    if value in ("off", "0", "no", "false"):
        return None
    try:
        minutes = float(value) if value else DEFAULT_IDLE_MINUTES
    except ValueError:
        return None
    return minutes * 60 if minutes > 0 else None


def folder(env: Mapping[str, str]) -> Path:
    cache = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(cache) / "gputwin" / "warm"


def _files_stamp() -> list[tuple[str, int, int]]:
    """Path, mtime and size of gputwin's modules and of each package's __init__ (a reinstall changes them)."""
    here = Path(__file__).resolve().parents[1]
    files = sorted(here.rglob("*.py"))
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            files.append(Path(spec.origin))
    stamps = []
    for path in files:
        try:
            st = path.stat()
        except OSError:
            continue
        stamps.append((str(path), st.st_mtime_ns, st.st_size))
    return stamps


def _absolute_path_list(value: str) -> str:
    return os.pathsep.join(os.path.abspath(p) if p else p for p in value.split(os.pathsep))


# A batch job's processes live in its control group (its CPU, memory and GPU limits, its end): two jobs of one
# user on one node must not share a server, so the job's id is part of the key. (Not the control group itself:
# each SSH login has its own, and a server should serve the next login's launch.)
BATCH_JOB = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "FLUX_JOB_ID", "JOB_ID")


def _process_stamp(env: Mapping[str, str]) -> list[Any]:
    """What a fork inherits from the server besides its imports and environment: the umask, the nice value, the
    CPUs it may run on, the resource limits, and the batch job it belongs to. The server is started by the launch
    that computes its key, so it has this process's."""
    stamp: list[Any] = [[env.get(name) for name in BATCH_JOB]]
    try:
        status = Path("/proc/self/status").read_text()
        stamp.append(next((line for line in status.splitlines() if line.startswith("Umask:")), None))
    except OSError:
        stamp.append(None)
    stamp.append(os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else None)
    stamp.append(sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None)
    try:
        import resource

        stamp.append([resource.getrlimit(getattr(resource, name)) for name in
                      ("RLIMIT_NOFILE", "RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_MEMLOCK", "RLIMIT_CORE",
                       "RLIMIT_NPROC") if hasattr(resource, name)])
    except ImportError:
        stamp.append(None)
    return stamp


def key(env: Mapping[str, str]) -> str:
    """What a server's imports and its forks depend on, hashed: a server serves only launches with the same key."""
    read = sorted((k, _absolute_path_list(v) if k == "PYTHONPATH" else v) for k, v in env.items()
                  if k.startswith(READ_AT_IMPORT) and k not in PER_ARM)
    blob = json.dumps([sys.executable, sys.version, read, _files_stamp(), _process_stamp(env)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def socket_path(env: Mapping[str, str]) -> Path | None:
    path = folder(env) / f"{key(env)}.sock"
    return path if len(str(path)) <= SOCKET_PATH_MAX else None


class WarmSupervisor:
    """A supervisor forked by the warm server: not this process's child, so watched through psutil."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None
        try:
            self._process: psutil.Process | None = psutil.Process(pid)
        except psutil.NoSuchProcess:
            self._process = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                gone = self._process is None or not self._process.is_running() or \
                    self._process.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                gone = True
            if gone:
                self.returncode = 1  # its status went to the server; its stderr.log says why
        return self.returncode


GO = b"go\n"  # the answer to the server's pid: take it (gputwin.train.warm waits for it before the fork goes on)


def request(argv: Sequence[str], env: Mapping[str, str], *, stdout: Path, stderr: Path,
            timeout: float = 5.0) -> WarmSupervisor | None:
    """Ask a warm server for a supervisor run with `argv` (supervise's arguments); None when there is none
    serving for this environment, warm starts are off, or anything about the request fails (the launcher then
    starts the supervisor as a fresh Python: a warm start never stops a launch)."""
    if idle_seconds(env) is None:
        return None
    try:
        path = socket_path(env)
    except (OSError, ValueError, ImportError):
        return None
    if path is None or not path.exists():
        return None
    message = {"argv": list(argv), "env": dict(env), "cwd": os.getcwd(), "stdout": str(stdout), "stderr": str(stderr)}
    try:
        if not _ours(path.parent):
            return None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(path))
            if not _peer_is_us(conn):  # the environment it is sent holds this user's secrets (HF_TOKEN, ...)
                return None
            conn.sendall(json.dumps(message).encode() + b"\n")
            with conn.makefile("rb") as reader:
                pid = int(json.loads(reader.readline())["pid"])
            conn.sendall(GO)  # the fork becomes the supervisor only now: had this timed out, it would end
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return WarmSupervisor(pid)


def _ours(folder: Path) -> bool:
    """The servers' folder is this user's alone (mode 700), as the server itself insists."""
    st = folder.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o077


def _peer_is_us(conn: socket.socket) -> bool:
    """The process listening on the socket runs as this user (Linux: SO_PEERCRED; elsewhere, the folder's check)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return True
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    return uid == os.getuid()


STARTED, RUNNING = "started", "running"  # what keep_warm did: started a server, or found one serving or starting


def keep_warm(env: Mapping[str, str], watch: int | None = None) -> str | None:
    """Start a server for this environment in the background, unless warm starts are off or one holds its lock
    (serving, or still importing); watch: a cold-started supervisor's pid, for the server to stay while it runs.
    Returns STARTED, RUNNING, or None where there are no warm starts here. Nothing here may fail a launch: a
    cache folder that cannot be written (say) means no warm starts."""
    try:
        return _keep_warm(env, watch)
    except (OSError, ValueError, ImportError):
        return None


def ahead(env: Mapping[str, str]) -> str:
    """For `gputwin check`, which comes before a `gputwin run`: a server for this environment, started now where
    none serves, so that the run forks its arms with their imports done instead of starting fresh Pythons
    (7-9 s of imports on an H100 machine, bench/RESULTS.md). The line that says so ('' without warm starts)."""
    done = keep_warm(env)
    if done is None:
        return ""
    minutes = (idle_seconds(env) or 0) / 60
    if done == RUNNING:
        return "warm starts: a server for this environment is ready (or starting): `gputwin run` starts its arms warm"
    return (f"warm starts: a server is doing a trainer's imports in the background; a `gputwin run` within "
            f"{minutes:g} min of it being ready starts its arms warm (GPUTWIN_WARM=off to skip)")


def _watch(path: Path, pid: int) -> None:
    """Ask the server at `path` to stay while `pid` runs: a line in KEY.watch, with the process's start time so
    that a pid the system gives another process later is not taken for it. A process already gone is left out."""
    try:
        line = f"{pid} {psutil.Process(pid).create_time():.3f}\n"
    except psutil.Error:
        return
    fd = os.open(f"{path}.watch", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


REFUSED_S = 3600.0  # how long a refusal stands: it may have been a moment's trouble (a GPU full, or busy)


def _refused_lately(path: Path) -> bool:
    try:
        return time.time() - Path(f"{path}.refused").stat().st_mtime < REFUSED_S
    except OSError:
        return False


def _keep_warm(env: Mapping[str, str], watch: int | None) -> str | None:
    idle = idle_seconds(env)
    path = socket_path(env) if idle is not None else None
    if idle is None or path is None:
        return None
    if _refused_lately(path):  # a server found that forked trainers could not use CUDA here
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)  # whoever can reach the socket can start processes as this user
    if watch is not None:
        _watch(path, watch)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return RUNNING
    finally:
        os.close(fd)  # (releases the lock if taken: the server takes it for itself)
    server_env = {k: v for k, v in env.items() if k not in PER_ARM}
    _servers[:] = [p for p in _servers if p.poll() is None]
    with open(path.with_suffix(".log"), "wb") as log:
        _servers.append(subprocess.Popen([sys.executable, "-m", "gputwin.train.warm", str(path), "--idle", str(idle)],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=server_env, cwd=os.getcwd(),
                         start_new_session=True, close_fds=True))
    return STARTED
