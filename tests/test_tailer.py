from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gputwin.core import events as ev
from gputwin.reading import foldcache
from gputwin.core import state as st
from gputwin.reading import watcher as watcher_module
from gputwin.core.paths import ExperimentPaths
from gputwin.reading.tailer import Tailer
from gputwin.reading.watcher import ExperimentWatcher

from foldlog import comparable, realistic_lines, whole_fold


def line(kind: str = ev.STEP, t: float = 100.0, **fields: object) -> str:
    if kind == ev.STEP:
        fields = {"step": 1, "epoch": 0.1, "loss": 1.5, "lr": 1e-4, **fields}
    return ev.dumps(ev.make(kind, t=t, **fields)) + "\n"


def test_missing_file_reads_nothing_until_it_appears(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    tailer = Tailer(path)
    assert tailer.read_new() == ([], [])
    path.write_text(line(step=1))
    events, bad = tailer.read_new()
    assert [e["step"] for e in events] == [1] and bad == []


def test_only_new_lines_are_returned(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(line(step=1) + line(step=2))
    tailer = Tailer(path)
    assert [e["step"] for e in tailer.read_new()[0]] == [1, 2]
    assert tailer.read_new() == ([], [])
    with path.open("a") as fh:
        fh.write(line(step=3))
    assert [e["step"] for e in tailer.read_new()[0]] == [3]
    assert tailer.line_no == 3 and tailer.offset == path.stat().st_size


def test_partial_last_line_is_held_back_then_completed(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    full = line(step=7, t=5.0)
    path.write_text(line(step=6) + full[:20])
    tailer = Tailer(path)
    events, bad = tailer.read_new()
    assert [e["step"] for e in events] == [6] and bad == []
    assert tailer.partial
    assert tailer.read_new() == ([], [])  # still incomplete: not an error
    with path.open("a") as fh:
        fh.write(full[20:])
    events, bad = tailer.read_new()
    assert [e["step"] for e in events] == [7] and bad == []
    assert events[0].t == 5.0 and not tailer.partial


def test_partial_first_line_is_held_back(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    full = line(kind=ev.MILESTONE, step=3)
    path.write_text(full[:10])
    tailer = Tailer(path)
    assert tailer.read_new() == ([], [])
    path.write_text(full)
    assert [e.kind for e in tailer.read_new()[0]] == [ev.MILESTONE]


def test_bad_line_is_reported_with_its_number(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(line(step=1) + "\n" + "this is not json\n" + '["a list"]\n' + line(step=2))
    events, bad = Tailer(path).read_new()
    assert [e["step"] for e in events] == [1, 2]
    assert [n for n, _ in bad] == [3, 4]  # the blank line 2 is skipped but counted
    assert "not JSON" in bad[0][1] and "not a JSON object" in bad[1][1]


def test_newer_schema_line_is_reported_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    newer = json.dumps({"v": ev.SCHEMA_VERSION + 1, "t": 1.0, "kind": "step", "step": 2, "shiny": True})
    path.write_text(line(step=1) + newer + "\n" + line(step=3))
    events, bad = Tailer(path).read_new()
    assert [e["step"] for e in events] == [1, 3]
    assert len(bad) == 1 and bad[0][0] == 2 and "newer" in bad[0][1]


def test_missing_required_field_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"v": 1, "t": 1.0, "kind": "step", "step": 1}) + "\n")
    events, bad = Tailer(path).read_new()
    assert events == [] and bad[0][0] == 1 and "missing" in bad[0][1]


def test_unknown_kind_of_current_schema_is_passed_through(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"v": 1, "t": 1.0, "kind": "telemetry", "x": 1}) + "\n")
    events, bad = Tailer(path).read_new()
    assert [e.kind for e in events] == ["telemetry"] and bad == []


