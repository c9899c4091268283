"""One arm's pane: who it is, how far it got, its loss curve, its latest figures and its device."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical

from ...core.state import ArmState, ValidationPoint
from ...core.eta import eta, human_duration
from ...core.state import STATUSES
from ...core.lifecycle import describe_exit
from .device_panel import DevicePanel
from ..formatting import device_label, num, percent, rate, sci, shorten_paths, shown_hparams, status_style, status_text
from .live_text import LiveText
from .loss_chart import LossChart, LossSeries
from .progress import StepProgress

CRASH_LINES = 6  # stderr lines shown in a crashed arm's pane (the log view, l, shows more)
WATCHER_ERRORS = ("exited", "killed", "gone")  # failures the watcher inferred; its message says it all


def eta_text(arm: ArmState, target: int | None, now: float) -> str:
    """ "ETA 14:52 (in 20m 03s)" toward `target`, or why there is none."""
    if target is None:
        return ""
    if arm.step >= target:
        return "reached"
    if arm.ended:
        return ""  # the header says why it will not get there
    estimate = eta(arm, target, now)
    if estimate is None:
        return "ETA: measuring step time"
    return f"ETA {estimate.clock} (in {estimate.human})"


def milestone_validation(arm: ArmState) -> ValidationPoint | None:
    """The validation taken at the milestone step, if there is one yet."""
    return arm.validation_at(arm.milestone_step) if arm.milestone_step is not None else None


def milestone_text(arm: ArmState, now: float) -> str:
    point = milestone_validation(arm)
    if point is not None:
        return f"validated at step {point.step:,}: F1 {percent(point.f1)}"
    if arm.status == "validating":
        return "validating now"
    return eta_text(arm, arm.milestone_step, now)


def header_text(arm: ArmState, now: float, baseline: str | None) -> Text:
    """Device, status in its colour, pid, the arms sharing its process, and role."""
    device = f"GPU {arm.gpu_index}" if arm.gpu_index is not None else device_label(arm.device)
    if arm.node is not None:
        device += f" on {arm.node}"
    text = Text.assemble((device, "bold"), " · ", (status_text(arm), status_style(arm.status)))
    if arm.status == "stalled" and arm.last_step_t is not None:
        text.append(f" (no step for {human_duration(now - arm.last_step_t)})", style="yellow")
    if arm.pid is not None and not arm.ended:
        text.append(f" · pid {arm.pid}")
    if arm.shares_process_with and not arm.ended:  # one process, one base model: see [placement] cotrain
        text.append(f" · co-trained with {', '.join(arm.shares_process_with)}", style="cyan")
    if arm.name == baseline:
        text.append(" · baseline", style="italic")
    return text


def hparams_text(arm: ArmState, differing: list[str]) -> Text:
    """The usual hyperparameters, and every key that differs between arms highlighted."""
    text = Text()
    for label, value, differs in shown_hparams(arm.hparams, differing):
        if text:
            text.append("  ")
        text.append(f"{label} {value}", style="bold yellow" if differs else "dim")
    return text


def stats_text(arm: ArmState) -> Text:
    """The latest step's figures, each with its name and unit."""
    text = Text.assemble(
        "loss ", (num(arm.loss), "bold"),
        f" (smoothed {num(arm.smoothed_loss)})",
        " · lr ", sci(arm.lr),
        "\ngrad norm ", num(arm.grad_norm, 2),
        " · ", rate(arm.tokens_per_s, "tokens/s"),
        " · epoch ", num(arm.epoch, 2),
    )
    if arm.bad_line_count:
        text.append(f" · {arm.bad_line_count} unreadable log line(s)", style="yellow")
    return text


