"""Checkpoints that a crash cannot half-write: everything a run needs to continue exactly.

A checkpoint folder ``step-NNNNNN/`` holds the adapter (peft files + gputwin.json, usable on its
own), ``trainer_state.pt`` (trainable weights, optimizer, RNG states) and ``checkpoint.json`` (step,
data position, lr plan, fingerprint). It is written under a temporary name, fsynced and renamed into
place, so a folder with the final name is always complete; leftovers of a crash are cleaned up on the
next start.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError

from ..core.errors import UserError
from ..validate.modeling import save_adapter
from ..core.schedule import LrPlan

STATE_FILE = "trainer_state.pt"
MANIFEST = "checkpoint.json"  # written last inside the temporary folder
ADAPTER_DIR = "adapter"
PREFIX = "step-"
TEMP_PREFIX = ".tmp-"
ASIDE_PREFIX = ".old-"


@dataclass
class TrainState:
    """Where a run stands; the data position is the next batch to train on."""

    step: int
    epoch: int
    index: int  # batch index inside `epoch`
    plan: LrPlan
    milestone_done: bool = False
    samples_seen: int = 0
    tokens_seen: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"plan": self.plan.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(step=int(d["step"]), epoch=int(d["epoch"]), index=int(d["index"]), plan=LrPlan.from_dict(d["plan"]),
                   milestone_done=bool(d["milestone_done"]), samples_seen=int(d["samples_seen"]),
                   tokens_seen=int(d["tokens_seen"]))


# What a failed write raises: OSError from plain files, RuntimeError from torch.save (a full disk reads
# "unexpected pos ..."), SafetensorError from the adapter weights ("No space left on device").
WRITE_ERRORS: tuple[type[BaseException], ...] = (OSError, RuntimeError, SafetensorError)
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
NEARLY_FULL = 4 * 2**20  # bytes free when a write failed without an errno: the disk was full


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (full disk, quota, I/O error). Its temporary folder is
    removed, so the checkpoints written before it stay the newest complete ones."""


