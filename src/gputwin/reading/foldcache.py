"""A saved fold beside each event log, ``<arm>/events.fold``, so attaching to a long run reads only its tail.

    save(log, state, position) -> bool   keep `state` (the fold of the log up to `position`) beside the log
    load(log) -> SavedFold | None        the saved fold, only when it still matches the log on disk
    fold_log(log, name) -> (state, tailer)   the whole log folded as a reader would, from its saved fold if valid
    WriterFold(log)                      the fold an EventWriter keeps of its own log and saves now and then

Parsing a line costs several microseconds and folding it well under one, so a million-line log takes
seconds to read from the top but milliseconds from a saved fold. The file is a cache: it is trusted only
when the log still has the same identity (device, inode), at least the bytes it covers, the same first
bytes and the same bytes just before the offset, and when it was written by this gputwin for this state
layout and is owned by this user. Anything else (missing, corrupt, another version, a rewritten or
truncated log) makes ``load`` return None and the reader folds from the top. Deleting it is always safe.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..core import events as ev
from ..core import state as st
from ..core.paths import read_own_file, write_atomic
from ..core.eta import StepTimer
from .tailer import HEAD_BYTES, LogPosition, Tailer, fold_new, head_of

FORMAT_VERSION = 1
SUFFIX = ".fold"
BEFORE_BYTES = 64  # bytes just before the offset, checked on load
MAX_FOLD_BYTES = 16 << 20  # the state is bounded (512 loss buckets); a bigger file is not ours
SAVE_EVERY_S = 30.0  # a writer saves its fold this often (and after an ending event, and on close)

_RECORDS = (st.ArmState, st.ValidationPoint, st.ProbePoint, st.CheckpointPoint, st.Failure, st.Extension)
_SLOTTED = (st.LossHistory, StepTimer)
# Classes a fold file may name; anything else in the pickle is refused before it is built.
_ALLOWED = {(c.__module__, c.__name__) for c in (*_RECORDS, *_SLOTTED)}
# The saved classes' attribute names: a fold pickled under another layout is not loaded.
LAYOUT = (*(tuple(f.name for f in dataclasses.fields(c)) for c in _RECORDS), *(tuple(c.__slots__) for c in _SLOTTED))


@dataclass(frozen=True)
class SavedFold:
    """A fold file that matches its log: ``state`` is the fold of everything before ``position``."""

    position: LogPosition
    state: st.ArmState


def fold_path(log: Path) -> Path:
    """``<arm>/events.jsonl`` -> ``<arm>/events.fold``."""
    return log.with_suffix(SUFFIX)


# ---------------------------------------------------------------- save


def save(log: Path, state: st.ArmState, position: LogPosition) -> bool:
    """Save `state`, the fold of `log` up to `position`, beside the log (atomic replace, mode 0600).

    Refuses (False) when the log on disk is no longer the one `position` was read from, or on any
    OS error: a fold is a cache, never worth failing a writer or a reader for."""
    if position.offset <= 0:
        return False
    try:
        before = _bytes_before(log, position)
        if before is None:
            return False
        saved = {"format": FORMAT_VERSION, "gputwin": __version__, "layout": LAYOUT, "offset": position.offset,
                 "lines": position.lines, "ident": position.ident, "head": position.head, "before": before,
                 "state": dataclasses.replace(state, hparams={})}  # the profile is the reader's, not the log's
        write_atomic(fold_path(log), pickle.dumps(saved, protocol=pickle.HIGHEST_PROTOCOL))
    except OSError:
        return False
    return True


def _bytes_before(log: Path, position: LogPosition) -> bytes | None:
    """The BEFORE_BYTES before the offset, when the log is still the file `position` describes."""
    with open(log, "rb") as fh:
        info = os.fstat(fh.fileno())
        if (info.st_dev, info.st_ino) != position.ident or info.st_size < position.offset:
            return None
        if head_of(fh.read(HEAD_BYTES)) != position.head:
            return None
        start = max(0, position.offset - BEFORE_BYTES)
        fh.seek(start)
        before = fh.read(position.offset - start)
    return before if before.endswith(b"\n") else None


# ---------------------------------------------------------------- load


class _Unpickler(pickle.Unpickler):
    """Builds only gputwin's state classes: a planted fold file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a saved fold")
        return super().find_class(module, name)


def load(log: Path) -> SavedFold | None:
    """The fold saved beside `log` when it still matches the log on disk; None otherwise. Never raises."""
    try:
        saved = _read(fold_path(log))
        if saved is None:
            return None
        position = LogPosition(saved["offset"], saved["lines"], saved["ident"], saved["head"])
        return SavedFold(position, saved["state"]) if _matches(log, position, saved["before"]) else None
    except OSError:
        return None


