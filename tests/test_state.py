from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from gputwin.core import events as ev
from gputwin.core import state as st
from gputwin.core.paths import ExperimentPaths
from gputwin.core.state import ArmState, LossHistory, apply, fold
from gputwin.reading.watcher import ExperimentWatcher

FIXTURES = Path(__file__).parent / "fixtures" / "events"


def event(kind: str, t: float, **fields: object) -> ev.Event:
    return ev.parse(ev.dumps(ev.make(kind, t=t, **fields)))


def step(n: int, t: float, loss: float | str = 1.0) -> ev.Event:
    return event(ev.STEP, t, step=n, epoch=n / 100, loss=loss, lr=1e-4, grad_norm=0.5, tokens_per_s=900.0)


def started(t: float, **fields: object) -> ev.Event:
    base = dict(arm="a", pid=123, device="cuda:1", samples=400, steps_per_epoch=100, total_steps=200,
                milestone_step=100)
    return event(ev.STARTED, t, **{**base, **fields})


def fixture_arm(folder: str, arm: str) -> ArmState:
    return fold(arm, ev.read_events(FIXTURES / folder / arm / "events.jsonl").events)


# ---------------------------------------------------------------- the fold


def test_fold_seed_midrun() -> None:
    a, b = fixture_arm("seed-midrun", "conservative"), fixture_arm("seed-midrun", "aggressive")
    assert (a.status, a.step, a.total_steps, a.milestone_step, a.steps_per_epoch) == ("training", 400, 1758, 879, 879)
    assert (b.status, b.step, b.total_steps, b.milestone_step) == ("training", 233, 879, 879)
    assert (a.device, a.gpu_index, b.gpu_index) == ("cuda:0 NVIDIA GeForce RTX 3090", 0, 1)
    assert a.last_checkpoint is not None and a.last_checkpoint.step == 400
    assert b.last_checkpoint is not None and b.last_checkpoint.step == 200
    assert a.validations == [] and not a.milestone_reached
    # Out of step: b began while a was at step 167.
    a_steps = {e["step"]: e.t for e in ev.read_events(FIXTURES / "seed-midrun/conservative/events.jsonl").events
               if e.kind == ev.STEP}
    assert a_steps[167] < b.started_t < a_steps[168]
    assert a.smoothed_loss is not None and a.smoothed_loss < a.loss_history.raw[0]
    assert len(a.loss_history) == 400 and a.loss_history.steps[-1] == 400
    assert a.mean_step_s == pytest.approx(0.6, abs=0.02)
    assert a.progress == pytest.approx(400 / 1758) and b.milestone_progress == pytest.approx(233 / 879)


def test_fold_seed_verdict() -> None:
    a, b = fixture_arm("seed-verdict", "conservative"), fixture_arm("seed-verdict", "aggressive")
    assert b.status == "finished" and b.step == 879
    assert a.status == "training" and a.step > 879 and a.milestone_reached
    va, vb = a.validation_at(879), b.validation_at(879)
    assert va is not None and vb is not None
    assert vb.f1 > va.f1 and vb.recall > va.recall and vb.sample_size == 500
    assert b.last_validation == vb and vb.path == "validation/step-000879.json"


def test_fold_crashed_failure_event() -> None:
    a = fixture_arm("crashed", "conservative")
    assert a.status == "crashed" and a.step == 312 and a.ended
    assert a.failure is not None and a.failure.error == "OutOfMemoryError" and "resume" in a.failure.hint


def test_milestone_validation_and_end() -> None:
    s = ArmState("a")
    assert s.status == "starting"
    apply(s, started(0.0))
    apply(s, step(100, 10.0))
    apply(s, event(ev.MILESTONE, 11.0, step=100))
    assert s.status == "validating" and s.milestone_reached
    apply(s, event(ev.VALIDATION, 40.0, step=100, precision=0.9, recall="nan", f1=0.5))
    assert s.status == "training"
    assert math.isnan(s.validations[0].recall) and s.validations[0].precision == 0.9
    apply(s, event(ev.EXTENDED, 41.0, step=100, epochs=1, total_steps=300))
    assert s.total_steps == 300 and s.extended[0].epochs == 1
    apply(s, event(ev.STOPPED, 43.0, step=101))
    assert s.status == "stopped" and s.step == 101 and s.ended


