"""Reading an event log as it grows: the incremental tailer.

    Tailer(path).read_new() -> (events, bad_lines)   only what was appended since the last call;
                                                     a partial last line is held back until complete;
                                                     truncation or replacement restarts from the top
                                                     (``restarts`` counts it so readers can rebuild);
                                                     read_new(max_bytes) reads about that much at most
                                                     (whole lines) and sets ``behind`` when more waits
    Tailer.position / start_at(position)             where it stands; go on from a saved fold's position
    LogPosition, head_of                             where a reader stands in a log; the bytes that identify it
    fold_new(tailer, state, fresh)                   fold all that is new into state, a long log in chunks

The fold cache (gputwin.reading.foldcache) saves a fold with a tailer's position; the experiment watcher
(gputwin.reading.watcher) keeps one tailer per arm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core import events as ev
from ..core import state as st

HEAD_BYTES = 64  # first bytes of a log, remembered to notice a file rewritten in place
READ_CHUNK_BYTES = 8 << 20  # a long log is parsed and folded this much at a time: memory stays small, and
                            # short-lived events keep Python's collector from rescanning a million of them


@dataclass(frozen=True)
class LogPosition:
    """Where a reader stands in a log: ``offset`` bytes (just after a newline) and ``lines`` lines read,
    in the file with identity ``ident`` (st_dev, st_ino) whose first bytes are ``head``."""

    offset: int
    lines: int
    ident: tuple[int, int]
    head: bytes


def head_of(data: bytes) -> bytes:
    """The bytes that identify a log, from its first bytes: its first HEAD_BYTES, or its first line if shorter."""
    head = data[:HEAD_BYTES]
    newline = head.find(b"\n")
    return head if newline < 0 else head[:newline]


class Tailer:
    """Incremental reader of one JSONL event log, by byte offset."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offset = 0  # bytes consumed: always just after a newline
        self.line_no = 0  # lines consumed
        self.restarts = 0  # times the file was truncated or replaced and read again from the top
        self.partial = False  # an unfinished last line is waiting
        self.behind = False  # the last read_new stopped at max_bytes with more already in the file
        self._ident: tuple[int, int] | None = None
        self._head = b""

    @property
    def position(self) -> LogPosition | None:
        """Where reading stands (for saving a fold of what was read); None while the file is not there."""
        if self._ident is None:
            return None
        return LogPosition(self.offset, self.line_no, self._ident, self._head)

    def start_at(self, position: LogPosition) -> None:
        """Go on from `position` (a saved fold's) instead of the top: the next read returns what follows.

        read_new still checks the file's identity, size and first bytes against it, so a log rewritten
        since the position was taken is read again from the top (and counted in ``restarts``)."""
        self.offset, self.line_no = position.offset, position.lines
        self._ident, self._head = position.ident, position.head
        self.partial = self.behind = False

    def _restart(self) -> None:
        self.offset = self.line_no = 0
        self.partial = False
        self._head = b""
        self.restarts += 1

    def read_new(self, max_bytes: int | None = None) -> tuple[list[ev.Event], list[tuple[int, str]]]:
        """Events appended since the last call, and (line number, reason) for lines that are not events.

        With `max_bytes`, stop after about that many bytes (at the end of a line); ``behind`` says whether
        the file held more then."""
        self.behind = False
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            if self.offset or self.partial:
                self._restart()  # removed: whatever comes next is a new log
            self._ident = None
            return [], []
        ident = (info.st_dev, info.st_ino)
        if (self._ident is not None and ident != self._ident) or info.st_size < self.offset:
            self._restart()
        self._ident = ident
        if info.st_size == self.offset:
            self.partial = False
            return [], []
        with open(self.path, "rb") as fh:
            if self.offset and self._head:
                if fh.read(len(self._head)) != self._head:
                    self._restart()
            fh.seek(self.offset)
            size = info.st_size - self.offset
            if max_bytes is not None and size > max_bytes:
                data = fh.read(max_bytes) + fh.readline()  # the rest of the line the cut fell in
                self.behind = fh.tell() < info.st_size
            else:
                data = fh.read(size)
            if self.offset == 0:
                self._head = head_of(data)
        end = data.rfind(b"\n") + 1
        self.partial = end < len(data)
        if end == 0:
            return [], []
        self.offset += end
        return self._parse(data[:end].split(b"\n")[:-1])

    def _parse(self, lines: list[bytes]) -> tuple[list[ev.Event], list[tuple[int, str]]]:
        events: list[ev.Event] = []
        bad: list[tuple[int, str]] = []
        number = self.line_no
        parse = ev.parse
        for line in lines:
            number += 1
            if not line or line.isspace():
                continue
            try:
                events.append(parse(line))
            except ev.EventError as exc:
                bad.append((number, str(exc)))
        self.line_no = number
        return events, bad


def fold_new(tailer: Tailer, state: st.ArmState,
             fresh: Callable[[], st.ArmState]) -> tuple[st.ArmState, bool]:
    """Fold everything appended since the tailer's last read into `state`; returns (state, changed).

    A long log goes in chunks, each parsed, folded and let go before the next. When the log restarts
    (truncated or replaced), what follows is folded into ``fresh()`` instead, which is returned."""
    changed = False
    while True:
        restarts = tailer.restarts
        new_events, bad = tailer.read_new(READ_CHUNK_BYTES)
        if tailer.restarts != restarts:
            state, changed = fresh(), True
        if new_events or bad:
            st.fold(state.name, new_events, state)
            state.add_bad_lines(bad)
            changed = True
        if not tailer.behind:
            return state, changed
