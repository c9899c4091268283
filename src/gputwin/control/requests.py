"""Requests from the UI/CLI to a running trainer, as small atomic files in ``<arm>/control/``.

A request is written to a temporary name and renamed into place, so the trainer never reads half
of one. The trainer polls between steps, handles requests oldest first and removes each file after
acting on it. Requests are parsed strictly: a known action, known fields, plain numbers; nothing
in a request is executed or used as a path.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

STOP = "stop"
EXTEND = "extend"
VALIDATE = "validate"
ACTIONS = frozenset({STOP, EXTEND, VALIDATE})
MAX_REQUEST_BYTES = 4096


class ControlError(ValueError):
    """A control file that is not a valid request."""


@dataclass(frozen=True)
class Request:
    action: str
    epochs: int = 0
    by: str = "cli"
    path: Path | None = None


def _validate(obj: object) -> Request:
    if not isinstance(obj, dict):
        raise ControlError("not a JSON object")
    unknown = set(obj) - {"action", "epochs", "by", "t"}
    if unknown:
        raise ControlError(f"unknown field(s) {sorted(unknown)}")
    action = obj.get("action")
    if action not in ACTIONS:
        raise ControlError(f"unknown action {action!r}; expected one of {sorted(ACTIONS)}")
    epochs = obj.get("epochs", 0)
    if action == EXTEND:
        if not isinstance(epochs, int) or isinstance(epochs, bool) or not 1 <= epochs <= 1000:
            raise ControlError(f"extend needs epochs as a whole number from 1 to 1000, got {epochs!r}")
    by = obj.get("by", "cli")
    if not isinstance(by, str) or len(by) > 64:
        raise ControlError("'by' must be a short string")
    return Request(action=action, epochs=epochs if action == EXTEND else 0, by=by)


def write_request(control_dir: Path, action: str, *, epochs: int = 0, by: str = "cli") -> Path:
    """Atomically drop a request for the trainer; returns the file written."""
    request = _validate({"action": action, "epochs": epochs, "by": by})
    control_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(control_dir, 0o700)
    stamp = f"{time.time_ns():020d}"
    final = control_dir / f"{stamp}-{request.action}.json"
    tmp = control_dir / f".{stamp}-{request.action}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"action": request.action, "epochs": request.epochs, "by": request.by, "t": time.time()}, fh)
    os.replace(tmp, final)
    return final


def _read_small_file(path: Path) -> str:
    """The text of a regular file of at most MAX_REQUEST_BYTES; never follows a link, never blocks on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if path.is_symlink():
            raise ControlError("a symbolic link, not a plain file") from None
        raise ControlError(f"unreadable request: {exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ControlError("not a plain file")
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(MAX_REQUEST_BYTES + 1)
    if len(data) > MAX_REQUEST_BYTES:
        raise ControlError(f"larger than {MAX_REQUEST_BYTES} bytes")
    return data.decode("utf-8")


def pending(control_dir: Path) -> list[tuple[Path, Request | ControlError]]:
    """Requests waiting in the folder, oldest first; a bad file comes back as its ControlError."""
    if not control_dir.is_dir():
        return []
    out: list[tuple[Path, Request | ControlError]] = []
    for path in sorted(control_dir.glob("[0-9]*.json")):
        try:
            request = _validate(json.loads(_read_small_file(path)))
            out.append((path, Request(request.action, request.epochs, request.by, path)))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            out.append((path, ControlError(f"unreadable request: {exc}")))
        except ControlError as exc:
            out.append((path, exc))
    return out


def consume(path: Path) -> None:
    """Remove a handled (or rejected) request; a folder with a request's name is renamed out of the way."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        path.rename(path.with_name(f".rejected-{path.name}"))