def _read(path: Path) -> dict[str, Any] | None:
    """The fold file's dict when it is ours (owner, mode, size), whole, of this version and layout."""
    data = read_own_file(path, MAX_FOLD_BYTES)
    if data is None:
        return None
    try:
        saved = _Unpickler(io.BytesIO(data)).load()
    except Exception:  # noqa: BLE001 - a damaged pickle raises almost anything; it is only a cache
        return None
    return saved if _well_formed(saved) else None


def _well_formed(saved: Any) -> bool:
    if not isinstance(saved, dict):
        return False
    if (saved.get("format"), saved.get("gputwin"), saved.get("layout")) != (FORMAT_VERSION, __version__, LAYOUT):
        return False
    ident = saved.get("ident")
    return (_is_int(saved.get("offset")) and saved["offset"] > 0 and _is_int(saved.get("lines"))
            and saved["lines"] >= 0 and isinstance(ident, tuple) and len(ident) == 2 and all(map(_is_int, ident))
            and isinstance(saved.get("head"), bytes) and isinstance(saved.get("before"), bytes)
            and saved["before"].endswith(b"\n") and isinstance(saved.get("state"), st.ArmState))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _matches(log: Path, position: LogPosition, before: bytes) -> bool:
    """The log is the file the fold was made from, and still holds every byte the fold covers."""
    return _bytes_before(log, position) == before


# ---------------------------------------------------------------- folding a whole log


def fold_log(log: Path, name: str) -> tuple[st.ArmState, Tailer]:
    """The fold of everything `log` holds, as a reader makes it: from its saved fold when that is valid,
    else from the top. The tailer returned stands at the end of what was read."""
    tailer = Tailer(log)
    state = st.ArmState(name)
    saved = load(log)
    if saved is not None:
        tailer.start_at(saved.position)
        state = saved.state
        state.name = name
    return fold_new(tailer, state, lambda: st.ArmState(name))[0], tailer


class WriterFold:
    """The fold an EventWriter keeps of its own log: each event it writes is applied as it goes (O(1)),
    and the fold is saved beside the log every SAVE_EVERY_S, after an ending event and on close.

    Opening a log that has lines already (a resumed trainer) folds them once, from the saved fold when
    valid. If another process appends to the log meanwhile, this fold no longer describes it and saving
    stops (the last fold saved still covers a true prefix of the log)."""

    def __init__(self, log: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.clock = clock
        self.diverged = False  # the log holds bytes this fold did not see: never save again
        try:
            self.state, self._tailer = fold_log(log, log.parent.name)
        except OSError:  # unreadable: the writer still writes, the readers fold from the top
            self.state, self._tailer, self.diverged = st.ArmState(log.parent.name), None, True
        self._take_position()
        self._due = clock() + SAVE_EVERY_S
        if self.offset and not self.cut_line:
            self.save()  # a log from an older gputwin, or past the last save: attach fast from now on

    @property
    def cut_line(self) -> bool:
        """The log ends in a line without its newline (the previous writer died while writing it)."""
        return self._tailer is not None and self._tailer.partial

    def catch_up(self) -> None:
        """Fold what this process appended without ``add`` (the newline that ends a cut line)."""
        if self._tailer is not None:
            self.state = fold_new(self._tailer, self.state, lambda: st.ArmState(self.state.name))[0]
        self._take_position()
        self.save()

    def _take_position(self) -> None:
        position = self._tailer.position if self._tailer is not None else None
        if position is None:  # the log vanished under the writer
            position, self.diverged = LogPosition(0, 0, (0, 0), b""), True
        self.offset, self.lines, self.ident, self.head = position.offset, position.lines, position.ident, position.head

    def add(self, event: dict[str, Any], line: str) -> None:
        """`event` (as ev.make built it) was just written and flushed as `line`."""
        data = line.encode("utf-8")
        if not self.offset:
            self.head = head_of(data)
        self.offset += len(data)
        self.lines += 1
        kind = event["kind"]
        st.apply(self.state, ev.Event(kind, float(event["t"]), event))
        if kind in ev.TERMINAL_KINDS or self.clock() >= self._due:
            self.save()

    def save(self) -> bool:
        """Save now, unless the log holds bytes this fold did not write or read."""
        self._due = self.clock() + SAVE_EVERY_S
        if not self.diverged:
            try:
                self.diverged = os.stat(self.log).st_size != self.offset
            except OSError:
                return False
        if self.diverged:
            return False
        return save(self.log, self.state, LogPosition(self.offset, self.lines, self.ident, self.head))