@pytest.mark.parametrize("device, index", [
    ("cuda:1 NVIDIA H200", 1), ("cuda:0", 0), ("cuda", 0), ("cuda:12", 12), ("cpu", None), (3, 3),
])
def test_gpu_index_from_the_started_device(device: object, index: int | None) -> None:
    assert fold("a", [started(0.0, device=device)]).gpu_index == index


def test_restart_after_failure_clears_it() -> None:
    s = fold("a", [started(0.0), step(1, 1.0),
                   event(ev.FAILED, 2.0, error="RuntimeError", message="boom", hint="h")])
    assert s.status == "crashed"
    apply(s, started(10.0, step=1))
    apply(s, event(ev.RESUMED, 10.5, step=1, checkpoint="checkpoints/step-000001"))
    assert s.status == "training" and s.failure is None and s.restarts == 1 and s.started_t == 0.0


def test_non_finite_loss_is_kept_but_does_not_poison_the_curve() -> None:
    s = fold("a", [started(0.0), step(1, 1.0, 2.0), step(2, 2.0, "nan"), step(3, 3.0, 2.0)])
    assert s.loss == 2.0
    apply(s, step(4, 4.0, "inf"))
    assert s.loss == math.inf
    assert s.smoothed_loss == pytest.approx(2.0)
    assert all(math.isfinite(x) for x in s.loss_history.smoothed + s.loss_history.raw)


def test_unknown_kinds_are_skipped() -> None:
    s = fold("a", [started(0.0), ev.parse('{"v":1,"t":5,"kind":"telemetry"}'), step(1, 6.0)])
    assert s.events_seen == 3 and s.step == 1 and s.last_t == 6.0


def test_loss_history_is_bounded_and_exact_for_a_ramp() -> None:
    history = LossHistory(max_points=64)
    for n in range(1, 10_001):
        history.add(n, float(n))
    assert len(history) <= 64 and history.count == 10_000
    assert history.steps == sorted(history.steps) and history.steps[-1] == 10_000
    # Each bucket's raw value is the mean of the steps in it.
    width = history.width
    assert history.raw[0] == pytest.approx((1 + width) / 2)
    assert len(history.steps) == len(history.raw) == len(history.smoothed)


def test_loss_history_smoothing_of_a_constant_is_the_constant() -> None:
    history = LossHistory(max_points=8)
    for n in range(1, 30):
        history.add(n, 0.75)
    assert history.smoothed == pytest.approx([0.75] * len(history))


def test_bad_lines_are_counted_and_capped() -> None:
    s = ArmState("a")
    s.add_bad_lines((n, "bad") for n in range(1, 200))
    assert s.bad_line_count == 199 and len(s.bad_lines) == st.MAX_BAD_LINES


# ---------------------------------------------------------------- the watcher


def copy_fixture(name: str, tmp_path: Path) -> ExperimentPaths:
    shutil.copytree(FIXTURES / name, tmp_path / name)
    return ExperimentPaths(tmp_path / name)


def last_step_t(exp: ExperimentPaths, arm: str) -> float:
    return max(e.t for e in ev.read_events(exp.arm(arm).events).events if e.kind == ev.STEP)


def test_watcher_reads_experiment_incrementally(tmp_path: Path) -> None:
    exp = copy_fixture("seed-midrun", tmp_path)
    now = last_step_t(exp, "conservative") + 1
    watcher = ExperimentWatcher(exp, clock=lambda: now)
    assert watcher.poll() == {"conservative", "aggressive"}
    state = watcher.state
    assert list(state.arms) == ["conservative", "aggressive"]
    assert state.name == "pii-seed" and state.baseline == "conservative" and state.rules is not None
    assert {"lora.r", "train.learning_rate", "train.epochs"} <= set(state.differing_keys)
    assert "model.base" not in state.differing_keys
    assert state.arms["conservative"].hparams["lora.r"] == 8
    assert state.verdict is None
    assert watcher.poll() == set()
    with exp.arm("aggressive").events.open("a") as fh:
        fh.write(ev.dumps(ev.make(ev.STEP, t=now, step=234, epoch=0.27, loss=0.3, lr=1e-4)) + "\n")
    assert watcher.poll() == {"aggressive"}
    assert state.arms["aggressive"].step == 234