class CheckpointMismatch(UserError):
    """A checkpoint written for another model, task or LoRA setup than the profile now asks for."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(PREFIX) or not name[len(PREFIX):].isdigit():
        return None
    return int(name[len(PREFIX):])


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(exc: BaseException, root: Path, name: str) -> CheckpointWriteError:
    """One error type with the errno when known and the free space (measured before the cleanup).

    torch.save reports a full disk without an errno ("basic_ios::clear: iostream error", "unexpected
    pos ..."); a disk with almost nothing left when the write failed counts as full.
    """
    code = getattr(exc, "errno", None)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror  # without the errno and the temporary file's name
    try:
        free_bytes: int | None = shutil.disk_usage(root).free
    except OSError:
        free_bytes = None
    if code is None and ("No space left on device" in text or (free_bytes is not None and free_bytes < NEARLY_FULL)):
        code = errno.ENOSPC
    free = "free space unknown" if free_bytes is None else f"{free_bytes / 2**20:,.1f} MiB free there"
    return CheckpointWriteError(code or errno.EIO, f"cannot write checkpoint {name} in {root} ({free}): {text}")


@dataclass
class Snapshot:
    """What a checkpoint holds, copied off the live run into host memory: written later, while training goes on.
    The adapter is written from the same copies (its model's save_pretrained with `state_dict`)."""

    state: TrainState
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    model: Any
    adapter_meta: dict[str, Any]


def take_snapshot(state: TrainState, model: Any, optimizer: torch.optim.Optimizer,
                  adapter_meta: dict[str, Any]) -> Snapshot:
    """The checkpoint of `state` as it stands now, in host memory (the copies wait for the device's queued work:
    the caller has read the step's loss already)."""

    def copied(value: Any) -> Any:
        if torch.is_tensor(value):
            return value.detach().to("cpu", copy=True)
        if isinstance(value, dict):
            return {k: copied(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copied(v) for v in value)
        return copy.deepcopy(value)

    trainable = {name: copied(p) for name, p in model.named_parameters() if p.requires_grad}
    return Snapshot(state=copy.deepcopy(state), trainable=trainable, optimizer=copied(optimizer.state_dict()),
                    rng=rng_states(), model=model, adapter_meta=adapter_meta)


def save_checkpoint(root: Path, state: TrainState, model: Any, optimizer: torch.optim.Optimizer,
                    adapter_meta: dict[str, Any], fingerprint: dict[str, Any],
                    half_written: Callable[[Path], None] | None = None) -> Path:
    """Write the checkpoint of `state.step` atomically and return its folder.

    A failed write raises CheckpointWriteError after removing the temporary folder. `half_written` is
    called with that folder once the weights are in it and the manifest is not (fault injection).
    """
    return write_snapshot(root, take_snapshot(state, model, optimizer, adapter_meta), fingerprint, half_written)


def write_snapshot(root: Path, snapshot: Snapshot, fingerprint: dict[str, Any],
                   half_written: Callable[[Path], None] | None = None) -> Path:
    """save_checkpoint's writing, from a snapshot: it may run on a thread of its own (BackgroundWrite)."""
    state = snapshot.state
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    final = root / checkpoint_name(state.step)
    temp = root / f"{TEMP_PREFIX}{final.name}-{os.getpid()}"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir(mode=0o700)
    try:
        save_adapter(snapshot.model, temp / ADAPTER_DIR, snapshot.adapter_meta, state_dict=snapshot.trainable)
        torch.save({"trainable": snapshot.trainable, "optimizer": snapshot.optimizer, "rng": snapshot.rng},
                   temp / STATE_FILE)
        if half_written is not None:
            half_written(temp)
        manifest = {"state": state.to_dict(), "fingerprint": fingerprint, "format": 1}
        (temp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _fsync_tree(temp)
    except WRITE_ERRORS as exc:
        shutil.rmtree(temp, ignore_errors=True)
        raise _write_error(exc, root, final.name) from exc
    aside = root / f"{ASIDE_PREFIX}{final.name}"
    if final.exists():  # the same step again (e.g. stopped right after a resume): replace it
        os.replace(final, aside)
    os.replace(temp, final)
    _fsync_dir(root)
    if aside.exists():
        shutil.rmtree(aside)
    return final


class BackgroundWrite:
    """One checkpoint written on a thread of its own while the run trains on (Trainer.checkpoint(background=True)).

    `write` runs on the thread; done() says whether it has finished, result() waits for it and returns its
    folder (`seconds`: how long it took), or raises what it raised. The thread is not a daemon: a process ending
    while a write is in flight finishes it first."""

    def __init__(self, write: Callable[[], Path], name: str) -> None:
        self._path: Path | None = None
        self._error: BaseException | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, args=(write,), name=name)
        self._thread.start()

    def _run(self, write: Callable[[], Path]) -> None:
        started = time.perf_counter()
        try:
            self._path = write()
        except BaseException as exc:  # handed to the training thread by result()
            self._error = exc
        self.seconds = time.perf_counter() - started

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> Path:
        self._thread.join()
        if self._error is not None:
            # handed over, not kept: a write that failed holds its open files in the error's traceback, and a
            # reference from here would keep them (and a full disk's space) until a garbage collection
            error, self._error = self._error, None
            try:
                raise error
            finally:
                del error  # (the traceback holds this frame: no cycle through it either)
        assert self._path is not None
        return self._path


def clean_leftovers(root: Path) -> list[Path]:
    """Remove half-written temporary folders; put back a checkpoint moved aside just before a crash."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for path in root.iterdir():
        if path.name.startswith(TEMP_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif path.name.startswith(ASIDE_PREFIX):
            final = root / path.name[len(ASIDE_PREFIX):]
            if final.exists():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            else:
                os.replace(path, final)
    return removed


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (a manifest and a state file), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        step = _step_of(path)
        if step is not None and path.is_dir() and (path / MANIFEST).is_file() and (path / STATE_FILE).is_file():
            found.append((step, path))
    return sorted(found)


def prune(root: Path, keep: int, protect: Path) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; `protect` (the one just written) always stays."""
    checkpoints = [path for _, path in list_checkpoints(root)]
    doomed = [p for p in checkpoints[:-keep] if p != protect] if keep > 0 else []
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def load_checkpoint(folder: Path, model: Any, optimizer: torch.optim.Optimizer, fingerprint: dict[str, Any],
                    device: torch.device) -> TrainState:
    """Restore weights, optimizer and RNG from `folder`; the returned state says where to continue. A checkpoint
    that fails to load leaves them as they were (the next older one may then load into a clean run)."""
    manifest = read_manifest(folder)
    if manifest.get("fingerprint") != fingerprint:
        changed = sorted(k for k in fingerprint if manifest.get("fingerprint", {}).get(k) != fingerprint[k])
        raise CheckpointMismatch(
            f"{folder}: checkpoint was written for a different setup (differs in {', '.join(changed) or 'format'})",
            f"resume with the profile it was written with, or move {folder.parent} away to start afresh")
    state = TrainState.from_dict(manifest["state"])
    saved = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    wrong = [name for name, t in saved["trainable"].items() if name not in params or params[name].shape != t.shape]
    if wrong:
        raise CheckpointMismatch(f"{folder}: checkpoint weight {wrong[0]} does not fit this model",
                                 f"move {folder.parent} away to start afresh")
    before = ({name: params[name].detach().clone() for name in saved["trainable"]},
              copy.deepcopy(optimizer.state_dict()), rng_states())
    try:
        with torch.no_grad():
            for name, tensor in saved["trainable"].items():
                params[name].copy_(tensor.to(device))
        optimizer.load_state_dict(saved["optimizer"])
        set_rng_states(saved["rng"])
    except BaseException:
        with torch.no_grad():
            for name, tensor in before[0].items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(before[1])
        set_rng_states(before[2])
        raise
    return state


def latest_loadable(root: Path, model: Any, optimizer: torch.optim.Optimizer, fingerprint: dict[str, Any],
                    device: torch.device) -> tuple[TrainState, Path] | None:
    """The newest checkpoint that loads; damaged ones are reported on stderr and skipped."""
    for _, folder in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(folder, model, optimizer, fingerprint, device), folder
        except CheckpointMismatch:
            raise
        except (OSError, ValueError, KeyError, RuntimeError, EOFError) as exc:  # torch.load raises RuntimeError/EOF
            print(f"gputwin: skipping damaged checkpoint {folder}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return None
