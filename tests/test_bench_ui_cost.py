"""bench/ui_cost.py: its --smoke run writes every figure, and its helpers read screens and logs right.
Correctness only: the smoke sizes are too small for the figures to mean anything, and nothing is timed."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gputwin.core import events as ev
from gputwin.core import state as st
from gputwin.reading import tailer
from gputwin.reading.tailer import Tailer
from gputwin.reading.watcher import ExperimentWatcher

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import ui_cost  # noqa: E402


def test_step_lines_are_the_trainers_lines_byte_for_byte() -> None:
    rng, seen = random.Random(0), [0, 0]
    for step in (1, 2, 879):
        fields = ui_cost.step_fields(step, rng, seen, steps_per_epoch=879)
        t = 1767603600.0 + step * 0.0213
        assert ui_cost.step_line(t, fields) == ev.dumps(ev.make(ev.STEP, t=t, **fields)) + "\n"
    assert seen[0] == 12  # samples seen so far: 3 steps of 4


def test_the_written_experiment_reads_back_with_each_arms_steps_and_end(tmp_path: Path) -> None:
    exp = ui_cost.write_experiment(tmp_path, "big", 450, pid=1)
    assert ui_cost.arm_totals(exp) == {"conservative": 900, "aggressive": 720}
    for arm in exp.arms():
        result = ev.read_events(arm.events)
        assert result.bad_lines == []
        kinds = [e.kind for e in result.events]
        assert kinds.count(ev.STEP) == 450 and kinds.count(ev.CHECKPOINT) == 2
        assert ui_cost.last_step(arm) == 450


def test_shown_steps_reads_each_arms_end_bar_by_its_total() -> None:
    screen = ("milestone ━━━━  500,000/600,000 steps 83%    milestone ━━  499,833/600,000 steps 83%\n"
              "end       ━━━━  500,000/1,000,000 steps 50%  end       ━━  499,833/800,000 steps 62%\n")
    totals = {"conservative": 1_000_000, "aggressive": 800_000}
    assert ui_cost.shown_steps(screen, totals) == {"conservative": 500_000, "aggressive": 499_833}
    assert ui_cost.shown_steps("Reading logs/x …", totals) == {"conservative": None, "aggressive": None}


def _steps(rates: list[float], tokens: int = 1000) -> list[ev.Event]:
    out, t = [], 0.0
    for step, rate in enumerate(rates, start=1):
        t += tokens / rate
        out.append(ev.parse(ev.dumps(ev.make(ev.STEP, t=t, step=step, epoch=0, loss=1.0, lr=1e-3, tokens=tokens,
                                             tokens_per_s=rate))))
    return out


def test_throughput_skips_the_warm_up_steps() -> None:
    figures = ui_cost.arm_throughput(_steps([10.0] * 10 + [2000.0] * 5), warmup=10)
    assert figures["steps"] == 5
    assert figures["mean_tokens_per_s"] == pytest.approx(2000.0)
    assert figures["wall_tokens_per_s"] == pytest.approx(2000.0)
    with pytest.raises(ValueError, match="too few"):
        ui_cost.arm_throughput(_steps([1.0] * 11), warmup=10)


def test_train_summary_is_attached_over_detached_with_each_pairs_ratio() -> None:
    runs = [{"mode": m, "mean_tokens_per_s": v, "wall_tokens_per_s": v / 2} for m, v in
            [("detached", 100.0), ("attached", 90.0), ("attached", 99.0), ("detached", 110.0)]]
    summary = ui_cost.summarise_train(runs, steps=100)
    assert summary["ratio"] == pytest.approx(94.5 / 105.0) == summary["wall_ratio"]
    assert summary["pair_ratios"] == pytest.approx([0.9, 0.9])
    assert summary["met"] is False and summary["conclusive"] is True
    runs[2]["mean_tokens_per_s"] = 120.0  # the second pair now says the UI costs nothing: noise
    assert ui_cost.summarise_train(runs, steps=100)["conclusive"] is False


# ---------------------------------------------------------------- chunked reading, which the attach figure relies on


def test_reading_in_chunks_gives_the_same_events_whole_lines_and_line_numbers(tmp_path: Path) -> None:
    exp = ui_cost.write_experiment(tmp_path, "chunks", 300, pid=1)
    path = exp.arm("conservative").events
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("not json\n" + ev.dumps(ev.make(ev.STEP, step=301, epoch=1, loss=0.5, lr=1e-4)) + "\n")
        fh.write('{"v":1,"t":1.0,"kind":"st')  # a line being written
    whole = Tailer(path).read_new()
    chunked, reads = Tailer(path), 0
    events: list[ev.Event] = []
    bad: list[tuple[int, str]] = []
    while True:
        new, wrong = chunked.read_new(max_bytes=1000)
        events += new
        bad += wrong
        reads += 1
        if not chunked.behind:
            break
    assert reads > 20
    assert [e.data for e in events] == [e.data for e in whole[0]] and len(events) == 1 + 300 + 1 + 1
    assert bad == whole[1] == [(303, bad[0][1])]
    assert chunked.partial and chunked.read_new(max_bytes=1000) == ([], [])


def test_the_watcher_folds_a_log_longer_than_a_chunk_like_a_whole_read(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    exp = ui_cost.write_experiment(tmp_path, "long", 1000, pid=1)
    monkeypatch.setattr(tailer, "READ_CHUNK_BYTES", 4096)
    watcher = ExperimentWatcher(exp, check_liveness=False)
    assert watcher.poll() == {"conservative", "aggressive"}
    for arm in exp.arms():
        expected = st.fold(arm.name, ev.read_events(arm.events).events)
        got = watcher.state.arms[arm.name]
        assert (got.step, got.events_seen, got.loss_history.steps, got.loss_history.raw, got.mean_step_s) == (
            expected.step, expected.events_seen, expected.loss_history.steps, expected.loss_history.raw,
            expected.mean_step_s)
    assert watcher.poll() == set()


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_smoke_run_writes_every_figure(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "bench" / "ui_cost.py"), "--smoke", "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True, timeout=240)
    result = json.loads((tmp_path / "ui_cost.json").read_text())
    assert result["smoke"] is True and result["machine"]["cpus"] >= 1
    attach = result["attach"]
    assert attach["events"] == 2 * (attach["steps_per_arm"] + attach["steps_per_arm"] // 200 + 1)
    assert attach["median_s"] > 0 and isinstance(attach["met"], bool)
    [probe] = attach["watcher"]["runs"]
    assert probe["steps"] == {"conservative": attach["steps_per_arm"], "aggressive": attach["steps_per_arm"]}
    assert probe["first_poll_s"] > 0 and probe["first_poll_peak_rss_mib"] > 0
    cpu = result["cpu"]
    [run] = cpu["runs"]
    assert cpu["median_ui_cpu_pct"] == run["ui_cpu_pct"] >= 0 and isinstance(cpu["met"], bool)
    assert set(run["steps_per_s"]) == {"conservative", "aggressive"}
    assert all(rate > 0 for rate in run["steps_per_s"].values())
    assert None not in run["shown_lag_steps"].values()  # the UI showed both arms' steps at the end
    split = result["split"]
    assert split["as_is"]["ui_cpu_pct"] > 0 and split["charts_drawn_once"]["ui_cpu_pct"] > 0