def test_watcher_rebuilds_an_arm_when_its_log_is_replaced(tmp_path: Path) -> None:
    exp = copy_fixture("seed-midrun", tmp_path)
    watcher = ExperimentWatcher(exp, clock=lambda: last_step_t(exp, "conservative"))
    watcher.poll()
    events = exp.arm("aggressive").events
    events.write_text(ev.dumps(ev.make(ev.STARTED, t=1.0, arm="aggressive", pid=1, device="cpu", samples=8,
                                       steps_per_epoch=2, total_steps=2, milestone_step=2)) + "\n")
    assert "aggressive" in watcher.poll()
    arm = watcher.state.arms["aggressive"]
    assert (arm.step, arm.total_steps, arm.device) == (0, 2, "cpu") and arm.hparams["lora.r"] == 12


def test_stall_detection_and_recovery(tmp_path: Path) -> None:
    exp = copy_fixture("seed-midrun", tmp_path)
    last = last_step_t(exp, "aggressive")
    now = [last + 30.0]
    watcher = ExperimentWatcher(exp, clock=lambda: now[0])
    watcher.poll()
    assert watcher.state.arms["aggressive"].status == "training"
    now[0] = last + 61.0  # mean step 0.6 s: the 60 s floor applies
    assert "aggressive" in watcher.poll()
    assert watcher.state.arms["aggressive"].status == "stalled"
    with exp.arm("aggressive").events.open("a") as fh:
        fh.write(ev.dumps(ev.make(ev.STEP, t=now[0], step=234, epoch=0.27, loss=0.3, lr=1e-4)) + "\n")
    watcher.poll()
    assert watcher.state.arms["aggressive"].status == "training"


def test_crashed_fixture_reads_exit_status_and_stderr() -> None:
    exp = ExperimentPaths(FIXTURES / "crashed")
    watcher = ExperimentWatcher(exp, clock=lambda: 1767604000.0)
    watcher.poll()
    a, b = watcher.state.arms["conservative"], watcher.state.arms["aggressive"]
    assert a.failure is not None and a.failure.error == "OutOfMemoryError" and a.exit_code == 1
    assert any("OutOfMemoryError" in line for line in a.stderr_tail)
    assert b.status == "crashed" and b.exit_code == -9 and b.step == 145
    assert b.failure is not None and "SIGKILL" in b.failure.message and "resume aggressive" in b.failure.hint
    assert b.bad_lines == [(147, "incomplete last line: the trainer died while writing it")]
    assert watcher.state.any_crashed and watcher.state.all_ended


def write_arm(exp: ExperimentPaths, name: str, pid: int, created: float, *extra: str) -> None:
    arm = exp.root / name
    arm.mkdir(parents=True)
    (arm / "profile.json").write_text('{"name": "%s", "train": {"learning_rate": 0.0001}}' % name)
    lines = [ev.make(ev.STARTED, t=1.0, arm=name, pid=pid, device="cpu", samples=8, steps_per_epoch=4,
                     total_steps=4, milestone_step=4),
             ev.make(ev.STEP, t=2.0, step=1, epoch=0.25, loss=1.0, lr=1e-4)]
    (arm / "events.jsonl").write_text("".join(ev.dumps(e) + "\n" for e in lines) + "".join(extra))
    (arm / "pid").write_text(f"{pid} {created:.3f}\n")


def test_liveness_a_trainer_that_exits_without_a_final_event_is_crashed(tmp_path: Path) -> None:
    exp = ExperimentPaths(tmp_path / "exp")
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        write_arm(exp, "a", child.pid, psutil.Process(child.pid).create_time())
        watcher = ExperimentWatcher(exp, clock=lambda: 3.0)
        watcher.poll()
        assert watcher.state.arms["a"].status == "training"
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        child.wait()
    assert "a" in watcher.poll()
    arm = watcher.state.arms["a"]
    assert arm.status == "crashed" and arm.exit_code is None
    assert arm.failure is not None and arm.failure.error == "gone"
    assert watcher.poll() == set()  # nothing new: no change reported


