"""`--headless`: progress lines, validations, the verdict and the report from recorded experiments;
applying the verdict once when the rules say so; exit 3 when an arm crashed; a real headless run."""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from gputwin.reading.eventlog import EventWriter
from gputwin.faces import cli, headless
from gputwin.control import launcher, supervise
from gputwin.core import events as ev
from gputwin.core.paths import ArmPaths, ExperimentPaths
from gputwin.core.profiles import Experiment, Rules

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "events"
T0 = 1767603600.0
MILESTONE = 8
SAMPLES = 200

# A stand-in trainer: waits for a control request, answers it in the log the way the real one does, exits.
ANSWERING_TRAINER = """
import sys, time
from pathlib import Path
from gputwin.control import requests as control
from gputwin.core import events as ev
from gputwin.reading.eventlog import EventWriter
arm = Path(sys.argv[1])
while True:
    for path, request in control.pending(arm / "control"):
        control.consume(path)
        with EventWriter(arm / "events.jsonl") as log:
            if request.action == control.STOP:
                log.emit(ev.STOPPED, step=8, by=request.by)
            else:
                log.emit(ev.EXTENDED, step=8, epochs=1 + request.epochs, total_steps=8 * (1 + request.epochs))
                log.emit(ev.FINISHED, step=8 * (1 + request.epochs))
        sys.exit(0)
    time.sleep(0.02)
"""


def answering_trainer(arm: ArmPaths) -> list[str]:
    return [sys.executable, "-c", ANSWERING_TRAINER, str(arm.root)]


def record_arm(arm: ArmPaths, rows: list[list[int]], *, end: str | None) -> None:
    """An arm's log up to a milestone validation on SAMPLES samples, and its validation file."""
    tp, fp, fn = (sum(r[i] for r in rows) for i in range(3))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall)
    path = arm.validation_file(MILESTONE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"precision": precision, "recall": recall, "f1": f1, "per_sample": rows,
                                "indices": list(range(SAMPLES))}))
    with EventWriter(arm.events) as log:
        log.emit(ev.STARTED, t=T0, arm=arm.name, pid=1, device="cpu", samples=32, steps_per_epoch=8,
                 total_steps=8, milestone_step=MILESTONE)
        for step in range(1, MILESTONE + 1):
            log.emit(ev.STEP, t=T0 + step, step=step, epoch=step / 8, loss=2.0 / step, lr=1e-3)
        log.emit(ev.MILESTONE, t=T0 + 9, step=MILESTONE)
        log.emit(ev.VALIDATION, t=T0 + 10, step=MILESTONE, precision=precision, recall=recall, f1=f1,
                 path=str(path), sample_size=SAMPLES)
        if end is not None:
            log.emit(end, t=T0 + 11, step=MILESTONE)


WEAK = [[1, 1, 1]] * SAMPLES  # precision = recall = F1 = 50%
STRONG = [[2, 0, 0]] * (SAMPLES - 10) + [[1, 0, 1]] * 10  # F1 about 99%




def make_experiment(tmp_path: Path, logs: Path, on_verdict: str = "suggest") -> Experiment:
    arms = tuple(tiny.profile_for(tmp_path / "m", tmp_path / "train.jsonl", tmp_path / "test.jsonl", name=n)
                 for n in ("a", "b"))
    return Experiment("rec", arms, Rules(baseline="a", on_verdict=on_verdict))


def write_recorded(exp: ExperimentPaths, experiment: Experiment) -> None:
    """A finished experiment as the files record it: no process runs."""
    exp.root.mkdir(parents=True)
    exp.experiment_json.write_text(json.dumps(experiment.to_dict()))
    for profile in experiment.arms:
        arm = exp.arm(profile.name)
        arm.root.mkdir()
        arm.profile_json.write_text(json.dumps(profile.to_dict()))
        arm.exit.write_text("0\n")
    record_arm(exp.arm("a"), WEAK, end=ev.STOPPED)
    record_arm(exp.arm("b"), STRONG, end=ev.FINISHED)


