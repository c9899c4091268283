"""gputwin.reading.foldcache: a saved fold is used only while it matches its log, and then changes nothing."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from gputwin.reading import foldcache
from gputwin.core import state as st
from gputwin.reading.foldcache import LogPosition
from gputwin.reading.tailer import Tailer, fold_new

from foldlog import BAD_LINE, comparable, realistic_lines, whole_fold


def write_log(folder: Path, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "events.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def fold_and_save(path: Path, name: str = "a") -> tuple[st.ArmState, LogPosition]:
    """What a reader does: fold the log as it is now, then save that fold beside it."""
    tailer = Tailer(path)
    state, _ = fold_new(tailer, st.ArmState(name), lambda: st.ArmState(name))
    position = tailer.position
    assert position is not None and foldcache.save(path, state, position)
    return state, position


def test_saved_fold_plus_the_rest_of_the_log_equals_a_fold_of_the_whole_log(tmp_path: Path) -> None:
    lines = realistic_lines()
    whole = write_log(tmp_path / "whole", lines)
    expected = comparable(whole_fold(whole))
    assert BAD_LINE in lines and whole_fold(whole).bad_line_count == 1
    special = [i for i, line in enumerate(lines) if '"kind":"step"' not in line]
    cuts = sorted({1, 2, len(lines) - 1, *range(5, len(lines), 97), *special, *(i + 1 for i in special)})
    for cut in (c for c in cuts if c > 0):
        path = write_log(tmp_path / f"cut-{cut}", lines[:cut])
        fold_and_save(path)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write("".join(lines[cut:]))
        saved = foldcache.load(path)
        assert saved is not None and saved.position.lines == cut, cut
        state, tailer = foldcache.fold_log(path, "a")
        assert comparable(state) == expected, f"cut after line {cut}"
        assert tailer.offset == path.stat().st_size and tailer.line_no == len(lines)


def test_the_fold_file_is_private_and_keeps_no_profile(tmp_path: Path) -> None:
    path = write_log(tmp_path, realistic_lines()[:50])
    state, position = fold_and_save(path)
    state.hparams = {"device": 1}  # the reader's profile, not something the log says
    assert foldcache.save(path, state, position)
    fold = foldcache.fold_path(path)
    assert fold == tmp_path / "events.fold" and (fold.stat().st_mode & 0o777) == 0o600
    saved = foldcache.load(path)
    assert saved is not None and saved.state.hparams == {} and saved.state.events_seen == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.fold", "events.jsonl"]


def _damage(kind: str, path: Path, fold: Path, offset: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """One way a saved fold (covering `offset` bytes) stops matching, or stops being a fold file at all."""
    data = fold.read_bytes()
    if kind == "missing":
        fold.unlink()
    elif kind == "corrupt":
        fold.write_bytes(b"\x80\x05 not a pickle at all" * 10)
    elif kind == "truncated pickle":
        fold.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        fold.write_bytes(b"")
    elif kind == "other format":
        monkeypatch.setattr(foldcache, "FORMAT_VERSION", foldcache.FORMAT_VERSION + 1)
    elif kind == "other gputwin version":
        monkeypatch.setattr(foldcache, "__version__", "0.0.1")
    elif kind == "other state layout":
        monkeypatch.setattr(foldcache, "LAYOUT", foldcache.LAYOUT + (("new_field",),))
    elif kind == "log replaced":
        fresh = path.with_name("fresh")
        fresh.write_bytes(path.read_bytes())  # the same bytes in a new file (a new inode)
        os.replace(fresh, path)
    elif kind == "log truncated":
        with open(path, "r+b") as fh:
            fh.truncate(100)
    elif kind == "log rewritten in place":
        text = bytearray(path.read_bytes())
        text[offset - 10] = ord("7") if text[offset - 10] != ord("7") else ord("8")
        path.write_bytes(bytes(text))  # same inode and size, another byte just before the fold's end
    elif kind == "other first line":
        text = path.read_bytes()
        path.write_bytes(text.replace(b'"t":1767600000.0', b'"t":1767600009.0', 1))  # in the first 64 bytes
    elif kind == "group-writable":
        fold.chmod(0o620)
    elif kind == "a symlink":
        real = fold.with_name("elsewhere")
        fold.rename(real)
        fold.symlink_to(real)
    else:
        raise AssertionError(kind)


DAMAGE = ["missing", "corrupt", "truncated pickle", "empty", "other format", "other gputwin version",
          "other state layout", "log replaced", "log truncated", "log rewritten in place", "other first line",
          "group-writable", "a symlink"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_fold_that_does_not_match_is_not_loaded_and_the_log_is_folded_from_the_top(
        kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = realistic_lines()
    path = write_log(tmp_path, lines[:700])
    _, position = fold_and_save(path)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(lines[700:]))
    assert foldcache.load(path) is not None
    _damage(kind, path, foldcache.fold_path(path), position.offset, monkeypatch)
    assert foldcache.load(path) is None
    state, tailer = foldcache.fold_log(path, "a")
    assert comparable(state) == comparable(whole_fold(path))
    assert tailer.restarts == 0  # read from the top at once, not from the saved offset then again


@pytest.mark.skipif(os.getuid() != 0, reason="giving a file to another user needs root")
def test_a_fold_file_owned_by_another_user_is_not_loaded(tmp_path: Path) -> None:
    path = write_log(tmp_path, realistic_lines()[:100])
    fold_and_save(path)
    os.chown(foldcache.fold_path(path), 12345, -1)
    assert foldcache.load(path) is None


def test_a_planted_pickle_cannot_run_code(tmp_path: Path) -> None:
    path = write_log(tmp_path, realistic_lines()[:100])
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    foldcache.fold_path(path).write_bytes(pickle.dumps({"format": foldcache.FORMAT_VERSION, "state": Payload()}))
    foldcache.fold_path(path).chmod(0o600)
    assert foldcache.load(path) is None
    assert not marker.exists()


def test_save_refuses_a_log_that_is_not_the_one_read(tmp_path: Path) -> None:
    path = write_log(tmp_path, realistic_lines()[:100])
    state, position = fold_and_save(path)
    foldcache.fold_path(path).unlink()
    other_file = LogPosition(position.offset, position.lines, (position.ident[0], position.ident[1] + 1), position.head)
    mid_line = LogPosition(position.offset - 3, position.lines, position.ident, position.head)
    past_end = LogPosition(position.offset + 10, position.lines, position.ident, position.head)
    other_head = LogPosition(position.offset, position.lines, position.ident, b"{}")
    nothing = LogPosition(0, 0, position.ident, position.head)
    for wrong in (other_file, mid_line, past_end, other_head, nothing):
        assert not foldcache.save(path, state, wrong), wrong
    assert not foldcache.fold_path(path).exists()
    assert not foldcache.save(tmp_path / "gone" / "events.jsonl", state, position)  # never raises


SAVER = """
import sys
from pathlib import Path
from gputwin.reading import foldcache
from gputwin.core import state as st
from gputwin.reading.tailer import Tailer, fold_new
path = Path(sys.argv[1])
tailer = Tailer(path)
state, _ = fold_new(tailer, st.ArmState("a"), lambda: st.ArmState("a"))
for _ in range(int(sys.argv[2])):
    assert foldcache.save(path, state, tailer.position)
"""


def test_two_processes_saving_at_once_never_leave_a_broken_file(tmp_path: Path) -> None:
    path = write_log(tmp_path, realistic_lines())
    fold_and_save(path)
    savers = [subprocess.Popen([sys.executable, "-c", SAVER, str(path), "300"]) for _ in range(2)]
    loads = 0
    while any(s.poll() is None for s in savers):
        assert foldcache.load(path) is not None  # the old whole file or the new, never half of one
        loads += 1
    assert [s.wait() for s in savers] == [0, 0]
    assert foldcache.load(path) is not None and loads > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.fold", "events.jsonl"]
