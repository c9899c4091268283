"""Validating an experiment's reference: `gputwin validate` in a process of its own, before the arms start,
on the baseline arm's seeded sample, cached by the hashes of everything that goes into it.

Why before the arms rather than beside them: loading the reference is the only sure check that it loads,
so a reference that cannot be loaded is refused before anything starts; it has the device to itself (no
contention for the arms' GPU memory, no slower first steps); and the UI opens with the row already there,
with nothing to supervise. It costs the validation's seconds once: a later run with the same inputs, in
this experiment or another one under the same logs folder, reuses the result.

    <experiment>/_reference/validation.json   `gputwin validate --json`'s result, plus "reference": the
                                              inputs, their hashes, the key and the command that ran
    <experiment>/_reference/stdout.log, stderr.log
    <logs>/.reference-cache/<key>.json        the same result, found by the key of its inputs

No torch here: the validation runs in the child process; the UI and `status` only read the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..core.errors import UserError
from .bytecode import child_env
from ..core.paths import make_private_dir, write_atomic
from ..core.profiles import Experiment, package_model_dir
from ..reading.reference_file import REFERENCE_DIR, RESULT_FILE, ValidationInputs, inputs_for, read_result

CACHE_DIR = ".reference-cache"  # under the logs folder, shared by its experiments
CONTENT_HASH_LIMIT = 64 * 2**20  # bigger files (a full model's weights) are fingerprinted by size and mtime

Say = Callable[[str], None]


# ---------------------------------------------------------------- hashes


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_hashes(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones and README.md left out): sha256 of its content, or size and
    modification time for files over CONTENT_HASH_LIMIT."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or any(part.startswith(".") for part in rel.split("/")) or rel == "README.md":
            continue
        info = path.stat()
        out[rel] = (file_digest(path) if info.st_size <= CONTENT_HASH_LIMIT
                    else f"size {info.st_size} mtime {info.st_mtime_ns}")
    return out


def _effective_base(inputs: ValidationInputs) -> str | None:
    """The base `gputwin validate` will load: --base, else the adapter's gputwin.json, else its peft config."""
    if inputs.base:
        return inputs.base
    for name, key in (("gputwin.json", "base"), ("adapter_config.json", "base_model_name_or_path")):
        try:
            value = json.loads((Path(inputs.model) / name).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if value:
            return str(value)
    return None


def _base_hashes(base: str | None) -> dict[str, str] | str | None:
    """A local base folder by its files; a hub id by the revision the local cache holds."""
    if base is None:
        return None
    folder = package_model_dir(base.removeprefix("package:")) if base.startswith("package:") else Path(base)
    if folder is not None and folder.is_dir():
        return folder_hashes(folder)
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    ref = hub.expanduser() / f"models--{base.replace('/', '--')}" / "refs" / "main"
    try:
        return "revision " + ref.read_text(encoding="utf-8").strip()
    except OSError:
        return "not in the local cache"


def input_hashes(inputs: ValidationInputs) -> dict[str, Any]:
    """What the result depends on, content included; the cache key is the hash of all of it."""
    from .. import __version__

    base = _effective_base(inputs)
    return {"gputwin": __version__, "inputs": dataclasses.asdict(inputs), "model": folder_hashes(Path(inputs.model)),
            "base": base, "base_files": _base_hashes(base), "test_data": file_digest(Path(inputs.test_data))}


def cache_key(hashes: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:24]


# ---------------------------------------------------------------- running it


def _write(path: Path, data: dict[str, Any]) -> None:
    make_private_dir(path.parent)
    write_atomic(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def _scores(result: dict[str, Any]) -> str:
    return (f"precision {100 * result['precision']:.1f}%  recall {100 * result['recall']:.1f}%  "
            f"F1 {100 * result['f1']:.1f}% on {result.get('n')} samples")


def _failure(stderr: Path, code: int) -> tuple[str, str]:
    """The validator's own message and hint (`gputwin: error: ...`), else the last line it wrote."""
    try:
        lines = [line for line in stderr.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("gputwin: error: "):
            message = lines[i].removeprefix("gputwin: error: ")
            hints = [line.strip().removeprefix("hint: ") for line in lines[i + 1:] if line.strip().startswith("hint:")]
            return message, (hints[0] + f"; details in {stderr}") if hints else f"details in {stderr}"
    last = lines[-1] if lines else f"it exited with status {code} and wrote nothing to stderr"
    return last, f"the traceback is in {stderr}"


def ensure_reference(experiment: Experiment, exp_root: Path, say: Say) -> dict[str, Any]:
    """The reference's validation in `exp_root`/_reference/: reused when its inputs' hashes match, else
    `gputwin validate` runs now. A reference that cannot be validated is a UserError naming it."""
    spec = experiment.reference
    assert spec is not None
    inputs = inputs_for(experiment)
    hashes = input_hashes(inputs)
    key = cache_key(hashes)
    folder = exp_root / REFERENCE_DIR
    target = folder / RESULT_FILE
    cached = exp_root.parent / CACHE_DIR / f"{key}.json"
    for source in (target, cached):
        result = read_result(source)
        if result is not None and result.get("reference", {}).get("key") == key:
            if source != target:
                _write(target, result)
            say(f"Reference {spec.name}: {_scores(result)} (validated before with the same inputs, {key}; "
                f"{source})")
            return result
    partial = folder / f".{RESULT_FILE}.{os.getpid()}.tmp"
    command = inputs.command(target)
    say(f"Validating the reference {spec.name} before the arms start: {command}")
    make_private_dir(folder)
    env = dict(child_env(os.environ), CUDA_DEVICE_ORDER=os.environ.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID"))
    started = time.monotonic()
    with open(folder / "stdout.log", "wb") as out, open(folder / "stderr.log", "wb") as err:
        code = subprocess.run([sys.executable, "-m", "gputwin.faces.cli", *inputs.arguments(partial)], stdout=out,
                              stderr=err, stdin=subprocess.DEVNULL, env=env).returncode
    result = read_result(partial) if code == 0 else None
    if result is None:
        partial.unlink(missing_ok=True)
        message, hint = _failure(folder / "stderr.log", code)
        where = experiment.source or experiment.name
        raise UserError(f"{where}: reference.model: {spec.model} cannot be validated, so no arm was started: "
                        f"{message}", hint)
    result["reference"] = {"name": spec.name, "key": key, "command": command, "hashes": hashes,
                           "seconds": round(time.monotonic() - started, 1)}
    _write(target, result)
    partial.unlink(missing_ok=True)
    _write(cached, result)
    say(f"Reference {spec.name}: {_scores(result)} ({time.monotonic() - started:.0f} s; {target})")
    return result


# ---------------------------------------------------------------- reading it
