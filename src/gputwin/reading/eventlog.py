"""Writing an arm's event log: the trainer's (and the HF Trainer callback's) side of ``events.jsonl``.

    EventWriter(path, fold=False)   append events, one flushed line each; with ``fold`` keep and save the
                                    log's fold beside it (gputwin.reading.foldcache) so readers attach fast

The schema itself is gputwin.core.events (pure); this module does the file I/O and sits with the readers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

from ..core import events as ev
from . import foldcache


class EventWriter:
    """Appends events to a log, one flushed line each, so readers never see half an event
    unless the process dies mid-write (readers hold back a partial last line).

    With ``fold=True`` it also keeps the fold of its log (foldcache.WriterFold) and saves it
    beside the log as ``events.fold``, so a reader attaches to a long run without parsing every line.
    A log whose last line was cut (the previous writer died mid-line) first gets that line ended, so
    this process's events start on a line of their own, as every reader of the log will see them."""

    def __init__(self, path: Path, *, fold: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh: IO[str] = open(path, "a", encoding="utf-8")
        os.chmod(path, 0o600)
        self._fold: foldcache.WriterFold | None = None
        if fold:
            self._fold = foldcache.WriterFold(path)
            if self._fold.cut_line:
                self._write("\n")
                self._fold.catch_up()

    def _write(self, text: str) -> None:
        self._fh.write(text)
        self._fh.flush()

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = ev.make(kind, **fields)
        line = ev.dumps(event) + "\n"
        self._write(line)
        if self._fold is not None:
            self._fold.add(event, line)
        return event

    def close(self) -> None:
        if self._fold is not None and not self._fh.closed:
            self._fold.save()
        self._fh.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
