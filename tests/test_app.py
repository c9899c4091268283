"""The terminal UI driven with Pilot against recorded experiment folders (copied to tmp_path).

The clock is fixed near the end of each recording and the GPU sampler is a stand-in with fixed
readings (NVML cannot run here), so every figure on screen is known in advance.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from rich.console import Console

from gputwin.control import requests as control
from gputwin.faces.app import GputwinApp, make_app
from gputwin.core.events import dumps, make
from gputwin.reading.gpu import CpuSample, GpuSample
from gputwin.core.paths import ExperimentPaths
from gputwin.core.state import ArmState
from gputwin.faces.widgets.arm_pane import ArmPane
from gputwin.faces.widgets.feed import ExperimentFeed
from gputwin.faces.formatting import device_label, shorten_paths, step_ticks
from gputwin.faces.widgets.log_view import LogView
from gputwin.faces.widgets.modals import KEY_HELP, ConfirmScreen, HelpScreen
from gputwin.faces.widgets.progress import StepProgress
from gputwin.faces.widgets.prompts import extend_prompt, why_not

FIXTURES = Path(__file__).parent / "fixtures" / "events"
GIB = 1024**3
# A moment just after the last event of each recording.
CLOCKS = {"seed-midrun": 1767603870.0, "seed-verdict": 1767604312.0, "crashed": 1767603820.0}
SIZE = (160, 48)

pytestmark = pytest.mark.anyio  # Pilot tests are coroutines; anyio's pytest plugin runs them


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FixedSampler:
    """Stands in for gputwin.reading.gpu.Sampler: the same readings every time, a minute of history."""

    def __init__(self, t: float, cpu_pids: tuple[int, ...] = ()) -> None:
        self.pids: list[int] = []
        self.gpus = {
            i: [GpuSample(i, "NVIDIA GeForce RTX 3090", 90.0 + i + k % 5, (20 - i) * GIB, 24 * GIB,
                          280.0 + k % 30, 350.0, 70.0 + i, t - 60 + k, {48210 + i: (18 - i) * GIB})
                for k in range(60)]
            for i in (0, 1)
        }
        self.cpus = {pid: [CpuSample(pid, 250.0 + k % 3, int(1.5 * GIB), 41.0, 12 * GIB, 32 * GIB, t - 60 + k)
                           for k in range(60)] for pid in cpu_pids}

    def latest_gpus(self) -> dict[int, GpuSample]:
        return {i: h[-1] for i, h in self.gpus.items()}

    def latest_cpus(self) -> dict[int, CpuSample]:
        return {p: h[-1] for p, h in self.cpus.items()}

    def gpu_history(self, index: int) -> list[GpuSample]:
        return list(self.gpus.get(index, ()))

    def cpu_history(self, pid: int) -> list[CpuSample]:
        return list(self.cpus.get(pid, ()))

    def set_pids(self, pids: Any) -> None:
        self.pids = list(pids)


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Any:
    """ETAs are shown as local clock times: pin the zone so they read the same everywhere."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def copy_fixture(name: str, tmp_path: Path) -> ExperimentPaths:
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return ExperimentPaths(target)


def fixture_app(name: str, tmp_path: Path, **sampler_args: Any) -> GputwinApp:
    exp = copy_fixture(name, tmp_path)
    return make_app(exp, clock=lambda: CLOCKS[name], sampler=FixedSampler(CLOCKS[name], **sampler_args))


def pretend_alive(exp: ExperimentPaths, arm: str) -> None:
    """Point the arm's pid file at this test process, so the launcher sees a live trainer to ask."""
    me = psutil.Process()
    exp.arm(arm).pid.write_text(f"{me.pid} {me.create_time():.3f}\n")


async def wait_until(pilot: Any, condition: Any, what: str, tries: int = 200) -> None:
    """Let the app work (the watcher runs in a thread) until `condition()` holds."""
    for _ in range(tries):
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"gave up waiting for {what}")