def test_liveness_pid_reused_by_another_process_is_not_our_trainer(tmp_path: Path) -> None:
    exp = ExperimentPaths(tmp_path / "exp")
    me = psutil.Process()
    write_arm(exp, "a", me.pid, me.create_time() - 1000)  # this pid is alive, but started at another time
    watcher = ExperimentWatcher(exp, clock=lambda: 3.0)
    watcher.poll()
    assert watcher.state.arms["a"].status == "crashed"


def test_liveness_exit_file_gives_exit_code_and_stderr(tmp_path: Path) -> None:
    exp = ExperimentPaths(tmp_path / "exp")
    me = psutil.Process()
    write_arm(exp, "a", me.pid, me.create_time())  # alive, but the supervisor recorded an exit
    (exp.root / "a" / "exit").write_text("1\n")
    (exp.root / "a" / "stderr.log").write_text("x" * 9000 + "\nline one\nValueError: bad batch\n")
    watcher = ExperimentWatcher(exp, clock=lambda: 3.0)
    watcher.poll()
    arm = watcher.state.arms["a"]
    assert arm.status == "crashed" and arm.exit_code == 1 and "exit status 1" in arm.failure.message
    assert arm.stderr_tail == ["line one", "ValueError: bad batch"]


def test_liveness_final_event_wins_over_a_dead_process(tmp_path: Path) -> None:
    exp = ExperimentPaths(tmp_path / "exp")
    finished = ev.dumps(ev.make(ev.FINISHED, t=3.0, step=4)) + "\n"
    write_arm(exp, "a", 999_999_999, 5.0, finished)
    (exp.root / "a" / "exit").write_text("0\n")
    watcher = ExperimentWatcher(exp, clock=lambda: 4.0)
    watcher.poll()
    arm = watcher.state.arms["a"]
    assert arm.status == "finished" and arm.failure is None and arm.exit_code == 0


def test_liveness_can_be_switched_off(tmp_path: Path) -> None:
    exp = ExperimentPaths(tmp_path / "exp")
    write_arm(exp, "a", 999_999_999, 5.0)
    watcher = ExperimentWatcher(exp, clock=lambda: 3.0, check_liveness=False)
    watcher.poll()
    assert watcher.state.arms["a"].status == "training"


def test_watcher_on_empty_folder_has_no_arms(tmp_path: Path) -> None:
    watcher = ExperimentWatcher(ExperimentPaths(tmp_path / "nothing-yet"))
    assert watcher.poll() == set() and watcher.state.arms == {}


def test_unreadable_experiment_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    exp = copy_fixture("seed-midrun", tmp_path)
    exp.experiment_json.write_text("{not json")
    watcher = ExperimentWatcher(exp, clock=lambda: 0.0, check_liveness=False)
    watcher.poll()
    assert set(watcher.state.arms) == {"conservative", "aggressive"}
    assert "cannot be read" in watcher.state.problems[0]


def test_exact_loss_figures_cover_every_step_event_and_skip_non_finite_ones() -> None:
    """first/last/min loss and the mean tokens/s the report prints, kept exactly while the curve is bucketed."""
    events = [step(1, 1.0, 3.0), step(2, 2.0, 1.5), step(3, 3.0, "nan"), step(4, 4.0, 2.0),
              event("started", 5.0, arm="a", pid=2, device="cpu", samples=8, steps_per_epoch=4, total_steps=8,
                    milestone_step=4, step=2),  # resumed from step 2: steps 3 and 4 come again
              step(3, 6.0, 1.25), step(4, 7.0, 1.75)]
    arm = fold("a", events)
    assert (arm.first_loss, arm.last_loss, arm.min_loss, arm.min_loss_step) == (3.0, 1.75, 1.25, 3)
    assert (arm.speed_count, arm.speed_sum) == (6, 6 * 900.0)
    for n, speed in enumerate((100.0, "inf", 300), start=5):
        apply(arm, event("step", 8.0 + n, step=n, epoch=n / 4, loss=1.0, lr=1e-3, tokens_per_s=speed))
    assert (arm.speed_count, arm.speed_sum) == (8, 6 * 900.0 + 400.0)
