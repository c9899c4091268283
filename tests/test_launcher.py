"""The launcher: detached start through the supervisor, pid/exit files, the run lock, control requests,
wrong-state refusals, verdict actions, the demo's profiles, and one real start of two tiny arms."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

import psutil
import pytest

from gputwin.reading.eventlog import EventWriter
from gputwin.faces import cli
from gputwin.control import requests as control, launcher, supervise
from gputwin.core import events as ev
from gputwin.core.errors import UserError
from gputwin.core.paths import ArmPaths, ExperimentPaths
from gputwin.core.profiles import Experiment, Profile, Rules, load_experiment
from gputwin.core.verdict import Action, Verdict

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny  # noqa: E402

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
ENV_PRINTER = [sys.executable, "-c", "import os; e = os.environ; print(repr(e.get('CUDA_VISIBLE_DEVICES')), "
               "e.get('GPUTWIN_THREADS'), e.get('CUDA_DEVICE_ORDER'))"]


def wait_for(predicate: Callable[[], bool], what: str, limit_s: float = 60.0) -> None:
    """Poll until `predicate` holds; the limit only guards against a hang, it is not a speed check."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def profile(name: str, tmp_path: Path, **train_fields: object) -> Profile:
    """A CPU profile; its files need not exist for the stand-in trainers used here."""
    return tiny.profile_for(tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "test.jsonl", name=name,
                            **train_fields)


def experiment(tmp_path: Path, name: str = "exp", *arms: Profile) -> Experiment:
    arms = arms or (profile("a", tmp_path), profile("b", tmp_path))
    return Experiment(name, tuple(arms), Rules(baseline=arms[0].name))




def start_sleepers(tmp_path: Path, logs: Path, name: str = "exp") -> ExperimentPaths:
    return launcher.start_experiment(experiment(tmp_path, name), root=logs, commands={"a": SLEEPER, "b": SLEEPER})


def record_events(arm: ArmPaths, *kinds: str, pid: int = 1) -> None:
    """Append a plausible life to an arm's log, ending with the given kinds (stopped, finished, ...)."""
    with EventWriter(arm.events) as writer:
        writer.emit(ev.STARTED, arm=arm.name, pid=pid, device="cpu", samples=24, steps_per_epoch=6, total_steps=6,
                    milestone_step=3)
        writer.emit(ev.STEP, step=1, epoch=0.17, loss=2.0, lr=1e-3)
        for kind in kinds:
            fields = {ev.FAILED: {"error": "oom", "message": "out of memory", "hint": "smaller batch"}}.get(kind, {})
            writer.emit(kind, **({"step": 1} if kind != ev.FAILED else {}), **fields)


def end_arm(arm: ArmPaths) -> None:
    """Kill an arm's (sleeping) trainer and wait until its supervisor recorded the end."""
    pid, _ = supervise.read_pid(arm)  # type: ignore[misc]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: supervise.read_exit(arm) is not None, f"the exit file of {arm.name}")


# ---------------------------------------------------------------- detached start


def test_start_writes_the_folders_and_detaches_each_trainer_in_a_session_of_its_own(tmp_path: Path, logs: Path) -> None:
    exp = start_sleepers(tmp_path, logs)
    assert exp.root == logs / "exp"
    assert exp.root.stat().st_mode & 0o777 == 0o700
    saved = json.loads(exp.experiment_json.read_text())
    assert saved["arm_names"] == ["a", "b"]
    for arm in exp.arms():
        assert arm.root.stat().st_mode & 0o777 == 0o700
        assert Profile.from_dict(json.loads(arm.profile_json.read_text())).name == arm.name
        pid, created = supervise.read_pid(arm)  # type: ignore[misc]
        trainer = psutil.Process(pid)
        assert abs(trainer.create_time() - created) < 0.05
        assert os.getsid(pid) != os.getsid(0)
        supervisor = psutil.Process(trainer.ppid())
        assert os.getsid(pid) == supervisor.pid  # the supervisor leads the trainer's session
        assert "gputwin.control.supervise" in supervisor.cmdline()
        assert launcher.arm_alive(arm) and launcher.arm_status(arm) == launcher.RUNNING
        assert supervise.read_exit(arm) is None


def test_the_profile_snapshot_is_the_users_file(tmp_path: Path, logs: Path) -> None:
    source = tmp_path / "a.toml"
    source.write_text("# my profile\n")
    a = dataclasses.replace(profile("a", tmp_path), source=str(source))
    exp = launcher.start_experiment(experiment(tmp_path, "exp", a, profile("b", tmp_path)), root=logs,
                                    commands={"a": SLEEPER, "b": SLEEPER})
    assert exp.arm("a").profile_toml.read_text() == "# my profile\n"