def bounded_sleep(limit_s: float = 60.0) -> Callable[[float], None]:
    """time.sleep that fails the test instead of hanging when the monitor never concludes."""
    deadline = time.monotonic() + limit_s
    calls = []

    def sleep(seconds: float) -> None:
        calls.append(seconds)
        if time.monotonic() > deadline:
            raise AssertionError("the monitor did not conclude")
        time.sleep(seconds)

    sleep.calls = calls  # type: ignore[attr-defined]
    return sleep


def test_a_recorded_experiment_prints_progress_validations_and_the_verdict(tmp_path: Path, logs: Path) -> None:
    experiment = make_experiment(tmp_path, logs)
    exp = ExperimentPaths(logs / "rec")
    write_recorded(exp, experiment)
    out = io.StringIO()
    sleep = bounded_sleep()
    code = headless.monitor(exp, rules=experiment.rules, out=out, clock=lambda: T0 + 20, sleep=sleep)
    text = out.getvalue()
    assert code == 0
    assert sleep.calls == []  # everything had ended: one look was enough
    lines = text.splitlines()
    assert any(" a " in line and "stopped" in line and "step 8/8" in line for line in lines)
    assert any(" b " in line and "finished" in line and "step 8/8" in line for line in lines)
    assert "a: validation at step 8 on 200 samples: precision 50.0%  recall 50.0%  F1 50.0%" in text
    assert "b: validation at step 8 on 200 samples" in text
    assert "Verdict: scenario A" in text
    assert "  - stop a" not in text and "  - extend b by 1 epoch" in text  # a already stopped
    assert "a has already ended (stopped); nothing to stop." in text
    assert f"Report: {exp.comparison}, {exp.verdict}" in text
    assert exp.comparison.is_file() and json.loads(exp.verdict.read_text())["scenario"] == "A"
    assert not (exp.root / launcher.ACTIONS_FILE).exists()  # "suggest": nothing applied
    assert text.rstrip().endswith("All arms of rec have ended.")


def test_progress_lines_repeat_on_the_interval_and_validations_print_once(tmp_path: Path, logs: Path) -> None:
    experiment = make_experiment(tmp_path, logs)
    exp = ExperimentPaths(logs / "rec")
    write_recorded(exp, experiment)
    exp.arm("b").events.write_text("")  # b has not started yet: the monitor keeps watching
    exp.arm("b").exit.unlink()
    out = io.StringIO()
    now = [T0 + 20]
    watch = headless.Monitor(exp, experiment.rules, out, lambda: now[0], progress_every=10)
    assert watch.step() is None
    now[0] += 5
    assert watch.step() is None
    now[0] += 5
    assert watch.step() is None
    text = out.getvalue()
    progress_of_a = [line for line in text.splitlines() if line.split()[1:3] == ["a", "stopped"]]
    expected = [time.strftime("%H:%M:%S", time.localtime(T0 + s)) for s in (20, 30)]  # at 0 s and 10 s, not 5 s
    assert [line.split()[0] for line in progress_of_a] == expected
    assert text.count("a: validation at step 8") == 1
    assert "Verdict" not in text


