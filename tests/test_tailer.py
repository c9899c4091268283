from __future__ import annotations

import json
import os
from pathlib import Path

from gputwin import events as ev
from gputwin.tailer import Tailer


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