def test_trainer_env_names_the_gpu_or_none_and_shares_the_cores(tmp_path: Path, logs: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.delenv("GPUTWIN_THREADS", raising=False)
    cpu = profile("cpu", tmp_path, threads=0)
    cpu2 = profile("cpu2", tmp_path, threads=0)
    gpu = dataclasses.replace(profile("gpu", tmp_path), device=1)
    pinned = profile("pinned", tmp_path, threads=3)
    exp = launcher.start_experiment(experiment(tmp_path, "env", cpu, cpu2, gpu, pinned), root=logs,
                                    commands={n: ENV_PRINTER for n in ("cpu", "cpu2", "gpu", "pinned")})
    for arm in exp.arms():
        wait_for(lambda arm=arm: supervise.read_exit(arm) == 0, f"{arm.name} to exit")
    cores = len(os.sched_getaffinity(0))
    out = {arm.name: arm.stdout.read_text().strip() for arm in exp.arms()}
    assert out["cpu"] == f"'' {max(1, cores // 3)} PCI_BUS_ID"  # three CPU arms share the cores
    assert out["cpu2"] == out["cpu"]
    assert out["gpu"] == "'1' None PCI_BUS_ID"  # its own GPU, numbered as nvidia-smi numbers them
    assert out["pinned"] == "'' 3 PCI_BUS_ID"


def test_kill_9_of_the_trainer_is_recorded_as_a_signal_exit(tmp_path: Path, logs: Path) -> None:
    exp = start_sleepers(tmp_path, logs)
    arm = exp.arm("a")
    end_arm(arm)
    assert supervise.read_exit(arm) == -signal.SIGKILL
    assert not launcher.arm_alive(arm)
    assert launcher.arm_status(arm) == launcher.CRASHED
    assert "SIGKILL" in arm.stderr.read_text()
    assert launcher.arm_status(exp.arm("b")) == launcher.RUNNING


def test_normal_and_failing_exits_are_recorded(tmp_path: Path, logs: Path) -> None:
    fails = [sys.executable, "-c", "import sys; sys.exit(3)"]
    ok = [sys.executable, "-c", "pass"]
    exp = launcher.start_experiment(experiment(tmp_path), root=logs, commands={"a": ok, "b": fails})
    for arm in exp.arms():
        wait_for(lambda arm=arm: supervise.read_exit(arm) is not None, f"{arm.name} to exit")
    assert supervise.read_exit(exp.arm("a")) == 0
    assert supervise.read_exit(exp.arm("b")) == 3


def test_a_trainer_that_cannot_start_is_reported_not_hidden(tmp_path: Path, logs: Path) -> None:
    missing = [str(tmp_path / "no-such-program")]
    said: list[str] = []
    with pytest.raises(UserError, match="exited .* before starting the trainer") as failed:
        launcher.start_experiment(experiment(tmp_path), root=logs, commands={"a": missing, "b": SLEEPER},
                                  say=said.append)
    assert "stderr.log" in str(failed.value) and "gputwin resume a" in str(failed.value)
    a = ArmPaths(logs / "exp" / "a")
    assert supervise.read_exit(a) == supervise.EXEC_FAILED
    assert "cannot start" in a.stderr.read_text()
    # the arms start side by side: the other one is running, and said so
    assert [line.split(" (")[0] for line in said] == ["Started b on CPU"]
    assert launcher.arm_status(ArmPaths(logs / "exp" / "b")) == launcher.RUNNING


def test_a_second_run_is_refused_while_arms_are_alive_and_after_they_ended(tmp_path: Path, logs: Path) -> None:
    exp = start_sleepers(tmp_path, logs)
    with pytest.raises(UserError, match="is running") as alive:
        start_sleepers(tmp_path, logs)
    assert "a, b" in str(alive.value)
    for arm in exp.arms():
        end_arm(arm)
    with pytest.raises(UserError, match="already ran") as ended:
        start_sleepers(tmp_path, logs)
    assert "--name" in str(ended.value)
    assert start_sleepers(tmp_path, logs, name="exp-2").name == "exp-2"  # a new name runs it again


def test_the_launch_lock_refuses_a_concurrent_launcher(tmp_path: Path, logs: Path) -> None:
    exp_root = logs / "exp"
    exp_root.mkdir(parents=True)
    fd = os.open(exp_root / "run.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another gputwin command"):
            start_sleepers(tmp_path, logs)
    finally:
        os.close(fd)
    assert not (exp_root / "a").exists()  # nothing was started


def test_arm_alive_needs_the_same_process_not_just_the_same_pid(tmp_path: Path) -> None:
    arm = ArmPaths(tmp_path / "arm")
    arm.root.mkdir()
    assert not launcher.arm_alive(arm)  # no pid file
    me = psutil.Process()
    arm.pid.write_text(f"{me.pid} {me.create_time():.3f}\n")
    assert launcher.arm_alive(arm)
    arm.pid.write_text(f"{me.pid} {me.create_time() - 100:.3f}\n")  # a reused pid
    assert not launcher.arm_alive(arm)
    arm.pid.write_text("not a pid\n")
    assert not launcher.arm_alive(arm)


# ---------------------------------------------------------------- control requests


def only_request(arm: ArmPaths) -> control.Request:
    pending = control.pending(arm.control)
    assert len(pending) == 1, pending
    request = pending[0][1]
    assert isinstance(request, control.Request)
    return request


def test_stop_extend_and_validate_now_write_valid_requests_to_a_running_arm(tmp_path: Path, logs: Path) -> None:
    exp = start_sleepers(tmp_path, logs)
    a, b = exp.arm("a"), exp.arm("b")
    assert "Stop requested" in launcher.request_stop(exp, "a")
    assert only_request(a) == control.Request(control.STOP, 0, "cli", only_request(a).path)
    pid_before = supervise.read_pid(b)
    assert "Extend requested" in launcher.request_extend(exp, "b", 2, by="ui")
    request = only_request(b)
    assert (request.action, request.epochs, request.by) == (control.EXTEND, 2, "ui")
    assert supervise.read_pid(b) == pid_before  # a running arm is not restarted
    control.consume(request.path)  # type: ignore[arg-type]
    launcher.request_validate(exp, "b")
    assert only_request(b).action == control.VALIDATE


def test_wrong_state_requests_are_refused_with_the_reason(tmp_path: Path, logs: Path) -> None:
    exp = start_sleepers(tmp_path, logs)
    with pytest.raises(UserError, match="already running"):
        launcher.resume_arm(exp, "a")
    with pytest.raises(UserError, match=">= 1"):
        launcher.request_extend(exp, "a", 0)
    end_arm(exp.arm("a"))
    record_events(exp.arm("a"), ev.STOPPED)
    with pytest.raises(UserError, match="it is stopped, not running") as stopped:
        launcher.request_stop(exp, "a")
    assert "gputwin resume a" in str(stopped.value)
    with pytest.raises(UserError, match="stopped, not running"):
        launcher.request_validate(exp, "a")
    end_arm(exp.arm("b"))
    record_events(exp.arm("b"), ev.FINISHED)
    with pytest.raises(UserError, match="finished; there is nothing to resume"):
        launcher.resume_arm(exp, "b")
    with pytest.raises(UserError, match="has no arm 'c'; its arms: a, b"):
        launcher.request_stop(exp, "c")
    assert control.pending(exp.arm("a").control) == []  # nothing was written by refused commands


def test_extend_refuses_a_crashed_or_failed_arm(tmp_path: Path, logs: Path) -> None:
    exp = start_sleepers(tmp_path, logs)
    end_arm(exp.arm("a"))
    with pytest.raises(UserError, match="it is crashed") as crashed:
        launcher.request_extend(exp, "a", 1)
    assert "resume" in str(crashed.value)
    end_arm(exp.arm("b"))
    record_events(exp.arm("b"), ev.FAILED)
    assert launcher.arm_status(exp.arm("b")) == launcher.FAILED
    with pytest.raises(UserError, match="it is failed"):
        launcher.request_extend(exp, "b", 1)


def test_resume_respawns_a_stopped_arm_and_drops_its_stale_stop(tmp_path: Path, logs: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    exp = start_sleepers(tmp_path, logs)
    a = exp.arm("a")
    launcher.request_stop(exp, "a")  # the trainer dies before reading it
    end_arm(a)
    record_events(a, ev.STOPPED)
    monkeypatch.setattr(supervise, "trainer_command", lambda arm: SLEEPER)
    message = launcher.resume_arm(exp, "a")
    assert "Resumed a (it was stopped)" in message
    assert launcher.arm_alive(a) and supervise.read_exit(a) is None
    assert control.pending(a.control) == []


def test_extend_of_a_finished_arm_writes_the_request_then_respawns(tmp_path: Path, logs: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    exp = start_sleepers(tmp_path, logs)
    b = exp.arm("b")
    end_arm(b)
    record_events(b, ev.FINISHED)
    monkeypatch.setattr(supervise, "trainer_command", lambda arm: SLEEPER)
    assert "it was finished; restarted" in launcher.request_extend(exp, "b", 1)
    assert launcher.arm_alive(b)
    request = only_request(b)
    assert (request.action, request.epochs) == (control.EXTEND, 1)


def test_stop_is_refused_once_the_trainer_has_ended_its_log_but_not_for_an_older_life(
        tmp_path: Path, logs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exp = start_sleepers(tmp_path, logs)
    record_events(exp.arm("a"), ev.FINISHED, pid=1)  # an older life's end does not make it "exiting"
    launcher.request_validate(exp, "a")
    record_events(exp.arm("a"), ev.FINISHED, pid=supervise.read_pid(exp.arm("a"))[0])  # type: ignore[index]
    with pytest.raises(UserError, match="it has finished and is exiting"):
        launcher.request_stop(exp, "a")
    launcher.request_stop(exp, "b")
    with pytest.raises(UserError, match="stop request waiting already"):
        launcher.request_stop(exp, "b")
    end_arm(exp.arm("a"))
    monkeypatch.setattr(supervise, "trainer_command", lambda arm: SLEEPER)
    launcher.request_extend(exp, "a", 1)  # a new life that has not logged yet: the old end no longer counts
    assert "Stop requested" in launcher.request_stop(exp, "a")


# Waits until the file `go` appears, then exits 0; a life that finds an extend request waiting answers it.
GO_TRAINER = """
import sys, time
from pathlib import Path
from gputwin.control import requests as control
from gputwin.core import events as ev
from gputwin.reading.eventlog import EventWriter
arm = Path(sys.argv[1])
for path, request in control.pending(arm / "control"):
    if {answer} and request.action == control.EXTEND:
        control.consume(path)
        with EventWriter(arm / "events.jsonl") as log:
            log.emit(ev.EXTENDED, step=6, epochs=2, total_steps=12)
        sys.exit(0)
(arm / "waiting").touch()
while not (arm / "go").exists():
    time.sleep(0.02)
"""


@pytest.mark.parametrize("answers", [True, False])
def test_an_extend_that_arrives_while_the_trainer_ends_restarts_it_once(tmp_path: Path, logs: Path,
                                                                       answers: bool) -> None:
    command = [sys.executable, "-c", GO_TRAINER.format(answer=answers), str(logs / "exp" / "a")]
    exp = launcher.start_experiment(experiment(tmp_path), root=logs, commands={"a": command, "b": SLEEPER})
    a = exp.arm("a")
    wait_for(lambda: (a.root / "waiting").exists(), "the first life to pass its look at control/")
    record_events(a, ev.FINISHED, pid=supervise.read_pid(a)[0])  # type: ignore[index]  # on its way out
    assert "Extend requested" in launcher.request_extend(exp, "a", 1)
    (a.root / "go").touch()
    wait_for(lambda: supervise.read_exit(a) is not None, "the supervisor to record the end")
    assert supervise.read_exit(a) == 0
    assert a.stderr.read_text().count("starting it again") == 1  # never twice for one request
    kinds = [e.kind for e in ev.read_events(a.events).events]
    if answers:
        assert kinds[-1] == ev.EXTENDED and control.pending(a.control) == []
    else:  # a trainer that ignores it does not loop forever; the request waits for the next life
        assert kinds[-1] == ev.FINISHED and only_request(a).action == control.EXTEND


def test_arms_of_a_users_own_trainer_script_are_not_respawned(tmp_path: Path, logs: Path) -> None:
    exp = start_sleepers(tmp_path, logs)
    a = exp.arm("a")
    end_arm(a)
    record_events(a, ev.STOPPED)
    saved = json.loads(a.profile_json.read_text())
    a.profile_json.write_text(json.dumps(dict(saved, source="hf-trainer:/home/me/train.py")))
    with pytest.raises(UserError, match="ran in your own script"):
        launcher.resume_arm(exp, "a")
    with pytest.raises(UserError, match="ran in your own script"):
        launcher.request_extend(exp, "a", 1)
    assert control.pending(a.control) == []


def test_apply_actions_requests_and_records_each_action(tmp_path: Path, logs: Path) -> None:
    exp = start_sleepers(tmp_path, logs)
    verdict = Verdict(scenario="C", headline="a is better", baseline="a",
                      actions=(Action("stop", "b"), Action("continue", "a")))
    messages = launcher.apply_actions(exp, verdict, by="auto")
    assert any("Stop requested for b" in m for m in messages)
    assert only_request(exp.arm("b")).by == "auto"
    assert control.pending(exp.arm("a").control) == []
    recorded = launcher.read_actions(exp)
    assert [(r["action"], r["arm"], r["by"]) for r in recorded] == [("stop", "b", "auto")]
    assert launcher.actions_applied_by(exp, "auto") and not launcher.actions_applied_by(exp, "ui")
    end_arm(exp.arm("b"))
    record_events(exp.arm("b"), ev.STOPPED)
    again = launcher.apply_actions(exp, verdict, by="auto")
    assert any("not applied" in m and "stopped" in m for m in again)  # reported, not raised
    assert len(launcher.read_actions(exp)) == 1


def test_the_verdict_is_applied_automatically_once_and_never_over_a_persons_action(tmp_path: Path,
                                                                                 logs: Path) -> None:
    exp = start_sleepers(tmp_path, logs)
    verdict = Verdict(scenario="C", headline="a is better", baseline="a",
                      actions=(Action("stop", "b"), Action("continue", "a")))
    nothing = Verdict(scenario="C", headline="keep both", baseline="a", actions=(Action("continue", "a"),))
    assert launcher.apply_verdict_once(exp, nothing) == (False, [])  # nothing that changes a run
    launcher.apply_actions(exp, Verdict(scenario="C", headline="", baseline="a", actions=(Action("stop", "b"),)),
                           by="ui")  # a person pressed `a` first
    applied, lines = launcher.apply_verdict_once(exp, verdict)
    assert not applied and "already taken (by ui)" in lines[0]
    assert [r["by"] for r in launcher.read_actions(exp)] == ["ui"]


# ---------------------------------------------------------------- CLI


def test_cli_stop_of_an_unknown_arm_exits_2_listing_the_arms(tmp_path: Path, logs: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    start_sleepers(tmp_path, logs)
    assert cli.main(["stop", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "no arm 'nosuch'; its arms: a, b" in err
    assert cli.main(["stop", "a", "-x", "other"]) == 2
    assert "experiments there: exp" in capsys.readouterr().err


def test_cli_arm_commands_print_what_they_did(tmp_path: Path, logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = start_sleepers(tmp_path, logs)
    assert cli.main(["validate-now", "a", "-x", "exp"]) == 0
    assert "Validation requested for a" in capsys.readouterr().out
    assert cli.main(["extend", "b", "--epochs", "0"]) == 2
    assert "--epochs must be a whole number >= 1" in capsys.readouterr().err
    assert cli.main(["resume", "b"]) == 2
    assert "already running" in capsys.readouterr().err
    assert only_request(exp.arm("a")).action == control.VALIDATE


def test_attach_without_experiments_says_how_to_start_one(logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 1
    out = capsys.readouterr().out
    assert "gputwin run" in out and "gputwin demo" in out
    assert cli.main(["attach", "nope"]) == 2


# ---------------------------------------------------------------- demo


def test_the_demo_runs_under_a_fresh_name_with_its_data_under_the_logs_root(tmp_path: Path) -> None:
    when = datetime(2026, 1, 5, 9, 30, 15)
    demo = launcher.demo_experiment(now=when, root=tmp_path)
    assert demo.name == "demo-20260105-093015"
    assert [a.device for a in demo.arms] == [None, None]
    assert {a.data.train for a in demo.arms} == {str(tmp_path / ".demo-data" / "train.jsonl")}
    assert all(a.data.synth_if_missing for a in demo.arms)
    (tmp_path / demo.name).mkdir()
    assert launcher.demo_experiment(now=when, root=tmp_path).name == "demo-20260105-093015-2"


def test_the_packaged_demo_profiles_match_the_checkouts() -> None:
    shipped = launcher.demo_profile()
    assert shipped.parent.name == "demo_profiles"
    checkout = Path(__file__).resolve().parents[1] / "profiles"
    for name in ("demo.toml", "demo-conservative.toml", "demo-aggressive.toml", "demo-reference.toml"):
        assert (shipped.parent / name).read_text() == (checkout / name).read_text(), name
    assert load_experiment(shipped).arm_names == ["demo-conservative", "demo-aggressive"]


# ---------------------------------------------------------------- the real trainer


@pytest.mark.slow
def test_two_tiny_arms_train_detached_and_a_finished_arm_extends(tmp_path: Path, logs: Path) -> None:
    train, test = tiny.write_data(tmp_path / "data")
    model = tiny.tiny_bert(tmp_path / "bert", tiny.make_samples(24))
    arms = [tiny.profile_for(model, train, test, task="tag", name=n, learning_rate=lr, milestone_step=3)
            for n, lr in (("a", 5e-3), ("b", 1e-2))]
    exp = launcher.start_experiment(experiment(tmp_path, "real", *arms), root=logs)
    for arm in exp.arms():
        wait_for(lambda arm=arm: supervise.read_exit(arm) is not None, f"{arm.name} to end", 240)
        assert supervise.read_exit(arm) == 0, arm.stderr.read_text()[-2000:]
        kinds = [e.kind for e in ev.read_events(arm.events).events]
        assert kinds[0] == ev.STARTED and kinds[-1] == ev.FINISHED and ev.VALIDATION in kinds
        assert launcher.arm_status(arm) == launcher.FINISHED
    assert "restarted from its last checkpoint" in launcher.request_extend(exp, "b", 1)
    b = exp.arm("b")
    wait_for(lambda: supervise.read_exit(b) is not None, "the extended arm to end", 240)
    assert supervise.read_exit(b) == 0, b.stderr.read_text()[-2000:]
    second_life = ev.read_events(b.events).events
    extended = [e for e in second_life if e.kind == ev.EXTENDED]
    assert extended and extended[-1]["total_steps"] == 12
    assert second_life[-1].kind == ev.FINISHED and second_life[-1]["step"] == 12


# ---------------------------------------------------------------- the last life, from the log


def _life(writer: EventWriter, pid: int, end: str | None, steps: int = 3) -> None:
    writer.emit(ev.STARTED, arm="a", pid=pid, device="cpu", samples=8, steps_per_epoch=4, total_steps=8,
                milestone_step=4)
    for step in range(1, steps + 1):
        writer.emit(ev.STEP, step=step, epoch=step / 4, loss=1.0, lr=1e-3)
    if end == ev.FAILED:
        writer.emit(ev.FAILED, error="NonFiniteLoss", message="loss is nan at step 4", hint="lower the lr", step=3)
    elif end is not None:
        writer.emit(end, step=steps)


@pytest.mark.parametrize("lives, status", [
    ([], supervise.NOT_STARTED),
    ([(ev.FINISHED,)], supervise.FINISHED),
    ([(ev.STOPPED,)], supervise.STOPPED),
    ([(ev.FAILED,)], supervise.FAILED),
    ([(None,)], supervise.CRASHED),                    # killed: no final event
    ([(ev.FINISHED,), (None,)], supervise.CRASHED),   # extended after the end, then killed
    ([(None,), (ev.STOPPED,)], supervise.STOPPED),    # resumed after a crash, then stopped
])
def test_an_arms_status_is_how_its_last_life_ended(tmp_path: Path, lives: list, status: str) -> None:
    arm = ArmPaths(tmp_path / "a")
    arm.root.mkdir()
    with EventWriter(arm.events, fold=True) as writer:
        for pid, (end,) in enumerate(lives, start=100):
            _life(writer, pid, end)
    assert supervise.arm_status(arm) == status


def test_status_reads_the_saved_fold_and_what_follows_it(tmp_path: Path) -> None:
    arm = ArmPaths(tmp_path / "a")
    arm.root.mkdir()
    with EventWriter(arm.events, fold=True) as writer:
        _life(writer, 100, ev.FINISHED)
    assert (arm.root / "events.fold").is_file() and supervise.arm_status(arm) == supervise.FINISHED
    with EventWriter(arm.events) as writer:  # appended without keeping the fold: read from where it ends
        _life(writer, 101, None)
    assert supervise.arm_status(arm) == supervise.CRASHED


def test_ending_names_the_final_event_of_the_recorded_trainer_only(tmp_path: Path) -> None:
    arm = ArmPaths(tmp_path / "a")
    arm.root.mkdir()
    me = psutil.Process()
    with EventWriter(arm.events, fold=True) as writer:
        _life(writer, me.pid + 1, ev.FINISHED)  # an older life's end does not count
        arm.pid.write_text(f"{me.pid} {me.create_time():.3f}\n")
        _life(writer, me.pid, None)
        assert supervise.ending(arm) is None
        writer.emit(ev.STOPPED, step=3)
    assert supervise.ending(arm) == supervise.STOPPED