def test_truncation_restarts_from_the_top(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(line(step=1) + line(step=2) + line(step=3))
    tailer = Tailer(path)
    tailer.read_new()
    with path.open("r+") as fh:
        fh.truncate(0)
        fh.write(line(step=10))
    events, bad = tailer.read_new()
    assert [e["step"] for e in events] == [10] and bad == []
    assert tailer.restarts == 1 and tailer.line_no == 1


def test_replaced_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(line(step=1))
    tailer = Tailer(path)
    tailer.read_new()
    fresh = tmp_path / "fresh.jsonl"
    fresh.write_text(line(step=1, t=999.0) + line(step=2, t=1000.0))
    os.replace(fresh, path)  # a new inode (log rotation, a rerun that rewrote the folder)
    events, _ = tailer.read_new()
    assert [e.t for e in events] == [999.0, 1000.0] and tailer.restarts == 1


def test_rewritten_in_place_and_longer_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(line(step=1, t=1.0))
    tailer = Tailer(path)
    tailer.read_new()
    with path.open("r+") as fh:  # same inode, more bytes, different first line
        fh.write(line(step=5, t=2.0) + line(step=6, t=3.0))
    events, _ = tailer.read_new()
    assert [e["step"] for e in events] == [5, 6] and tailer.restarts == 1


def test_removed_file_counts_as_restart(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(line(step=1))
    tailer = Tailer(path)
    tailer.read_new()
    path.unlink()
    assert tailer.read_new() == ([], [])
    path.write_text(line(step=1))
    assert len(tailer.read_new()[0]) == 1 and tailer.restarts == 1


# ---------------------------------------------------------------- saved folds: start at a position, the watcher


def test_start_at_a_position_reads_only_what_follows_with_the_same_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(line(step=1) + line(step=2))
    first = Tailer(path)
    first.read_new()
    position = first.position
    assert position is not None and (position.offset, position.lines) == (path.stat().st_size, 2)
    with path.open("a") as fh:
        fh.write("not json\n" + line(step=3))
    later = Tailer(path)
    later.start_at(position)
    events, bad = later.read_new()
    assert [e["step"] for e in events] == [3] and [n for n, _ in bad] == [3]
    assert later.restarts == 0 and later.line_no == 4


def test_start_at_a_position_in_a_file_since_replaced_reads_it_from_the_top(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(line(step=1, t=1.0) + line(step=2, t=2.0))
    first = Tailer(path)
    first.read_new()
    assert first.position is not None
    fresh = tmp_path / "fresh.jsonl"
    fresh.write_text(line(step=1, t=7.0) + line(step=2, t=8.0) + line(step=3, t=9.0))
    os.replace(fresh, path)
    later = Tailer(path)
    later.start_at(first.position)
    events, _ = later.read_new()
    assert [e.t for e in events] == [7.0, 8.0, 9.0] and later.restarts == 1


MARK = "a mark no event sets"  # a line of stderr_tail, which only the watcher sets


def never_stalled() -> float:
    """A clock before every event of realistic_lines(): no arm looks stalled."""
    return 0.0


def _experiment(tmp_path: Path, lines: list[str], device: object = None) -> ExperimentPaths:
    """One arm "a" whose log holds `lines`, with a profile.json naming the GPU (when `device` is given)."""
    exp = ExperimentPaths(tmp_path / "exp")
    arm = exp.arm("a")
    arm.root.mkdir(parents=True)
    arm.events.write_text("".join(lines), encoding="utf-8")
    arm.profile_json.write_text(json.dumps({"name": "a", "device": device}))
    return exp


def test_the_watcher_starts_from_the_saved_fold_with_its_own_profile(tmp_path: Path) -> None:
    lines = realistic_lines()
    exp = _experiment(tmp_path, lines[:900], device=3)
    log = exp.arm("a").events
    state, reader = foldcache.fold_log(log, "a")
    state.stderr_tail.insert(0, MARK)  # the watcher has it only if it started from this fold
    assert reader.position is not None and foldcache.save(log, state, reader.position)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("".join(lines[900:]))
    watcher = ExperimentWatcher(exp, never_stalled, check_liveness=False)
    assert watcher.poll() == {"a"}
    got = watcher.state.arms["a"]
    assert got.stderr_tail[0] == MARK and got.hparams == {"name": "a", "device": 3} and got.gpu_index == 3
    del got.stderr_tail[0]
    expected = whole_fold(log)
    expected.hparams, expected.gpu_index = got.hparams, 3  # a started event takes the profile's GPU index
    assert comparable(got) == comparable(expected)
    assert watcher.poll() == set()


def test_the_watcher_ignores_a_fold_that_no_longer_matches_its_log(tmp_path: Path) -> None:
    lines = realistic_lines()
    exp = _experiment(tmp_path, lines[:900])
    log = exp.arm("a").events
    state, reader = foldcache.fold_log(log, "a")
    assert reader.position is not None and foldcache.save(log, state, reader.position)
    log.write_text("".join(lines[:400]), encoding="utf-8")  # rewritten: shorter than the fold says
    watcher = ExperimentWatcher(exp, never_stalled, check_liveness=False)
    watcher.poll()
    expected = whole_fold(log)
    expected.hparams = watcher.state.arms["a"].hparams
    assert comparable(watcher.state.arms["a"]) == comparable(expected)


def test_the_watcher_saves_the_fold_of_a_long_log_it_read_from_the_top(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    lines = realistic_lines()
    exp = _experiment(tmp_path, lines, device=1)
    log = exp.arm("a").events
    monkeypatch.setattr(watcher_module, "SAVE_FOLD_AFTER_BYTES", log.stat().st_size + 1)
    ExperimentWatcher(exp, never_stalled, check_liveness=False).poll()
    assert foldcache.load(log) is None  # shorter than the threshold: not worth a file
    monkeypatch.setattr(watcher_module, "SAVE_FOLD_AFTER_BYTES", log.stat().st_size)
    first = ExperimentWatcher(exp, never_stalled, check_liveness=False)
    first.poll()
    saved = foldcache.load(log)
    assert saved is not None and saved.position.offset == log.stat().st_size
    expected = whole_fold(log)
    expected.gpu_index = 1  # taken from the profile when folded, and so from it again on every load
    assert saved.state.hparams == {} and comparable(saved.state) == comparable(expected)
    second = ExperimentWatcher(exp, never_stalled, check_liveness=False)
    second.poll()
    assert comparable(second.state.arms["a"]) == comparable(first.state.arms["a"])


def test_the_watcher_saves_no_fold_once_liveness_has_marked_the_arm(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    exp = ExperimentPaths(tmp_path / "exp")
    arm = exp.arm("a")
    arm.root.mkdir(parents=True)
    arm.profile_json.write_text(json.dumps({"name": "a"}))
    arm.exit.write_text("-9\n")  # the trainer died before it wrote anything
    monkeypatch.setattr(watcher_module, "SAVE_FOLD_AFTER_BYTES", 1)
    watcher = ExperimentWatcher(exp)
    watcher.poll()
    assert watcher.state.arms["a"].status == "crashed"
    arm.events.write_text("".join(realistic_lines()[:20]), encoding="utf-8")  # then the log shows up
    watcher.poll()
    assert foldcache.load(arm.events) is None  # that state is not a fold of the log alone