def crash_text(arm: ArmState, root: Path) -> Text:
    """Why a crashed arm ended: exit code, the failure and the hint."""
    text = Text(f"crashed at step {arm.step:,}", style="bold red")
    text.overflow = "fold"
    if arm.exit_code is not None:
        text.append(f" · exit code {arm.exit_code}", style="bold red")
        if arm.exit_code < 0:
            text.append(f" ({describe_exit(arm.exit_code)})", style="bold red")
    failure = arm.failure
    if failure is not None:
        text.append(f"\n{failure.message}" if failure.error in WATCHER_ERRORS else f"\n{failure.error}: {failure.message}")
        if failure.hint:
            text.append(f"\nhint: {shorten_paths(failure.hint, root)}", style="italic")
    return text


def stderr_lines(arm: ArmState, lines: int = CRASH_LINES) -> Text:
    """The last lines of stderr.log, one screen line each (the log view, l, shows them whole)."""
    tail = arm.stderr_tail[-lines:]
    text = Text("stderr.log, last lines:" if tail else "stderr.log is empty", style="dim", no_wrap=True,
                overflow="ellipsis")
    for line in tail:
        text.append(f"\n{line}", style="bright_black" if line.startswith(" ") else "")
    return text


def loss_series(arm: ArmState) -> LossSeries:
    history = arm.loss_history
    return LossSeries(
        steps=list(history.steps),
        raw=list(history.raw),
        smoothed=list(history.smoothed),
        validations=[(v.step, v.f1) for v in arm.validations],
        milestone_step=arm.milestone_step,
    )


class ArmPane(Vertical, can_focus=True):
    """Focusable: the keys s/e/v/R/l act on the focused pane's arm."""

    def __init__(self, arm_name: str, number: int, root: Path) -> None:
        super().__init__(id=f"arm-{number}", classes="arm-pane")
        self.arm_name = arm_name
        self.root = root  # the experiment folder, to shorten paths in messages
        self.number = number
        self.border_title = f"{number} {arm_name}"
        # Held rather than queried: an update may arrive while the pane is mounting or going away.
        self._head = LiveText(classes="arm-head")
        self._hparams = LiveText(classes="arm-hparams")
        self._milestone = StepProgress("milestone", classes="milestone-progress")
        self._end = StepProgress("end", classes="end-progress")
        self._crash_why = LiveText(classes="crash-why")
        self._crash_stderr = LiveText(classes="crash-stderr")
        self._crash = Vertical(self._crash_why, self._crash_stderr, classes="arm-crash")
        self._chart = LossChart(classes="loss-chart")
        self._stats = LiveText(classes="arm-stats")
        self._device = DevicePanel(classes="device-panel")

    def compose(self) -> ComposeResult:
        yield self._head
        yield self._hparams
        yield self._milestone
        yield self._end
        yield self._crash
        yield self._chart
        yield self._stats
        yield self._device

    def show_arm(self, arm: ArmState, now: float, differing: list[str], baseline: str | None) -> None:
        """Redraw from one ArmState (a copy owned by the UI thread): only what changed repaints, since
        setting a border title repaints the whole pane even when it is the same."""
        with self.app.batch_update():
            for status in STATUSES:
                self.set_class(arm.status == status, f"-{status}")
            if self.border_subtitle != arm.status:
                self.border_subtitle = arm.status
            self._head.show(header_text(arm, now, baseline))
            if self._head.tooltip != arm.device:
                self._head.tooltip = arm.device
            self._hparams.show(hparams_text(arm, differing))
            self._milestone.show(arm.step, arm.milestone_step, milestone_text(arm, now),
                                 bar=milestone_validation(arm) is None)
            self._end.show(arm.step, arm.total_steps, eta_text(arm, arm.total_steps, now))
            crashed = arm.status == "crashed"
            self._crash.display = crashed
            if crashed:
                self._crash_why.show(crash_text(arm, self.root))
                self._crash_stderr.show(stderr_lines(arm))
            # A dead arm's last figures and an idle device matter less than why it died.
            self._stats.display = self._device.display = not crashed
            self._stats.show(stats_text(arm))
            self._chart.show(loss_series(arm))

    @property
    def device_panel(self) -> DevicePanel:
        return self._device
