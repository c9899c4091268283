"""Faults survived with nothing lost, on CPU with a tiny random model: kill -9 of a trainer (mid-step and
inside a checkpoint write), of the UI and of monitors, a dropped terminal, a full disk, damaged files,
NaN/inf loss, out of memory, a stalled arm.

Each test is marked with the faults it covers and what gputwin does about them; docs/reliability.md
lists them (tests/reliability_table.py writes that table from these marks).
"""

from __future__ import annotations

import argparse
import fcntl
import inspect
import json
import math
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import psutil
import pytest
import torch

from gputwin.reading.eventlog import EventWriter
from gputwin.faces import cli, status
from gputwin.control import requests as control, launcher, supervise
from gputwin.core import events as ev
from gputwin.core import state as st
from gputwin.core.paths import ArmPaths, ExperimentPaths
from gputwin.core.profiles import Experiment, Placement, Profile, Rules
from gputwin.core.lifecycle import STALL_MIN_S, STALL_STEPS
from gputwin.reading.watcher import ExperimentWatcher
from gputwin.train import faults
from tiny import make_arm, make_samples, profile_for, tiny_bert, write_data

TestFunc = Callable[..., None]
pytestmark = pytest.mark.usefixtures("no_fault")


def fault(title: str, behaviour: str) -> Callable[[TestFunc], TestFunc]:
    """Mark a test as the proof of what gputwin does about one fault (a row of the docs table)."""

    def mark(test: TestFunc) -> TestFunc:
        test.__dict__.setdefault("faults", []).insert(0, (title, behaviour))  # decorators apply bottom-up
        return test

    return mark


def fault_table() -> list[tuple[str, str, str]]:
    """(fault, what gputwin does, test name) in the order of this file."""
    tests = [obj for name, obj in globals().items() if name.startswith("test_") and callable(obj)]
    tests.sort(key=lambda t: inspect.getsourcelines(t)[1])
    return [(title, behaviour, t.__name__) for t in tests for title, behaviour in getattr(t, "faults", [])]


# ---------------------------------------------------------------- shared pieces


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Data files and a tiny BERT (tag head) built once per module."""
    folder = tmp_path_factory.mktemp("world")
    train, test = write_data(folder / "data")
    return SimpleNamespace(folder=folder, train=train, test=test, bert=tiny_bert(folder / "bert", make_samples(24)))


def tag_profile(world: SimpleNamespace, name: str = "a", **train_fields: Any) -> Profile:
    """6 steps an epoch (24 samples, batch 4), a checkpoint every 3 steps, the milestone at the end of epoch 1."""
    train_fields.setdefault("milestone_step", 6)
    return profile_for(world.bert, world.train, world.test, task="tag", name=name, **train_fields)




def wait_for(predicate: Callable[[], bool], what: str, limit_s: float = 180.0, every: Callable[[], None] = lambda: None) -> None:
    """Poll until `predicate` holds; the limit only guards against a hang, it is not a speed check."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        every()
        time.sleep(0.05)


def steps_logged(arm: ArmPaths | Path) -> list[ev.Event]:
    path = arm.events if isinstance(arm, ArmPaths) else arm / "events.jsonl"
    return [e for e in ev.read_events(path).events if e.kind == ev.STEP]


def lives(arm: ArmPaths | Path) -> list[list[ev.Event]]:
    """The event log split at each `started` event: one list per life of the trainer."""
    path = arm.events if isinstance(arm, ArmPaths) else arm / "events.jsonl"
    out: list[list[ev.Event]] = []
    for event in ev.read_events(path).events:
        if event.kind == ev.STARTED:
            out.append([])
        out[-1].append(event)
    return out


def checkpoint_steps(folder: Path) -> list[int]:
    from gputwin.train.checkpoint import list_checkpoints

    return [step for step, _ in list_checkpoints(folder)]


def one_arm(name: str, profile: Profile) -> Experiment:
    return Experiment(name, (profile,), Rules(baseline=profile.name))


def train_in_process(arm: Path) -> int:
    from gputwin.train.loop import train

    return train(arm)


# ---------------------------------------------------------------- a trainer killed mid-step; a stalled arm


@fault("A stalled arm (no step for N x its usual step time)",
       "The watcher (UI) and `gputwin status` flag it `stalled` once no step came for max(60 s, 10 x its mean step "
       "time); status prints how long it has been quiet and where to look.")
@fault("kill -9 of a trainer mid-step",
       "The supervisor records the signal; the first poll after that shows `crashed` with the exit status "
       "(killed by signal 9) and, next, the last stderr lines; `gputwin status` exits 3. `gputwin resume` continues "
       "from the last checkpoint: the steps after it are trained again with the same losses and the loss curve "
       "in the state has each step once, in order.")
