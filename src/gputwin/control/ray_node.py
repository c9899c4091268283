"""The node side of an arm on a Ray cluster: `ArmRunner`, one Ray actor per arm (docs/cluster.md).

The actor runs the ordinary trainer, ``python -m gputwin.train WORK/<arm>``, in a work folder on its node:
the arm folder's files (profile, event log so far, control requests) and the arm's data arrive as the
actor's arguments, because no filesystem is assumed to be shared. What the trainer writes is handed out in
pieces to the arm's mirror on the launching machine (gputwin.control.ray_backend), which calls ``pull`` a few times
a second: the bytes appended to events.jsonl, stdout.log and stderr.log since the mirror's offsets, and the
validation results and adapters that are new or changed. Checkpoints stay in the work folder (on a shared
path when one is configured): a resume on this node finds them there.

This module imports no Ray: the mirror wraps the class with ``ray.remote`` when it creates the actor, so the
file logic here is tested as plain Python.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from ..core.paths import make_private_dir, valid_name, write_atomic
from .parentage import die_with_parent

LOGS = ("events.jsonl", "stdout.log", "stderr.log")  # append-only: shipped as the bytes after an offset
SHIPPED_FOLDERS = ("validation", "adapters")  # whole files, when new or changed
PULL_MAX_BYTES = 32 << 20  # at most this much a call; the rest comes with the next one
WORK_ENV = "GPUTWIN_RAY_WORK"  # on a node: where arms without a shared path keep their work folders
DEFAULT_WORK = "~/.cache/gputwin/ray"


def work_base(shared_path: str | None) -> Path:
    """The folder that holds this node's arm work folders: the shared path when configured (every node sees
    the same checkpoints), else $GPUTWIN_RAY_WORK or ~/.cache/gputwin/ray on the node itself."""
    if shared_path:
        return Path(shared_path)
    return Path(os.environ.get(WORK_ENV) or DEFAULT_WORK).expanduser()


def relocate_profile(path: Path, values: dict[str, Any]) -> None:
    """Point the resolved profile's paths at the shipped copies (dotted keys: "data.train" -> a path here)."""
    profile = json.loads(path.read_text(encoding="utf-8"))
    for dotted, value in values.items():
        table, _, key = dotted.rpartition(".")
        (profile[table] if table else profile)[key] = value
    write_atomic(path, json.dumps(profile, indent=2) + "\n")


def safe_relative(name: str) -> Path:
    """A path inside the work folder, from a name sent by the mirror: relative, no '..', no hidden parts."""
    path = Path(name)
    if path.is_absolute() or not path.parts or any(p in ("", ".", "..") or p.startswith(".") for p in path.parts):
        raise ValueError(f"not a plain relative path: {name!r}")
    return path


def write_files(root: Path, files: dict[str, bytes]) -> None:
    """Unpack the files the mirror shipped (atomically each, private folders)."""
    for name, data in files.items():
        target = root / safe_relative(name)
        make_private_dir(target.parent)
        write_atomic(target, data)


def read_from(path: Path, offset: int, limit: int) -> bytes:
    """The bytes of a growing file after `offset` (at most `limit`); b"" when it is not there yet."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(limit)
    except FileNotFoundError:
        return b""


def changed_files(root: Path, have: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Files under the shipped folders whose (size, mtime_ns) the mirror does not have; hidden names (files
    being written under a temporary name) are left for later."""
    out: dict[str, tuple[int, int]] = {}
    for folder in SHIPPED_FOLDERS:
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) or not path.is_file():
                continue
            info = path.stat()
            stamp = (info.st_size, info.st_mtime_ns)
            if tuple(have.get(str(rel), ())) != stamp:
                out[str(rel)] = stamp
    return out


def pending_requests(control: Path) -> list[str]:
    """Names of the control requests the trainer has not handled yet."""
    if not control.is_dir():
        return []
    return sorted(p.name for p in control.glob("[0-9]*.json"))


def trainer_env(env: dict[str, str]) -> dict[str, str]:
    """The worker's environment for the trainer, less any PYTHONPATH entry inside the gputwin package: Ray puts
    the folder of the mirror's module on its workers' path, where `requests.py` would stand in for the
    requests library and `kernels/` for the kernels package."""
    package = Path(__file__).resolve().parents[1]
    kept = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep)
            if entry and not Path(entry).resolve().is_relative_to(package)]
    return {**env, "PYTHONPATH": os.pathsep.join(kept)} if "PYTHONPATH" in env else env


