"""gputwin.EventWriter with its fold on: what it saves is what a reader of the log would fold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gputwin.reading.eventlog import EventWriter
from gputwin.core import events as ev
from gputwin.reading import foldcache
from gputwin.core import state as st

from foldlog import BAD_LINE, comparable, realistic_lines, whole_fold

PARTIAL = '{"v":1,"t":5,"kind":"step","step":4,"epo'  # the last trainer died while writing this line


def emit_line(writer: EventWriter, line: str) -> None:
    """Emit the event a log line holds, through the writer (the same line comes out)."""
    fields = json.loads(line)
    del fields["v"]
    writer.emit(fields.pop("kind"), **fields)


def events_only(lines: list[str]) -> list[str]:
    return [line for line in lines if line != BAD_LINE]


def test_the_saved_fold_is_the_readers_fold_after_each_ending_event_and_on_close(tmp_path: Path) -> None:
    path = tmp_path / "a" / "events.jsonl"
    lines = events_only(realistic_lines())
    checked = 0
    with EventWriter(path, fold=True) as writer:
        for line in lines:
            emit_line(writer, line)
            if json.loads(line)["kind"] in ev.TERMINAL_KINDS:  # stopped, failed: saved at once
                saved = foldcache.load(path)
                assert saved is not None and saved.position.offset == path.stat().st_size
                assert comparable(saved.state) == comparable(whole_fold(path))
                checked += 1
    assert checked == 3  # stopped, failed, finished
    assert path.read_text(encoding="utf-8") == "".join(lines)  # the fold changes nothing in the log
    saved = foldcache.load(path)
    assert saved is not None and saved.position.lines == len(lines)
    assert comparable(saved.state) == comparable(whole_fold(path))


@pytest.mark.parametrize("every_s", [3600.0, 0.0])
def test_between_ending_events_the_fold_is_saved_every_save_every_s(every_s: float, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a" / "events.jsonl"
    lines = realistic_lines()[:30]  # no ending event among them
    monkeypatch.setattr(foldcache, "SAVE_EVERY_S", every_s)
    writer = EventWriter(path, fold=True)
    for line in lines:
        emit_line(writer, line)
        saved = foldcache.load(path)
        if every_s:  # the interval is not over: nothing saved yet
            assert saved is None
        else:  # every event is past the interval: each save covers the log as it stands
            assert saved is not None and saved.position.offset == path.stat().st_size
    writer.close()
    assert comparable(foldcache.load(path).state) == comparable(whole_fold(path))  # type: ignore[union-attr]


def test_a_resumed_writer_starts_from_the_saved_fold_and_folds_only_what_follows(tmp_path: Path) -> None:
    path = tmp_path / "a" / "events.jsonl"
    lines = events_only(realistic_lines())
    with EventWriter(path, fold=True) as writer:
        for line in lines[:800]:
            emit_line(writer, line)
    saved = foldcache.load(path)
    assert saved is not None
    mark = "a mark no event sets"  # a line of stderr_tail, which only the watcher sets
    saved.state.stderr_tail.insert(0, mark)  # seen again only if the next writer starts from this fold
    assert foldcache.save(path, saved.state, saved.position)
    with EventWriter(path, fold=True) as writer:
        for line in lines[800:850]:
            emit_line(writer, line)
    resumed = foldcache.load(path)
    assert resumed is not None and resumed.position.lines == 850
    assert resumed.state.stderr_tail[0] == mark and resumed.state.events_seen == 850
    del resumed.state.stderr_tail[0]
    assert comparable(resumed.state) == comparable(whole_fold(path))


def test_a_writer_on_a_log_without_a_fold_folds_it_once_and_saves_it_at_once(tmp_path: Path) -> None:
    path = tmp_path / "a" / "events.jsonl"
    lines = realistic_lines()
    path.parent.mkdir()
    path.write_text("".join(lines[:1000]), encoding="utf-8")  # written by an older gputwin: no fold beside it
    writer = EventWriter(path, fold=True)
    saved = foldcache.load(path)
    assert saved is not None and saved.position.offset == path.stat().st_size
    assert comparable(saved.state) == comparable(whole_fold(path)) and saved.state.bad_line_count == 1
    for line in lines[1000:]:
        emit_line(writer, line)
    writer.close()
    assert comparable(foldcache.load(path).state) == comparable(whole_fold(path))  # type: ignore[union-attr]


def test_a_cut_last_line_is_ended_so_the_new_events_stand_on_their_own(tmp_path: Path) -> None:
    path = tmp_path / "a" / "events.jsonl"
    lines = realistic_lines()[:40]
    path.parent.mkdir()
    path.write_text("".join(lines) + PARTIAL, encoding="utf-8")
    with EventWriter(path, fold=True) as writer:
        emit_line(writer, lines[0])  # a new trainer process starts
        emit_line(writer, lines[1])
    reader = whole_fold(path)
    assert reader.bad_line_count == 1 and reader.bad_lines[0][0] == 41 and reader.events_seen == 42
    assert comparable(foldcache.load(path).state) == comparable(reader)  # type: ignore[union-attr]


def test_lines_another_process_appends_stop_the_saving_and_the_fold_saved_before_still_holds(
        tmp_path: Path) -> None:
    path = tmp_path / "a" / "events.jsonl"
    lines = events_only(realistic_lines())
    stop = next(i for i, line in enumerate(lines) if '"kind":"stopped"' in line)
    with EventWriter(path, fold=True) as writer:
        for line in lines[:stop + 1]:
            emit_line(writer, line)
        covered = path.stat().st_size  # the stopped event saved the fold up to here
        with open(path, "a", encoding="utf-8") as other:
            other.write("".join(lines[stop + 1:stop + 4]))  # not through this writer
        for line in lines[stop + 4:]:
            emit_line(writer, line)
    saved = foldcache.load(path)
    assert saved is not None and saved.position.offset == covered
    state, _ = foldcache.fold_log(path, "a")
    assert comparable(state) == comparable(whole_fold(path))


def test_a_writer_without_its_fold_leaves_no_fold_file(tmp_path: Path) -> None:
    path = tmp_path / "a" / "events.jsonl"
    with EventWriter(path) as writer:
        for line in realistic_lines()[:10]:
            emit_line(writer, line)
    assert sorted(p.name for p in path.parent.iterdir()) == ["events.jsonl"]


def test_importing_events_leaves_the_fold_and_the_state_unimported() -> None:
    code = ("import sys, gputwin.core.events; "
            "print(sorted(m for m in sys.modules if m in ('gputwin.core.state', 'gputwin.reading.foldcache', 'gputwin.reading.tailer')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