def test_apply_carries_out_the_verdict_once_and_waits_for_the_arms(tmp_path: Path, logs: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    experiment = make_experiment(tmp_path, logs, on_verdict="apply")
    # a is still training (its trainer answers requests); b's trainer has exited after finishing
    exp = launcher.start_experiment(experiment, root=logs, commands={
        "a": answering_trainer(ArmPaths(logs / "rec" / "a")), "b": [sys.executable, "-c", "pass"]})
    deadline = time.monotonic() + 60
    while supervise.read_exit(exp.arm("b")) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    record_arm(exp.arm("a"), WEAK, end=None)
    record_arm(exp.arm("b"), STRONG, end=ev.FINISHED)
    monkeypatch.setattr(supervise, "trainer_command", answering_trainer)  # what `extend` restarts
    out = io.StringIO()
    code = headless.monitor(exp, out=out, sleep=bounded_sleep(), poll_every=0.02)
    text = out.getvalue()
    assert code == 0, text
    assert "Applying the verdict" in text
    assert "Stop requested for a" in text and "Extending b by 1 epoch(s): it was finished" in text
    taken = [(r["action"], r["arm"], r["epochs"], r["by"]) for r in launcher.read_actions(exp)]
    assert taken == [("stop", "a", 0, "auto"), ("extend", "b", 1, "auto")]
    last_lines = text.splitlines()[-3:]  # where each arm ended, then the conclusion
    assert last_lines[0].split()[1:3] == ["a", "stopped"]
    assert last_lines[1].split()[1:3] == ["b", "finished"] and "step 16/16" in last_lines[1]
    assert last_lines[2] == "All arms of rec have ended."
    b_log = [e.kind for e in ev.read_events(exp.arm("b").events).events]
    assert b_log[-2:] == [ev.EXTENDED, ev.FINISHED]  # the respawned trainer applied the extension
    assert [e.kind for e in ev.read_events(exp.arm("a").events).events][-1] == ev.STOPPED

    again = io.StringIO()  # a second monitor on the same experiment does not apply again
    monitor = headless.Monitor(exp, experiment.rules, again, time.time)
    monitor.step()
    assert "applied before; not repeating them" in again.getvalue()
    assert len(launcher.read_actions(exp)) == 2


def test_a_crashed_arm_makes_the_exit_status_3(tmp_path: Path) -> None:
    exp_root = tmp_path / "crashed"
    shutil.copytree(FIXTURES / "crashed", exp_root)
    out = io.StringIO()
    code = headless.monitor(ExperimentPaths(exp_root), out=out, clock=lambda: T0 + 3600, sleep=bounded_sleep())
    text = out.getvalue()
    assert code == headless.EXIT_ARM_CRASHED
    assert "No verdict: no validation result from conservative, aggressive." in text
    assert "Crashed or failed: conservative, aggressive" in text
    assert "killed by signal 9" in text or "exit -9" in text


@pytest.mark.slow
def test_gputwin_run_headless_trains_two_tiny_arms_to_a_verdict(tmp_path: Path, logs: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    train, test = tiny.write_data(tmp_path / "data")
    model = tiny.tiny_bert(tmp_path / "bert", tiny.make_samples(24))
    files = []
    for name, lr in (("slow", "5e-3"), ("fast", "1e-2")):
        path = tmp_path / f"{name}.toml"
        path.write_text(f"""name = "{name}"
[model]
base = "{model}"
task = "tag"
dtype = "fp32"
[lora]
r = 4
target_modules = ["query", "value"]
[train]
learning_rate = {lr}
batch_size = 4
max_length = 64
checkpoint_every = 3
engine = "plain"
threads = 1
[data]
train = "{train}"
test = "{test}"
[milestone]
step = 3
sample_size = 8
""")
        files.append(str(path))
    assert cli.main(["run", *files, "--headless", "--name", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "Started slow on CPU" in out and "Started fast on CPU" in out
    assert "slow: validation at step 3 on 8 samples" in out or "slow: validation at step 3:" in out
    assert "Verdict: scenario" in out and "Report:" in out
    assert out.rstrip().endswith("All arms of tiny have ended.")
    exp = ExperimentPaths(logs / "tiny")
    assert exp.comparison.is_file()
    assert [launcher.arm_status(a) for a in exp.arms()] == [launcher.FINISHED, launcher.FINISHED]
    # Both trained on past the milestone (step 3 of 6): each validated again at its end, and the verdict
    # became the final comparison (printed, and the report rewritten, once it formed).
    for arm in exp.arms():
        assert arm.validation_file(6).is_file()
    assert "Verdict: scenario" in out and "final: " in out
    assert json.loads(exp.verdict.read_text())["stage"] == "final"