class ArmRunner:
    """One arm's trainer on a cluster node (a detached Ray actor; the mirror makes it with ``ray.remote``)."""

    def __init__(self, key: str, arm: str, shared_path: str | None, files: dict[str, bytes],
                 relocate: dict[str, str | None], env: dict[str, str], command: Sequence[str] | None = None) -> None:
        """`files` are relative to the experiment's work folder (``experiment.json``, ``ARM/profile.json``, ...);
        `relocate` maps profile keys to paths relative to the arm's work folder (None: the key's value is
        cleared, as for train.output_dir, whose checkpoints then stay in the work folder)."""
        if not valid_name(arm):
            raise ValueError(f"{arm!r} is not an arm name")
        experiment = make_private_dir(work_base(shared_path) / safe_relative(key))
        for stale in (experiment / arm / "control").glob("[0-9]*.json"):  # the launching machine's copy rules
            stale.unlink()
        write_files(experiment, files)
        self.root = make_private_dir(experiment / arm)
        relocate_profile(self.root / "profile.json",
                         {k: None if v is None else str(self.root / safe_relative(v)) for k, v in relocate.items()})
        # The node's stdout.log and stderr.log go on from an earlier life here: this life's begin at these sizes.
        self.log_sizes = {name: (self.root / name).stat().st_size if (self.root / name).exists() else 0
                          for name in LOGS if name != "events.jsonl"}
        self.env = trainer_env({**os.environ, **env})
        self.command = list(command) if command else [sys.executable, "-m", "gputwin.train", str(self.root)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> int:
        """Start the trainer (again: an extend that arrived as it ended); returns its pid."""
        out = os.open(self.root / "stdout.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        err = os.open(self.root / "stderr.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:  # the trainer dies with this worker: a lost worker never leaves it writing where nobody reads
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         env=self.env, cwd=self.root, close_fds=True, preexec_fn=die_with_parent)
        finally:
            os.close(out)
            os.close(err)
        return self.proc.pid

    def where(self) -> dict[str, Any]:
        """Where this arm runs: for the `placed` event and for a resume that needs these checkpoints."""
        import ray  # inside the actor, Ray is there

        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "host": socket.gethostname(),
                "ip": ray.util.get_node_ip_address(), "work": str(self.root),
                "pid": self.proc.pid if self.proc else None, "worker_pid": os.getpid(), "log_sizes": self.log_sizes}

    def pull(self, offsets: dict[str, int], have: dict[str, tuple[int, int]]) -> dict[str, Any]:
        """What the trainer wrote since the mirror's last call; ``exit`` once it has ended.

        The exit status is read first: everything the trainer wrote before it ended is then on disk, so the
        call that reports the end also carries its last events (unless over PULL_MAX_BYTES: then ``more``).
        """
        code = self.proc.poll() if self.proc else None
        budget = PULL_MAX_BYTES
        logs: dict[str, bytes] = {}
        for name in LOGS:
            data = read_from(self.root / name, int(offsets.get(name, 0)), budget)
            budget -= len(data)
            if data:
                logs[name] = data
        files: dict[str, bytes] = {}
        stamps: dict[str, tuple[int, int]] = {}
        more = budget <= 0
        for rel, stamp in changed_files(self.root, have).items():
            if stamp[0] > budget and (files or logs):
                more = True  # a file larger than what is left goes alone in the next call
                break
            try:
                data = (self.root / rel).read_bytes()
            except FileNotFoundError:  # pruned between the listing and the read
                continue
            files[rel], stamps[rel] = data, stamp
            budget -= len(data)
        return {"logs": logs, "files": files, "stamps": stamps, "control": pending_requests(self.root / "control"),
                "exit": code, "more": more, "pid": self.proc.pid if self.proc else None}

    def put_control(self, name: str, data: bytes) -> None:
        """A request the user made on the launching machine, into the trainer's control folder (atomic)."""
        target = self.root / "control" / safe_relative(name)
        make_private_dir(target.parent)
        write_atomic(target, data)

    def restart(self) -> int | None:
        """Start the trainer again when it has ended (the mirror asks for it when an extend came late)."""
        if self.proc is not None and self.proc.poll() is None:
            return None
        return self.start()

    def signal(self, signum: int) -> None:
        """A signal for the trainer: SIGTERM stops it after its step, with a checkpoint."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)