@pytest.mark.slow
def test_a_hung_trainer_is_flagged_stalled_and_after_kill_9_crashed_then_resume_continues_its_curve(
        world: SimpleNamespace, logs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(faults.ENV_VAR, "hang@5")  # steps 1-4 (a checkpoint at 3), then step 5 never ends
    exp = launcher.start_experiment(one_arm("crash", tag_profile(world)), root=logs)
    arm = exp.arm("a")
    wait_for(lambda: faults.HANG_MESSAGE in arm.stderr.read_text(), "the trainer to hang inside step 5")
    first_life = steps_logged(arm)
    assert [e["step"] for e in first_life] == [1, 2, 3, 4]

    # -- stalled: the (injected) clock moves past the stall limit while no step comes
    now = [time.time()]
    watcher = ExperimentWatcher(exp, clock=lambda: now[0])
    watcher.poll()
    a = watcher.state.arms["a"]
    assert (a.status, a.step) == (st.TRAINING, 4)
    now[0] = a.last_step_t + max(STALL_MIN_S, STALL_STEPS * (a.mean_step_s or 0.0)) - 1  # type: ignore[operator]
    watcher.poll()
    assert watcher.state.arms["a"].status == st.TRAINING  # quiet, but not for long enough yet
    now[0] += 2
    watcher.poll()
    assert watcher.state.arms["a"].status == st.STALLED
    assert status.cmd_status(argparse.Namespace(name="crash", json=False), clock=lambda: now[0]) == 0
    out = capsys.readouterr().out
    assert "a [baseline]  STALLED" in out and "stalled: no step for" in out and "stderr.log" in out

    # -- kill -9 in the middle of step 5, once step 3's checkpoint (written in the background) is on disk
    wait_for(lambda: checkpoint_steps(arm.checkpoints) == [3], "step 3's checkpoint")
    pid, _ = supervise.read_pid(arm)  # type: ignore[misc]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: supervise.read_exit(arm) is not None, "the supervisor to record the kill")
    now[0] = time.time()
    watcher.poll()  # the first poll after the exit was recorded
    a = watcher.state.arms["a"]
    assert a.status == st.CRASHED and a.exit_code == -signal.SIGKILL
    assert a.failure is not None and "killed by signal 9 (SIGKILL)" in a.failure.message
    assert "gputwin resume a" in a.failure.hint

    def stderr_tail_shows_the_kill() -> bool:
        watcher.poll()
        return any("SIGKILL" in line for line in watcher.state.arms["a"].stderr_tail)

    wait_for(stderr_tail_shows_the_kill, "the supervisor's line in the stderr tail")
    assert any(faults.HANG_MESSAGE in line for line in watcher.state.arms["a"].stderr_tail)
    assert cli.main(["status", "crash"]) == status.EXIT_ARM_CRASHED
    out = capsys.readouterr().out
    assert "CRASHED" in out and "killed by signal 9 (SIGKILL)" in out and "stderr.log, last lines:" in out

    # -- resume: from the checkpoint of step 3, steps 4-6 again, the same losses as before the kill
    monkeypatch.delenv(faults.ENV_VAR)
    assert cli.main(["resume", "a", "-x", "crash"]) == 0
    assert "Resumed a (it was crashed)" in capsys.readouterr().out
    wait_for(lambda: supervise.read_exit(arm) is not None, "the resumed arm to end")
    assert supervise.read_exit(arm) == 0, arm.stderr.read_text()[-3000:]
    second = lives(arm)[1]
    assert second[0]["step"] == 3
    resumed = next(e for e in second if e.kind == ev.RESUMED)
    assert resumed["step"] == 3 and Path(resumed["checkpoint"]).name == "step-000003"
    again = [e for e in second if e.kind == ev.STEP]
    assert [e["step"] for e in again] == [4, 5, 6] and second[-1].kind == ev.FINISHED
    assert math.isclose(again[0]["loss"], first_life[3]["loss"], rel_tol=1e-5)
    for view in (watcher, ExperimentWatcher(exp)):  # the watcher that saw the crash, and a new one
        now[0] = time.time()
        view.poll()
        a = view.state.arms["a"]
        assert (a.status, a.step, a.restarts, a.exit_code) == (st.FINISHED, 6, 1, 0)
        assert a.loss_history.steps == [1, 2, 3, 4, 5, 6]  # each step once, in order
        assert a.loss_history.raw[3] == pytest.approx(again[0]["loss"])


@fault("kill -9 of a process co-training several arms",
       "Its supervisor records the signal in the exit file of every arm the process still held: each shows `crashed`. "
       "`gputwin resume ARM` brings each back in a process of its own from its own last checkpoint, with the "
       "losses it had co-trained.")
@pytest.mark.slow
def test_kill_9_of_a_co_training_process_crashes_each_of_its_arms_and_each_resumes_on_its_own(
        world: SimpleNamespace, logs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import replace

    from tiny import tiny_qwen3

    qwen = world.folder / "qwen3"
    if not qwen.is_dir():
        tiny_qwen3(qwen, make_samples(24))
    arms = []
    for name, rank, targets in (("a", 4, ("q_proj", "v_proj")), ("b", 8, ("q_proj", "k_proj", "v_proj", "o_proj"))):
        profile = profile_for(qwen, world.train, world.test, name=name, milestone_step=6)
        arms.append(replace(profile, lora=replace(profile.lora, r=rank, alpha=2 * rank, dropout=0.0,
                                                  target_modules=targets)))
    monkeypatch.setenv(faults.ENV_VAR, "hang@5")  # steps 1-4 (a checkpoint at 3), then step 5 never ends
    experiment = Experiment("shared-crash", tuple(arms), Rules(baseline="a"), placement=Placement(cotrain="on"))
    exp = launcher.start_experiment(experiment, root=logs)
    a, b = exp.arm("a"), exp.arm("b")
    assert supervise.read_pid(a) == supervise.read_pid(b)  # one process for both
    wait_for(lambda: faults.HANG_MESSAGE in a.stderr.read_text(), "the shared process to hang inside step 5")
    first_life = {arm.name: steps_logged(arm) for arm in (a, b)}
    assert all([e["step"] for e in steps] == [1, 2, 3, 4] for steps in first_life.values())

    pid, _ = supervise.read_pid(a)  # type: ignore[misc]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: all(supervise.read_exit(arm) is not None for arm in (a, b)), "the supervisor to record the kill")
    watcher = ExperimentWatcher(exp)
    watcher.poll()
    for name in ("a", "b"):
        crashed = watcher.state.arms[name]
        assert crashed.status == st.CRASHED and crashed.exit_code == -signal.SIGKILL
        assert crashed.failure is not None and f"gputwin resume {name}" in crashed.failure.hint
    assert cli.main(["status", "shared-crash"]) == status.EXIT_ARM_CRASHED
    assert capsys.readouterr().out.count("CRASHED") >= 2

    # -- resume each: alone, from its own checkpoint of step 3, step 4 again with the loss it had co-trained
    monkeypatch.delenv(faults.ENV_VAR)
    for name in ("a", "b"):
        assert cli.main(["resume", name, "-x", "shared-crash"]) == 0
    assert supervise.read_pid(a) != supervise.read_pid(b)
    for arm in (a, b):
        wait_for(lambda arm=arm: supervise.read_exit(arm) is not None, f"the resumed arm {arm.name} to end")
        assert supervise.read_exit(arm) == 0, arm.stderr.read_text()[-3000:]
        first, second = lives(arm)
        assert first[0]["shares_process_with"] == ["b" if arm.name == "a" else "a"]
        assert "shares_process_with" not in second[0].data
        resumed = next(e for e in second if e.kind == ev.RESUMED)
        assert resumed["step"] == 3 and Path(resumed["checkpoint"]).name == "step-000003"
        again = [e for e in second if e.kind == ev.STEP]
        assert [e["step"] for e in again] == [4, 5, 6] and second[-1].kind == ev.FINISHED
        assert math.isclose(again[0]["loss"], first_life[arm.name][3]["loss"], rel_tol=1e-5)


@fault("kill -9 of a trainer mid-step, late in a long run",
       "The same for a curve kept in merged buckets (runs longer than 512 steps): the points after the checkpoint "
       "are dropped, the smoothed curve continues from the last point kept, steps stay in order.")
def test_a_long_loss_curve_rewinds_to_the_checkpoint_a_resumed_run_starts_from() -> None:
    arm = st.ArmState("a")
    t = 0.0

    def life(first: int, last: int, resumed_from: int | None) -> None:
        nonlocal t
        t += 1
        started = ev.make(ev.STARTED, t=t, arm="a", pid=1, device="cpu", samples=8, steps_per_epoch=2000,
                          total_steps=2000, milestone_step=2000, step=resumed_from or 0)
        st.apply(arm, ev.parse(ev.dumps(started)))
        if resumed_from is not None:
            st.apply(arm, ev.parse(ev.dumps(ev.make(ev.RESUMED, t=t, step=resumed_from, checkpoint="c"))))
        for step in range(first, last + 1):
            t += 0.01
            st.apply(arm, ev.parse(ev.dumps(ev.make(ev.STEP, t=t, step=step, epoch=step / 2000, loss=1.0, lr=1e-3))))

    life(1, 1500, None)  # killed at step 1500; its last checkpoint was step 1200
    life(1201, 2000, 1200)
    steps = arm.loss_history.steps
    assert steps == sorted(set(steps)) and steps[-1] == 2000 and len(steps) <= st.HISTORY_POINTS
    assert arm.loss_history.smoothed[-1] == pytest.approx(1.0)
    assert (arm.step, arm.restarts) == (2000, 1)


# ---------------------------------------------------------------- a trainer killed inside a checkpoint write


@fault("kill -9 during a checkpoint write",
       "A checkpoint is written to a temporary folder and renamed into place only when complete, so the half-"
       "written one is never taken: the next start removes it and resumes from the previous checkpoint.")
@pytest.mark.slow
def test_kill_9_inside_a_checkpoint_write_keeps_the_previous_checkpoint_and_resume_takes_it(
        world: SimpleNamespace, logs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV_VAR, "killsave@6")  # SIGKILL inside the milestone checkpoint of step 6
    exp = launcher.start_experiment(one_arm("killsave", tag_profile(world)), root=logs)
    arm = exp.arm("a")
    wait_for(lambda: supervise.read_exit(arm) is not None, "the trainer to be killed")
    assert supervise.read_exit(arm) == -signal.SIGKILL
    assert launcher.arm_status(arm) == launcher.CRASHED
    half = [p for p in arm.checkpoints.iterdir() if p.name.startswith(".tmp-step-000006")]
    assert len(half) == 1 and not (half[0] / "checkpoint.json").exists()  # killed mid-write
    assert checkpoint_steps(arm.checkpoints) == [3]

    monkeypatch.delenv(faults.ENV_VAR)
    assert train_in_process(arm.root) == 0
    second = lives(arm)[1]
    resumed = next(e for e in second if e.kind == ev.RESUMED)
    assert Path(resumed["checkpoint"]).name == "step-000003"
    assert [e["step"] for e in second if e.kind == ev.STEP] == [4, 5, 6]
    assert second[-1].kind == ev.FINISHED
    assert not any(p.name.startswith(".") for p in arm.checkpoints.iterdir())  # the half-written one is gone
    assert checkpoint_steps(arm.checkpoints) == [3, 6]


# ---------------------------------------------------------------- the UI, monitors and the terminal


class Terminal:
    """A process on a pseudo-terminal that is its controlling terminal, as in an SSH session."""

    def __init__(self, argv: list[str], env: dict[str, str], cols: int = 120, rows: int = 36) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: nothing but exec after a fork
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        os.set_inheritable(self.fd, False)  # only this process holds the master: closing it hangs up
        self.output = bytearray()
        self.exit_code: int | None = None

    def pump(self) -> None:
        """Take what the program wrote (so it never blocks on a full terminal)."""
        while self.fd >= 0 and select.select([self.fd], [], [], 0)[0]:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO: the program is gone
                return
            if not data:
                return
            self.output += data

    def wait_for_output(self, text: bytes) -> None:
        wait_for(lambda: text in self.output, f"{text!r} on the terminal of pid {self.pid}", every=self.pump)

    def alive(self) -> bool:
        if self.exit_code is None:
            done, status_ = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.exit_code = os.waitstatus_to_exitcode(status_)
        return self.exit_code is None

    def wait(self) -> int:
        if self.exit_code is None:
            self.exit_code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.exit_code

    def kill9(self) -> int:
        os.kill(self.pid, signal.SIGKILL)
        return self.wait()

    def hang_up(self) -> int:
        """Close the terminal's master side, as a dropped SSH connection does: the kernel sends SIGHUP."""
        os.close(self.fd)
        self.fd = -1
        return self.wait()

    def close(self) -> None:
        if self.alive():
            self.kill9()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for terminal in opened:
        terminal.close()


HEADLESS_MONITOR = ("import sys, pathlib; from gputwin.faces.headless import monitor; from gputwin.core.paths import ExperimentPaths; "
                    "sys.exit(monitor(ExperimentPaths(pathlib.Path(sys.argv[1]))))")


def long_profile_toml(world: SimpleNamespace, folder: Path) -> Path:
    """A profile for the real CLI: 6000 tiny steps, far more than the test waits for (it stops the arm)."""
    path = folder / "a.toml"
    path.write_text(f"""name = "a"
[model]
base = "{world.bert}"
task = "tag"
dtype = "fp32"
[lora]
r = 4
target_modules = ["query", "value"]
[train]
learning_rate = 5e-3
batch_size = 4
epochs = 1000
max_length = 64
checkpoint_every = 1000
engine = "plain"
threads = 1
[data]
train = "{world.train}"
test = "{world.test}"
[milestone]
step = 6000
sample_size = 4
""")
    return path


@fault("SIGHUP of the monitor's terminal (a dropped SSH session)",
       "`gputwin run --headless` dies with its terminal; the trainers live in sessions of their own, so they get "
       "no SIGHUP and keep training.")
@fault("kill -9 of the UI",
       "The UI only reads files: training goes on, events keep coming; another UI attached at the same time keeps "
       "updating.")
@fault("kill -9 of a headless monitor",
       "Same as the UI: the monitor only reads files; nothing of the run is lost.")
@fault("Two UIs/watchers attached at once",
       "Two UIs and two headless monitors watch one live experiment side by side, each rebuilding the same state "
       "from the files; a new watcher or `gputwin status` later shows the full history from step 1.")
@fault("A second `gputwin run` into the same experiment while its arms are alive",
       "With the same profiles it attaches to the running experiment and says so (tests/test_rejoin.py); with "
       "other settings it is refused (exit 2) naming the arms alive, the settings that differ and how to watch it "
       "or start beside it; no trainer is started and the running one is untouched.")
@pytest.mark.slow
def test_a_dropped_terminal_and_killed_uis_and_monitors_leave_training_running(
        world: SimpleNamespace, tmp_path: Path, logs: Path, terminals: list[Terminal],
        capsys: pytest.CaptureFixture[str]) -> None:
    profile = long_profile_toml(world, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != faults.ENV_VAR}
    env.update(GPUTWIN_LOGS=str(logs), TERM="xterm-256color")
    py = sys.executable

    def opened(argv: list[str]) -> Terminal:
        terminals.append(Terminal(argv, env))
        return terminals[-1]

    def pump_all() -> None:
        for terminal in terminals:
            terminal.pump()

    run = opened([py, "-m", "gputwin.faces.cli", "run", str(profile), "--name", "live", "--headless"])
    run.wait_for_output(b"Watching live")
    exp = ExperimentPaths(logs / "live")
    arm = exp.arm("a")
    wait_for(lambda: len(steps_logged(arm)) >= 3, "the first steps", every=pump_all)
    trainer = supervise.read_pid(arm)
    assert trainer is not None
    assert os.getsid(trainer[0]) != os.getsid(run.pid)  # not in the terminal's session

    ui, ui2 = opened([py, "-m", "gputwin.faces.cli", "attach", "live"]), opened([py, "-m", "gputwin.faces.cli", "attach", "live"])
    monitor = opened([py, "-c", HEADLESS_MONITOR, str(exp.root)])
    for terminal, shows in ((ui, b"live"), (ui2, b"live"), (monitor, b"Watching live")):
        terminal.wait_for_output(shows)
    assert all(t.alive() for t in terminals)  # four watchers at once

    changed = tmp_path / "changed" / "a.toml"  # the same arm with another learning rate
    changed.parent.mkdir()
    changed.write_text(profile.read_text().replace("learning_rate = 5e-3", "learning_rate = 4e-3"))
    assert cli.main(["run", str(changed), "--name", "live"]) == 2
    err = capsys.readouterr().err
    assert "experiment live is running (arms alive: a) with other settings" in err and "gputwin attach live" in err
    assert supervise.read_pid(arm) == trainer

    assert ui.kill9() == -signal.SIGKILL
    assert monitor.kill9() == -signal.SIGKILL
    before = len(ui2.output)
    wait_for(lambda: len(ui2.output) > before + 1000, "the other UI to go on redrawing", every=pump_all)
    assert run.hang_up() == -signal.SIGHUP, bytes(run.output[-3000:]).decode(errors='replace')
    assert ui2.kill9() == -signal.SIGKILL

    seen = len(steps_logged(arm))
    wait_for(lambda: len(steps_logged(arm)) >= seen + 20, "steps after every watcher is gone")
    assert supervise.read_pid(arm) == trainer and launcher.arm_alive(arm)

    watcher = ExperimentWatcher(exp)
    watcher.poll()
    a = watcher.state.arms["a"]
    assert a.status == st.TRAINING and a.loss_history.count == a.step >= seen + 20  # every step from 1, once
    assert a.loss_history.steps[0] == 1
    assert cli.main(["status", "live"]) == 0
    assert "a [baseline]  TRAINING" in capsys.readouterr().out

    assert cli.main(["stop", "a", "-x", "live"]) == 0
    wait_for(lambda: supervise.read_exit(arm) is not None, "the stopped arm to exit")
    assert supervise.read_exit(arm) == 0
    last = ev.read_events(arm.events).events[-1]
    assert last.kind == ev.STOPPED and last["by"] == "cli" and Path(last["checkpoint"]).is_dir()



@fault("The UI's terminal closes without a SIGHUP for the UI (started through make, as `make demo` starts it: make, "
       "the session's leader, takes the signal and waits for its child)",
       "The UI looks every second whether its terminal is still one; a hung-up terminal is not, and the UI ends as "
       "after `q`, training going on; make, which waited for it, ends too.")
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_the_ui_ends_when_its_terminal_goes_away_even_without_a_hangup_signal(
        tmp_path: Path, terminals: list[Terminal]) -> None:
    shutil.copytree(Path(__file__).parent / "fixtures" / "events" / "seed-verdict", tmp_path / "seed-verdict")
    (tmp_path / "Makefile").write_text(f"ui:\n\t{sys.executable} -m gputwin.faces.cli attach {tmp_path / 'seed-verdict'}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}  # the terminal's size, not these
    env.update(TERM="xterm-256color")
    terminals.append(Terminal([str(shutil.which("make")), "-C", str(tmp_path), "ui"], env))
    make = terminals[-1]
    try:
        make.wait_for_output(b"Detach")  # the footer: the UI is up (make echoes the command, which names the folder)
    except AssertionError:
        raise AssertionError(bytes(make.output[-3000:]).decode(errors="replace")) from None
    [ui] = psutil.Process(make.pid).children()

    def ended() -> bool:
        try:
            return ui.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:  # reaped by make
            return True

    os.close(make.fd)  # the terminal goes away: make, its session's leader, gets SIGHUP; the UI gets none
    make.fd = -1
    try:
        wait_for(ended, "the UI to end without its terminal", limit_s=30)
    finally:
        if not ended():
            ui.kill()
    wait_for(lambda: not make.alive(), "make to end after the UI", limit_s=30)


# ---------------------------------------------------------------- a full disk


@fault("Disk full while checkpointing",
       "The half-written checkpoint is removed; the arm stops with a `failed` event DiskFull (which checkpoint, "
       "where, how much space was left) and a hint to free space and `gputwin resume`; the earlier checkpoints "
       "stay intact and resume takes them.")
@pytest.mark.slow
def test_disk_full_while_checkpointing_fails_cleanly_and_keeps_the_earlier_checkpoints(
        world: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    arm = make_arm(tmp_path, tag_profile(world))
    monkeypatch.setenv(faults.ENV_VAR, "fullsave@6")
    assert train_in_process(arm) == 1
    failed = ev.read_events(arm / "events.jsonl").events[-1]
    assert failed.kind == ev.FAILED and failed["error"] == "DiskFull" and failed["step"] == 6
    assert "cannot write checkpoint step-000006" in failed["message"] and "No space left on device" in failed["message"]
    assert "MiB free" in failed["message"] and "gputwin resume a" in failed["hint"]
    err = capsys.readouterr().err
    assert "DiskFull" in err and "Traceback" not in err
    assert sorted(p.name for p in (arm / "checkpoints").iterdir()) == ["step-000003"]

    monkeypatch.delenv(faults.ENV_VAR)
    assert train_in_process(arm) == 0
    second = lives(arm)[1]
    assert Path(next(e for e in second if e.kind == ev.RESUMED)["checkpoint"]).name == "step-000003"
    assert second[-1].kind == ev.FINISHED


@fault("Disk full while a periodic checkpoint is written in the background",
       "The write runs on a thread while training goes on; its failure reaches the run at the next step boundary "
       "as the same `failed` event DiskFull, the temporary folder removed and the earlier checkpoints intact.")
@pytest.mark.slow
def test_disk_full_in_a_periodic_checkpoint_written_in_the_background_fails_the_same_way(
        world: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 3's checkpoint is written on a thread while steps 4 and on train: its failure reaches the run at the
    next step boundary, as the same DiskFull, with nothing half-written left."""
    arm = make_arm(tmp_path, tag_profile(world))
    monkeypatch.setenv(faults.ENV_VAR, "fullsave@3")
    assert train_in_process(arm) == 1
    evs = ev.read_events(arm / "events.jsonl").events
    failed = evs[-1]
    assert failed.kind == ev.FAILED and failed["error"] == "DiskFull"
    assert "cannot write checkpoint step-000003" in failed["message"] and "gputwin resume a" in failed["hint"]
    assert 3 <= failed["step"] <= 6 and not any(e.kind == ev.CHECKPOINT for e in evs)  # the milestone waits for it
    assert list((arm / "checkpoints").iterdir()) == []  # the temporary folder is gone


@fault("A failure while a background checkpoint write fails too",
       "The `failed` event names the failure and its hint, and adds that the checkpoint being written failed too "
       "(a full disk): the resume starts from the checkpoint before it, and nothing half-written is left.")
@pytest.mark.slow
def test_a_run_that_fails_while_its_checkpoint_write_fails_too_says_both(
        world: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 3's checkpoint fails on its thread (disk full) while step 4 fails for a reason of its own (out of
    memory): the failed event names the step's failure, and says the checkpoint is not there either."""
    arm = make_arm(tmp_path, tag_profile(world))
    monkeypatch.setenv(faults.ENV_VAR, "fullsave@3")
    after_step = faults.after_step

    def out_of_memory_at_4(fault: Any, step: int) -> None:
        after_step(fault, step)
        if step == 4:
            raise torch.OutOfMemoryError("CUDA out of memory (injected at step 4)")

    monkeypatch.setattr(faults, "after_step", out_of_memory_at_4)
    assert train_in_process(arm) == 1
    failed = ev.read_events(arm / "events.jsonl").events[-1]
    assert failed.kind == ev.FAILED and failed["error"] == "OutOfMemory"
    assert "injected at step 4" in failed["message"]
    assert "the checkpoint being written then failed too" in failed["message"] and "step-000003" in failed["message"]
    assert list((arm / "checkpoints").iterdir()) == []


def _mount_tmpfs(folder: Path, size: int) -> bool:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@fault("Disk full while checkpointing (a real full disk)",
       "Where a small tmpfs can be mounted (root): the checkpoint folder on a disk too small for a second "
       "checkpoint gives the same `failed` event DiskFull, whether torch or safetensors hit the full disk.")
@pytest.mark.slow
def test_a_really_full_disk_under_the_checkpoints_gives_the_same_clean_failure(
        world: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    probe = make_arm(tmp_path / "probe", tag_profile(world, epochs=0.5, milestone_step=3))  # one checkpoint
    assert train_in_process(probe) == 0
    one = sum(-(-p.stat().st_size // 4096) * 4096 for p in (probe / "checkpoints").rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, one + one // 2):  # room for one checkpoint, not two
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); the injected test covers it")
    try:
        arm = make_arm(tmp_path, tag_profile(world, output_dir=str(disk)))
        assert train_in_process(arm) == 1
        failed = ev.read_events(arm / "events.jsonl").events[-1]
        assert failed.kind == ev.FAILED and failed["error"] == "DiskFull", failed.data
        assert "step-000006" in failed["message"] and "gputwin resume a" in failed["hint"]
        assert "Traceback" not in capsys.readouterr().err
        assert checkpoint_steps(disk) == [3] and not any(p.name.startswith(".") for p in disk.iterdir())
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@fault("Disk full while logging",
       "The failed write of an event stops the arm with a `failed` event DiskFull naming events.jsonl and a hint "
       "(stderr carries it too, without a traceback); the checkpoints stay intact.")
@pytest.mark.slow
def test_disk_full_while_logging_fails_cleanly_and_keeps_the_checkpoints(
        world: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    arm = make_arm(tmp_path, tag_profile(world))
    monkeypatch.setenv(faults.ENV_VAR, "fulllog@5")
    assert train_in_process(arm) == 1
    evs = ev.read_events(arm / "events.jsonl").events
    failed = evs[-1]
    assert failed.kind == ev.FAILED and failed["error"] == "DiskFull" and failed["step"] == 4
    assert "events.jsonl" in failed["message"] and "No space left on device" in failed["message"]
    assert "gputwin resume a" in failed["hint"]
    assert [e["step"] for e in evs if e.kind == ev.STEP] == [1, 2, 3, 4]
    err = capsys.readouterr().err
    assert "DiskFull" in err and "Traceback" not in err
    assert checkpoint_steps(arm / "checkpoints") == [3]


# ---------------------------------------------------------------- damaged files


def _damaged_experiment(root: Path) -> ExperimentPaths:
    """Two ended arms whose logs hold every kind of damage a reader can meet."""
    exp = ExperimentPaths(root / "damaged")
    exp.root.mkdir(parents=True)
    arms = {}
    for name in ("a", "b"):
        arm = exp.arm(name)
        arm.root.mkdir()
        arms[name] = arm
        with EventWriter(arm.events) as log:
            log.emit(ev.STARTED, arm=name, pid=1, device="cpu", samples=24, steps_per_epoch=6, total_steps=6,
                     milestone_step=3)
            for step in (1, 2, 3):
                log.emit(ev.STEP, step=step, epoch=step / 6, loss=1.0 / step, lr=1e-3)
            log.emit(ev.VALIDATION, step=3, precision=0.5, recall=0.5, f1=0.5)
    with open(arms["a"].events, "ab") as fh:
        fh.write(b'{"v":1,"t":1,"kind":"st\n')  # truncated by a crash, then appended to
        fh.write(b"not json at all\n")
        fh.write(b"\xff\xfe\x00 binary\n")
        fh.write(b'{"v":2,"t":2,"kind":"step","step":4,"epoch":0.6,"loss":0.2,"lr":0.001,"new_field":1}\n')
        fh.write(b'{"v":1,"t":3,"kind":"a_kind_from_later","step":4}\n')  # unknown kind, same schema: skipped
        fh.write(b'{"v":1,"t":4,"kind":"step","step":4}\n')  # missing fields
        fh.write(ev.dumps(ev.make(ev.FINISHED, step=4)).encode() + b"\n")
    with open(arms["b"].events, "ab") as fh:
        fh.write(b'{"v":1,"t":5,"kind":"step","step":4,"epo')  # the trainer died mid-line
    arms["a"].exit.write_text("0\n")
    arms["b"].exit.write_text("-9\n")
    (exp.root / "experiment.json").write_text('{"name": "damaged", "arm_names": ["a", "b"], "arms": 3}')
    return exp


@fault("A truncated or corrupt line in an events log",
       "Skipped and reported with its line number and reason (in the state, `gputwin status` and the report); "
       "a partial last line is held back, and counted as \"the trainer died while writing it\" once the trainer is gone.")
@fault("An events log line from a newer schema",
       "Reported (\"schema version 2 is newer than this gputwin reads; upgrade gputwin\"), not guessed at; events "
       "of an unknown kind in the current schema are skipped silently.")
def test_damaged_event_logs_are_skipped_and_reported_never_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GPUTWIN_LOGS", str(tmp_path))
    exp = _damaged_experiment(tmp_path)
    watcher = ExperimentWatcher(exp)
    watcher.poll()
    a, b = watcher.state.arms["a"], watcher.state.arms["b"]
    assert (a.status, a.step) == (st.FINISHED, 4)
    reasons = dict(a.bad_lines)
    assert sorted(reasons) == [6, 7, 8, 9, 11]
    assert reasons[6].startswith("not JSON") and reasons[7].startswith("not JSON") and reasons[8].startswith("not JSON")
    assert "schema version 2 is newer than this gputwin reads (1); upgrade gputwin" in reasons[9]
    assert reasons[11] == "step event is missing epoch, loss, lr"
    assert b.status == st.CRASHED and b.exit_code == -9
    assert b.bad_lines == [(6, "incomplete last line: the trainer died while writing it")]
    assert any("experiment.json" in p for p in watcher.state.problems)

    assert cli.main(["status", "damaged"]) == status.EXIT_ARM_CRASHED
    out = capsys.readouterr().out
    assert "5 unreadable event line(s); first: line 6: not JSON" in out and "warning:" in out
    assert cli.main(["status", "damaged", "--json"]) == status.EXIT_ARM_CRASHED
    summary = json.loads(capsys.readouterr().out)
    assert [arm["bad_lines"] for arm in summary["arms"]] == [5, 1]
    assert cli.main(["report", "damaged"]) == 0
    report = exp.comparison.read_text()
    assert "## Problems reading the files" in report and "a: line 9: schema version 2 is newer" in report


@fault("A garbage control file",
       "Requests are parsed strictly: junk, an unknown action or field, a symbolic link, a FIFO, a folder or an "
       "oversized file is removed (a folder renamed aside) and reported on stderr; training goes on; the launcher "
       "and supervisor skip such files too.")
@pytest.mark.slow
def test_garbage_control_files_are_removed_and_reported_while_training_goes_on(
        world: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arm = make_arm(tmp_path, tag_profile(world))
    requests = arm / "control"
    requests.mkdir()
    secret = tmp_path / "secret.json"
    secret.write_text('{"action": "stop"}')
    (requests / "0001-junk.json").write_text("{not json")
    (requests / "0002-odd.json").write_text(json.dumps({"action": "explode"}))
    (requests / "0003-path.json").write_text(json.dumps({"action": "validate", "path": "/etc/passwd"}))
    (requests / "0004-link.json").symlink_to(secret)
    os.mkfifo(requests / "0005-fifo.json")  # reading it would block the trainer forever
    (requests / "0006-folder.json").mkdir()
    (requests / "0007-huge.json").write_text(json.dumps({"action": "stop", "by": "cli", "t": 0}) + " " * 10_000)
    (requests / "0008-binary.json").write_bytes(b"\xff\xfe\x00")
    assert all(isinstance(r, control.ControlError) for _, r in control.pending(requests))
    launcher._clear_stale_stops(ArmPaths(arm))  # the launcher's reader of requests: no crash, nothing removed
    assert len(list(requests.iterdir())) == 8
    assert train_in_process(arm) == 0
    assert ev.read_events(arm / "events.jsonl").events[-1].kind == ev.FINISHED  # none of them stopped it
    assert sorted(p.name for p in requests.iterdir()) == [".rejected-0006-folder.json"]
    assert secret.read_text() == '{"action": "stop"}'  # a link's target is never read as a request nor removed
    err = capsys.readouterr().err
    for name, why in (("0001", "unreadable request"), ("0002", "unknown action 'explode'"),
                      ("0003", "unknown field(s) ['path']"), ("0004", "symbolic link"), ("0005", "not a plain file"),
                      ("0006", "not a plain file"), ("0007", "larger than 4096 bytes"), ("0008", "unreadable request")):
        assert any(f"ignored control file {name}" in line and why in line for line in err.splitlines()), (name, err)


# ---------------------------------------------------------------- diverged loss, out of memory


@fault("NaN loss", "The step is not applied; the arm stops with a `failed` event NonFiniteLoss (the step where it "
       "happened) and a hint (lower the learning rate, warmup, grad_clip); the checkpoint before it stays intact "
       "and resume continues from it.")
@fault("CUDA out of memory (injected on CPU)",
       "A `failed` event OutOfMemory with the first line of the error and a hint (batch_size, max_length, other "
       "processes on the GPU); the checkpoint before it stays intact and resume continues from it.")
@pytest.mark.parametrize("kind, error, hint", [("nan", "NonFiniteLoss", "learning_rate"), ("oom", "OutOfMemory", "batch_size")])
@pytest.mark.slow
def test_nan_loss_and_out_of_memory_fail_with_the_cause_and_a_hint_keeping_the_checkpoint(
        world: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        kind: str, error: str, hint: str) -> None:
    arm = make_arm(tmp_path, tag_profile(world))
    monkeypatch.setenv(faults.ENV_VAR, f"{kind}@5")
    assert train_in_process(arm) == 1
    evs = ev.read_events(arm / "events.jsonl").events
    failed = evs[-1]
    assert failed.kind == ev.FAILED and failed["error"] == error and failed["step"] == 4
    assert ("at step 5" in failed["message"]) and hint in failed["hint"]
    assert [e["step"] for e in evs if e.kind == ev.STEP] == [1, 2, 3, 4]
    assert error in capsys.readouterr().err
    assert checkpoint_steps(arm / "checkpoints") == [3]
    monkeypatch.delenv(faults.ENV_VAR)
    assert train_in_process(arm) == 0
    second = lives(arm)[1]
    assert [e["step"] for e in second if e.kind == ev.STEP] == [4, 5, 6]
    assert all(math.isfinite(e["loss"]) for e in second if e.kind == ev.STEP)


@fault("inf loss", "Caught like NaN before the update: no parameter changes, NonFiniteLoss (`loss is inf`).")
def test_an_infinite_loss_is_caught_before_the_update() -> None:
    import torch

    from gputwin.train.engine import NonFiniteLoss, PlainEngine

    class InfiniteLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(loss=(self.weight * x).sum() * math.inf)

    model = InfiniteLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    engine = PlainEngine(model, optimizer, device=torch.device("cpu"), model_dtype=torch.float32, grad_clip=1.0, pad_id=0)
    with pytest.raises(NonFiniteLoss, match="loss is inf"):
        engine.step({"x": torch.ones(3)}, lr=0.1)
    assert torch.equal(model.weight.detach(), torch.ones(3)) and model.weight.grad is None


def test_every_test_here_is_in_the_fault_table() -> None:
    """The docs table is made from the marks: a fault test without one would be missing from it."""
    unmarked = [name for name, obj in globals().items() if name.startswith("test_") and callable(obj)
                and name != "test_every_test_here_is_in_the_fault_table" and not getattr(obj, "faults", None)]
    assert unmarked == []
    titles = [title for title, _, _ in fault_table()]
    assert len(titles) == len(set(titles)) >= 15