async def loaded(pilot: Any) -> None:
    """The first state is on screen, and the report of a decided verdict has been kept (it says so)."""
    app = pilot.app
    await wait_until(pilot, lambda: app.updates >= 1 and app.query(ArmPane), "the first state")
    verdict = app.state.verdict
    if verdict is not None and verdict.scenario != "waiting":
        await wait_until(pilot, lambda: app.reports >= 1, "the report")
    await pilot.pause()


def screen_text(app: GputwinApp) -> str:
    """What the terminal shows, as plain text (the same render Textual's screenshots use)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), record=True, force_terminal=True,
                      legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


def _in_toast(app: GputwinApp, expected: str) -> bool:
    """A notification (toast) with this text was raised."""
    return any(expected in n.message for n in app._notifications)


def requests(exp: ExperimentPaths, arm: str) -> list[control.Request]:
    return [r for _, r in control.pending(exp.arm(arm).control) if isinstance(r, control.Request)]


def last_step(exp: ExperimentPaths, arm: str) -> dict[str, Any]:
    lines = exp.arm(arm).events.read_text().splitlines()
    return next(e for e in map(json.loads, reversed(lines)) if e["kind"] == "step")


def append_events(exp: ExperimentPaths, arm: str, *events: dict[str, Any]) -> None:
    with open(exp.arm(arm).events, "a", encoding="utf-8") as fh:
        fh.write("".join(dumps(e) + "\n" for e in events))


# ---------------------------------------------------------------- plain functions


def test_step_ticks_are_round_numbers_inside_the_range() -> None:
    assert step_ticks(1, 400) == [100, 200, 300, 400]
    assert step_ticks(1, 233) == [50, 100, 150, 200]
    assert step_ticks(1, 1065) == [250, 500, 750, 1000]
    assert step_ticks(7, 7) == [7]


def test_device_labels_name_gpus_by_index_and_cpu_as_cpu() -> None:
    assert device_label("cuda:1 NVIDIA H200") == "GPU 1"
    assert device_label("cuda") == "GPU 0"
    assert device_label(None) == "CPU" and device_label("cpu") == "CPU"


def test_paths_in_messages_are_shortened_to_the_working_folder(tmp_path: Path) -> None:
    root = tmp_path / "logs" / "pii-seed"
    hint = f"see {root}/aggressive/stderr.log"
    assert shorten_paths(hint, root, cwd=tmp_path) == "see logs/pii-seed/aggressive/stderr.log"
    assert shorten_paths(hint, root, cwd=Path("/elsewhere")) == hint


@pytest.mark.parametrize(
    "status, action, refused",
    [("training", "stop", False), ("stalled", "stop", False), ("finished", "stop", True),
     ("stopped", "resume", False), ("crashed", "resume", False), ("training", "resume", True),
     ("finished", "resume", True), ("finished", "extend", False), ("crashed", "extend", True),
     ("validating", "validate", True), ("training", "validate", False), ("stopped", "validate", True)],
)
def test_why_not_refuses_only_what_cannot_apply(status: str, action: str, refused: bool) -> None:
    arm = ArmState("a", status=status, step=10, total_steps=100, steps_per_epoch=50)
    assert (why_not(arm, action) is not None) == refused


def test_extend_prompt_warns_when_the_learning_rate_has_decayed_to_almost_nothing() -> None:
    arm = ArmState("a", status="finished", step=879, total_steps=879, steps_per_epoch=879, lr=1e-8,
                   hparams={"train.learning_rate": 1.5e-4, "train.scheduler": "linear"})
    _, body = extend_prompt(arm, now=0.0)
    assert "end step:   879 → 1,758" in body.plain
    assert "down to 0.0% of its peak 1.50e-04" in body.plain
    arm.lr = 1e-4
    assert "note:" not in extend_prompt(arm, now=0.0)[1].plain


def test_extend_prompt_shows_the_new_cycle_a_finished_arm_would_train_with() -> None:
    plan = {"peak_lr": 1.5e-4, "warmup_steps": 50, "scheduler": "linear", "total_steps": 879, "anchor_step": 50,
            "anchor_progress": 0.0}
    arm = ArmState("a", status="finished", step=879, total_steps=879, steps_per_epoch=879, lr=1.7e-7, lr_plan=plan,
                   hparams={"train.learning_rate": 1.5e-4, "train.scheduler": "linear"})
    text = extend_prompt(arm, now=0.0, extend_lr=0.5)[1].plain
    assert "a new cycle: warmup over 44 steps to 7.50e-05 (50% of its peak 1.50e-04), then linear decay" in text
    assert "LR now 1.81e-07 · peak 7.50e-05" in text and "879 steps" in text and "step 879 → 1,758" in text
    assert "█" in text and "note:" not in text
    arm.step, arm.status, arm.lr = 300, "training", 1.0e-4  # mid-decay: the decay is stretched instead
    text = extend_prompt(arm, now=0.0, extend_lr=0.5)[1].plain
    assert "decay goes on from the current" in text and "new cycle" not in text


def test_feed_reads_the_stderr_tail_only_when_it_changed(tmp_path: Path) -> None:
    exp = copy_fixture("crashed", tmp_path)
    feed = ExperimentFeed(exp, clock=lambda: CLOCKS["crashed"])
    assert feed.poll() >= {"conservative", "aggressive"}
    path, lines = feed.stderr_tail("conservative")
    assert path == exp.arm("conservative").stderr and lines[-1].startswith("gputwin.supervise")
    assert feed.stderr_tail("conservative") is None
    with open(path, "a") as fh:
        fh.write("one more line\n")
    assert feed.stderr_tail("conservative")[1][-1] == "one more line"
    state, applied = feed.snapshot()
    assert state is not feed.watcher.state and state.arms["conservative"].status == "crashed" and applied == []


# ---------------------------------------------------------------- import and layout


def test_importing_the_app_does_not_import_torch() -> None:
    code = "import sys, gputwin.faces.app; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_make_app_refuses_a_missing_folder(tmp_path: Path) -> None:
    from gputwin.core.errors import UserError

    with pytest.raises(UserError, match="no such experiment folder"):
        make_app(ExperimentPaths(tmp_path / "nope"), sampler=FixedSampler(0.0))


async def test_midrun_shows_one_pane_per_arm_with_progress_eta_and_device(tmp_path: Path) -> None:
    app = fixture_app("seed-midrun", tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        panes = list(app.query(ArmPane))
        assert [p.arm_name for p in panes] == ["conservative", "aggressive"]
        text = screen_text(app)
        assert "1 conservative" in text and "2 aggressive" in text
        assert "GPU 0 · training · pid 48210 · baseline" in text
        assert "400/879 steps" in text and "400/1,758 steps" in text and "233/879 steps" in text
        assert "ETA 09:09 (in 4m 46s)" in text  # 479 steps x 0.6 s from 09:04:30 UTC
        assert "lr 1.0e-04  r 8  alpha 16" in text and "lr 1.5e-04  r 12  alpha 24" in text
        last = last_step(app.exp, "conservative")
        assert f"loss {last['loss']:.4f}" in text and f"{last['tokens_per_s']:,.0f} tokens/s" in text
        assert "util 94%" in text and "mem 20.0/24.0 GiB (arm 18.0 GiB)" in text and "°C" in text
        assert "step" in text and "loss" in text  # the chart's axis labels
        assert sorted(app.sampler.pids) == [48210, 48211]


async def test_a_cpu_arm_shows_its_process_and_the_machine(tmp_path: Path) -> None:
    exp = copy_fixture("seed-midrun", tmp_path)
    events = exp.arm("aggressive").events
    lines = events.read_text().splitlines()
    first = json.loads(lines[0])
    first.update(device="cpu", pid=os.getpid())
    events.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    for path in (exp.arm("aggressive").profile_json, exp.experiment_json):  # the profile says CPU too
        data = json.loads(path.read_text())
        for profile in data.get("arms", [data]):
            if profile["name"] == "aggressive":
                profile["device"] = None
        path.write_text(json.dumps(data))
    app = make_app(exp, clock=lambda: CLOCKS["seed-midrun"],
                   sampler=FixedSampler(CLOCKS["seed-midrun"], cpu_pids=(os.getpid(),)))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        text = screen_text(app)
        assert "CPU · training" in text
        assert "CPU  arm 252% (100% = 1 core)" in text
        assert "arm RSS 1.5 GiB · machine 41% CPU, RAM 12.0/32.0 GiB" in text


# ---------------------------------------------------------------- focus and keys


async def test_number_keys_and_tab_focus_arms(tmp_path: Path) -> None:
    app = fixture_app("seed-midrun", tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        assert app.focused_arm().name == "conservative"
        await pilot.press("2")
        assert isinstance(app.focused, ArmPane) and app.focused.arm_name == "aggressive"
        assert app.focused_arm().name == "aggressive"
        await pilot.press("tab")
        assert app.focused_arm().name == "conservative"
        await pilot.press("3")
        assert _in_toast(app, "There is no arm 3: this experiment has 2.")


async def test_stop_asks_first_and_confirm_writes_a_stop_request(tmp_path: Path) -> None:
    app = fixture_app("seed-midrun", tmp_path)
    exp = app.exp
    pretend_alive(exp, "aggressive")
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("2", "s")
        assert isinstance(app.screen, ConfirmScreen)
        assert "Stop aggressive at step 233 of 879?" in screen_text(app)
        await pilot.press("y")
        await wait_until(pilot, lambda: requests(exp, "aggressive"), "a stop request")
        [request] = requests(exp, "aggressive")
        assert (request.action, request.by) == ("stop", "ui")
        assert requests(exp, "conservative") == []
        await wait_until(pilot, lambda: _in_toast(app, "Stop requested for aggressive"), "the launcher's answer")


async def test_stop_cancelled_writes_nothing(tmp_path: Path) -> None:
    app = fixture_app("seed-midrun", tmp_path)
    pretend_alive(app.exp, "conservative")
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("s")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)
        assert requests(app.exp, "conservative") == []
        assert _in_toast(app, "Stop cancelled; nothing was changed.")


async def test_extend_shows_new_end_eta_and_lr_plan_then_requests_one_epoch(tmp_path: Path) -> None:
    app = fixture_app("seed-midrun", tmp_path)
    pretend_alive(app.exp, "conservative")
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("e")
        assert isinstance(app.screen, ConfirmScreen)
        text = screen_text(app)
        assert "Extend conservative by 1 epoch (879 steps)?" in text
        assert "end step:   1,758 → 2,637" in text
        assert "new end ETA: 09:26 (in 22m)" in text  # 2,237 steps x 0.6 s from 09:04:30
        assert "LR plan:    linear decay goes on from the current 7.95e-05" in text
        await pilot.press("y")
        await wait_until(pilot, lambda: requests(app.exp, "conservative"), "an extend request")
        [request] = requests(app.exp, "conservative")
        assert (request.action, request.epochs, request.by) == ("extend", 1, "ui")


async def test_extend_cancelled_writes_nothing(tmp_path: Path) -> None:
    app = fixture_app("seed-midrun", tmp_path)
    pretend_alive(app.exp, "conservative")
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("e", "escape")
        await pilot.pause()
        assert requests(app.exp, "conservative") == []


async def test_validate_now_requests_a_validation(tmp_path: Path) -> None:
    app = fixture_app("seed-midrun", tmp_path)
    pretend_alive(app.exp, "conservative")
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("v")
        await wait_until(pilot, lambda: requests(app.exp, "conservative"), "a validate request")
        assert requests(app.exp, "conservative")[0].action == "validate"


@pytest.mark.parametrize(
    "fixture, keys, expected",
    [
        ("seed-verdict", ("2", "s"), "Cannot stop: aggressive is finished. Press e to train it one more epoch."),
        ("seed-verdict", ("2", "R"), "aggressive finished its schedule; nothing to resume."),
        ("seed-verdict", ("2", "v"), "Cannot validate now (that needs its trainer running): aggressive is finished."),
        ("seed-midrun", ("R",), "conservative is already running (training); nothing to resume."),
        ("seed-midrun", ("a",), "No verdict yet: it forms when every arm has its milestone validation"),
        ("crashed", ("e",), "Cannot extend conservative: it crashed. Press R to resume it first"),
        ("crashed", ("2", "s"), "Cannot stop: aggressive is crashed. Press R to resume it."),
    ],
)
async def test_keys_that_do_not_apply_say_why(tmp_path: Path, fixture: str, keys: tuple[str, ...],
                                              expected: str) -> None:
    app = fixture_app(fixture, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press(*keys)
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)
        assert _in_toast(app, expected), [n.message for n in app._notifications]
        assert list(app.exp.root.rglob("control")) == []


async def test_a_launcher_refusal_becomes_a_visible_notification(tmp_path: Path) -> None:
    app = fixture_app("crashed", tmp_path)
    app.exp.arm("conservative").profile_json.unlink()  # resume cannot read what to restart
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("R")
        await wait_until(pilot, lambda: _in_toast(app, "cannot read the arm's resolved profile"), "the refusal")
        [note] = [n for n in app._notifications if "resolved profile" in n.message]
        assert note.severity == "warning" and "hint:" in note.message


async def test_help_lists_every_key(tmp_path: Path) -> None:
    app = fixture_app("seed-midrun", tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        text = screen_text(app)
        for key, _ in KEY_HELP:
            assert f" {key} " in text
        assert "training continues" in text
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


# ---------------------------------------------------------------- crashed arms, log view, verdict


async def test_crashed_arms_show_exit_code_and_last_stderr_lines_without_asking(tmp_path: Path) -> None:
    app = fixture_app("crashed", tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        text = screen_text(app)
        assert "crashed at step 312 · exit code 1" in text
        assert "OutOfMemoryError: CUDA out of memory." in text
        assert "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.20 GiB" in text
        assert "crashed at step 145 · exit code -9 (killed by signal 9 (SIGKILL))" in text
        assert "gputwin.supervise: trainer 48211 ended: killed by signal 9 (SIGKILL)" in text
        assert "no verdict: conservative, aggressive ended without a validation" in text


async def test_log_view_toggles_the_focused_arms_stderr(tmp_path: Path) -> None:
    app = fixture_app("crashed", tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        log = app.query_one(LogView)
        assert not log.display
        await pilot.press("l")
        await wait_until(pilot, lambda: log.line_count >= 5, "the stderr tail")
        assert log.display
        assert "loss.backward()" in "\n".join(log.lines)
        await pilot.press("2")
        await wait_until(pilot, lambda: "trainer 48211" in "\n".join(log.lines), "the other arm's stderr")
        await pilot.press("l")
        assert not log.display


async def test_verdict_pane_shows_scores_with_intervals_scenario_and_actions(tmp_path: Path) -> None:
    app = fixture_app("seed-verdict", tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        text = screen_text(app)
        assert "verdict: scenario A" in text
        assert "A: aggressive is clearly better" in text
        assert "[low, high] = 95% interval" in text
        assert "91.5% [" in text and "89.7% [" in text
        assert "recommended: stop conservative · extend aggressive by 1 epoch" in text
        assert "press a to apply" in text
        assert "milestone validated at step 879: F1 87.7%" in text
        assert "milestone validated at step 879: F1 83.8%" in text


async def test_apply_lists_the_actions_and_confirm_carries_them_out(tmp_path: Path) -> None:
    app = fixture_app("seed-verdict", tmp_path)
    for arm in ("conservative", "aggressive"):
        pretend_alive(app.exp, arm)  # so extend is a request, not a restart
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("a")
        assert isinstance(app.screen, ConfirmScreen)
        text = screen_text(app)
        assert "• stop conservative" in text and "• extend aggressive by 1 epoch" in text
        await pilot.press("y")
        await wait_until(pilot, lambda: requests(app.exp, "aggressive"), "the extend request")
        assert [r.action for r in requests(app.exp, "conservative")] == ["stop"]
        assert [(r.action, r.epochs) for r in requests(app.exp, "aggressive")] == [("extend", 1)]
        await wait_until(pilot, lambda: "(applied)" in screen_text(app), "the verdict pane to say so")


async def test_on_verdict_apply_carries_out_the_actions_once(tmp_path: Path) -> None:
    exp = copy_fixture("seed-verdict", tmp_path)
    data = json.loads(exp.experiment_json.read_text())
    data["rules"]["on_verdict"] = "apply"
    exp.experiment_json.write_text(json.dumps(data))
    for arm in ("conservative", "aggressive"):
        pretend_alive(exp, arm)
    clock = CLOCKS["seed-verdict"]
    app = make_app(exp, clock=lambda: clock, sampler=FixedSampler(clock))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await wait_until(pilot, lambda: requests(exp, "aggressive"), "the automatic extend")
        await wait_until(pilot, lambda: _in_toast(app, "Applied the verdict automatically"), "the notice")
        await wait_until(pilot, lambda: "(by auto)" in screen_text(app), "the verdict pane to list it")
    assert len(requests(exp, "conservative")) == 1
    again = make_app(exp, clock=lambda: clock, sampler=FixedSampler(clock))
    async with again.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await wait_until(pilot, lambda: _in_toast(again, "were already taken (by auto)"), "the refusal to repeat")
    assert len(requests(exp, "conservative")) == 1 and len(requests(exp, "aggressive")) == 1


async def test_report_key_writes_the_comparison(tmp_path: Path) -> None:
    app = fixture_app("seed-verdict", tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("r")
        await wait_until(pilot, lambda: _in_toast(app, "Report written"), "the report")
    assert app.exp.comparison.is_file() and app.exp.verdict.is_file()


# ---------------------------------------------------------------- live updates


async def test_appended_events_update_the_screen_and_a_validation_rings(tmp_path: Path) -> None:
    app = fixture_app("seed-midrun", tmp_path)
    bells: list[int] = []
    app.bell = lambda: bells.append(1)  # type: ignore[method-assign]
    t = CLOCKS["seed-midrun"]
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        assert "233/879 steps" in screen_text(app)
        append_events(app.exp, "aggressive",
                      make("step", t=t, step=234, epoch=0.2662, loss=0.3141, lr=1.167e-4, grad_norm=0.5,
                           tokens_per_s=1650.0))
        await wait_until(pilot, lambda: "234/879 steps" in screen_text(app), "the new step")
        assert "loss 0.3141" in screen_text(app)
        assert bells == []
        append_events(app.exp, "aggressive",
                      make("validation", t=t + 1, step=234, precision=0.7, recall=0.6, f1=0.646))
        await wait_until(pilot, lambda: bells, "the bell")
        assert _in_toast(app, "aggressive validated at step 234: precision 70.0%, recall 60.0%, F1 64.6%")
        await wait_until(pilot, lambda: "validated at step 234" in screen_text(app), "the verdict pane")


async def test_the_dashboard_keeps_updating_under_a_dialog_and_its_keys_wait(tmp_path: Path) -> None:
    app = fixture_app("seed-midrun", tmp_path)
    t = CLOCKS["seed-midrun"]
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("2", "e")
        assert isinstance(app.screen, ConfirmScreen)
        append_events(app.exp, "aggressive",
                      make("step", t=t, step=234, epoch=0.2662, loss=0.3141, lr=1.167e-4))
        [pane] = [p for p in app.screen_stack[0].query(ArmPane) if p.arm_name == "aggressive"]
        end = pane.query_one(".end-progress", StepProgress)
        await wait_until(pilot, lambda: end.done == 234, "the pane under the dialog to update")
        await pilot.press("s")  # a dashboard key while the dialog is open: nothing happens
        assert len(app.screen_stack) == 2


async def test_the_loss_chart_redraws_new_steps_at_most_every_few_seconds_but_a_validation_at_once() -> None:
    from textual.app import App, ComposeResult

    from gputwin.faces.widgets import loss_chart
    from gputwin.faces.widgets.loss_chart import LossChart, LossSeries

    class ChartApp(App[None]):
        def compose(self) -> ComposeResult:
            yield LossChart(id="chart")

    def series(n: int, validations: list[tuple[int, float]] | None = None) -> LossSeries:
        steps = list(range(1, n + 1))
        return LossSeries(steps=steps, raw=[1.0 / s for s in steps], smoothed=[1.0 / s for s in steps],
                          validations=validations or [])

    app = ChartApp()
    async with app.run_test(size=(80, 24)) as pilot:
        chart = app.query_one("#chart", LossChart)
        chart.show(series(10))  # the first curve: drawn at once
        first = chart._drawn_at
        chart.show(series(20))  # new steps right after: they wait
        assert chart._drawn_at == first and chart._timer is not None
        chart.show(series(21, [(21, 0.9)]))  # a validation: at once
        assert chart._drawn_at > first and chart._timer is None
        drawn = chart._drawn_at
        loss_chart_redraw, loss_chart.REDRAW_S = loss_chart.REDRAW_S, 0.2
        try:
            chart.show(series(30, [(21, 0.9)]))
            assert chart._drawn_at == drawn
            await pilot.pause(0.4)
            assert chart._drawn_at > drawn and chart.series.steps[-1] == 30  # the timer drew the waiting steps
        finally:
            loss_chart.REDRAW_S = loss_chart_redraw


async def test_a_key_typed_right_after_a_number_acts_on_that_arm(tmp_path: Path) -> None:
    app = fixture_app("seed-midrun", tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("1")
        await pilot.pause()
        # Typed together ("2e"), the next key can arrive before the focus event: the number must aim at once.
        app.action_focus_arm(2)
        assert app.focused_arm().name == "aggressive"
        await pilot.press("e")
        assert isinstance(app.screen, ConfirmScreen)
        assert "Extend aggressive by 1 epoch" in screen_text(app)


# ---------------------------------------------------------------- the report kept in step with the verdict


async def test_the_report_is_written_when_the_verdict_forms_and_said_under_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the pane names the report relative to here
    app = fixture_app("seed-verdict", tmp_path)
    assert not app.exp.verdict.exists()
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        saved = json.loads(app.exp.verdict.read_text())
        assert saved["scenario"] == "A" and saved["written_at"] == CLOCKS["seed-verdict"]
        assert "A: aggressive is clearly better" in app.exp.comparison.read_text()
        assert "report seed-verdict/comparison.md, verdict.json: written 09:11:52" in screen_text(app)
        assert not app._notifications or not any("Report" in n.message for n in app._notifications)


async def test_attaching_again_leaves_a_current_report_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    app = fixture_app("seed-verdict", tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
    written = app.exp.verdict.stat().st_mtime_ns, app.exp.comparison.stat().st_mtime_ns
    later = CLOCKS["seed-verdict"] + 3600
    again = make_app(app.exp, clock=lambda: later, sampler=FixedSampler(later))
    async with again.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        assert "verdict.json: up to date, written 09:11:52" in screen_text(again)
    assert (app.exp.verdict.stat().st_mtime_ns, app.exp.comparison.stat().st_mtime_ns) == written


async def test_the_report_is_rewritten_when_the_verdict_changes(tmp_path: Path) -> None:
    app = fixture_app("seed-verdict", tmp_path)
    t = CLOCKS["seed-verdict"]
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        before = json.loads(app.exp.verdict.read_text())
        assert [a["kind"] for a in before["actions"]] == ["stop", "extend"]
        # The baseline stops by itself: nothing left to stop, so the verdict's actions change.
        append_events(app.exp, "conservative", make("stopped", t=t + 1, step=1065, by="cli"))
        await wait_until(pilot, lambda: app.reports >= 2, "the second report")
    after = json.loads(app.exp.verdict.read_text())
    assert [a["kind"] for a in after["actions"]] == ["extend"]
    assert "conservative has already ended (stopped); nothing to stop." in after["reasons"]


def test_keep_report_writes_only_what_verdict_json_does_not_hold(tmp_path: Path) -> None:
    from gputwin.faces import autoreport
    from gputwin.faces.report import verdict_for_experiment

    exp = copy_fixture("seed-verdict", tmp_path)
    verdict = verdict_for_experiment(exp, now=CLOCKS["seed-verdict"])
    first = autoreport.keep_report(exp, verdict, now=100.0)
    assert first.wrote and first.at == 100.0 and first.comparison == exp.comparison
    second = autoreport.keep_report(exp, verdict, now=200.0)
    assert not second.wrote and second.at == 100.0
    data = json.loads(exp.verdict.read_text())
    exp.verdict.write_text(json.dumps({**data, "headline": "an older verdict"}))
    assert autoreport.keep_report(exp, verdict, now=300.0).wrote
    exp.comparison.unlink()
    assert autoreport.keep_report(exp, verdict, now=400.0).wrote


# ---------------------------------------------------------------- notifications and small terminals


@pytest.mark.parametrize("size", [(160, 48), (100, 30), (80, 24)])
@pytest.mark.parametrize("log_open", [False, True])
async def test_notifications_never_cover_the_verdict(tmp_path: Path, size: tuple[int, int], log_open: bool) -> None:
    from textual.widgets._toast import Toast

    app = fixture_app("seed-verdict", tmp_path)
    async with app.run_test(size=size, notifications=True) as pilot:
        await loaded(pilot)
        if log_open:
            await pilot.press("l")  # the verdict moves up and gives up rows
        await pilot.pause(0.2)
        for n in range(4):  # a pile of them, long ones too
            app.notify(f"notification {n}: " + "a long message that wraps over several lines " * 3, timeout=30)
        await wait_until(pilot, lambda: len(app.screen.query(Toast)) == 4, "the toasts")
        await pilot.pause(0.2)
        screen = app.screen

        def on_top(region: Any) -> set[str]:
            """What is drawn topmost in each cell of the region."""
            return {type(screen.get_widget_at(x, y)[0]).__name__
                    for y in range(region.y, region.bottom) for x in range(region.x, region.right)}

        assert "Toast" not in on_top(app._verdict.region)
        assert "Toast" in on_top(app._arms.region)  # they do show: over the arm panes


async def test_at_80x24_each_pane_keeps_a_loss_trend_with_its_latest_value(tmp_path: Path) -> None:
    app = fixture_app("seed-verdict", tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        text = screen_text(app)
        assert "too small" not in text
        for arm in ("conservative", "aggressive"):
            last = last_step(app.exp, arm)
            assert re.search(rf"loss [▁▂▃▄▅▆▇█]{{20,}} {last['loss']:.4f} \(smoothed \d\.\d{{4}}\)", text), text
        assert "verdict: scenario A" in text and "A: aggressive is clearly better" in text


def test_the_trend_line_fits_its_width_and_says_when_there_is_nothing_yet() -> None:
    from rich.console import Console

    from gputwin.faces.widgets.loss_chart import LossSeries, trend_line

    def render(series: LossSeries, width: int) -> str:
        console = Console(width=width, file=io.StringIO(), color_system=None, legacy_windows=False)
        with console.capture() as captured:
            console.print(trend_line(series, width))
        return captured.get().rstrip("\n")

    assert render(LossSeries(), 40) == "loss: no steps yet"
    steps = list(range(1, 101))
    series = LossSeries(steps=steps, raw=[2.0 / s for s in steps], smoothed=[2.2 / s for s in steps])
    wide = render(series, 70)
    assert wide.startswith("loss ▇") and wide.endswith("0.0200 (smoothed 0.0220)") and len(wide) == 70
    assert "smoothed" not in render(series, 30) and render(series, 30).endswith(" 0.0200")
    assert render(series, 12) == "loss  0.0200"
