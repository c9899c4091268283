"""The terminal UI: one pane per arm, the verdict, keys that stop/extend/validate/resume arms.

The app only reads files (through ExperimentWatcher, in a worker thread) and asks the launcher to
act; it never writes control files itself. It keeps the report (comparison.md, verdict.json) in step
with the verdict it shows, as `--headless` does. Training runs in other processes, so quitting here
never stops it.
"""

from __future__ import annotations

import os
import threading
import time
from functools import partial
from typing import Any, Callable

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.events import DescendantFocus
from textual.widgets import Footer, Static
from textual.worker import Worker, WorkerState, get_current_worker

from . import autoreport
from ..control import launcher
from ..core.errors import UserError
from ..core.paths import ExperimentPaths
from ..core.state import ArmState, ExperimentState
from .widgets.arm_pane import ArmPane
from .widgets.device_panel import SamplerLike
from .widgets.feed import ExperimentFeed
from .widgets.layout import ArmsArea, grid_shape, verdict_max_rows
from .formatting import display_path
from .widgets.live_text import LiveText
from .widgets.log_view import LogView
from .widgets.messages import LogTailRead, StateUpdated
from .widgets.modals import KEY_HELP, ConfirmScreen, HelpScreen
from .widgets.prompts import apply_prompt, extend_prompt, stop_prompt, why_not
from .widgets.verdict_pane import VerdictPane

POLL_S = 0.3  # how often the watcher reads the files (the screen updates only when they changed)
UPDATE_S = 1.0  # at most one screen update a second: a redraw costs tens of ms of CPU, and arms that log
                # 50 steps/s would otherwise repaint 3 times a second for figures nobody reads that fast
DEVICE_S = 1.0  # device panels follow the sampler's 1 Hz
TERMINAL_CHECK_S = 1.0  # how often the UI looks whether its terminal is still there
VERDICT_NOTICE_S = 8.0  # the verdict's toast: the verdict pane says the same, for good
ATTACHED_NOTICE_S = 15.0
DASHBOARD_ACTIONS = frozenset({"stop", "extend", "validate", "apply", "report", "toggle_log", "resume", "help",
                               "focus_arm"})
BY = "ui"  # who asked, as recorded in control files and actions.jsonl
TOAST_RACK = "#textual-toastrack"  # Textual's container of notifications on each screen


class GputwinApp(App[None]):
    """Watches one experiment folder."""

    TITLE = "gputwin"
    ENABLE_COMMAND_PALETTE = False  # every action has its own key; ? lists them
    CSS_PATH = "widgets/gputwin.tcss"
    BINDINGS = [
        Binding("s", "stop", "Stop"),
        Binding("e", "extend", "Extend"),
        Binding("v", "validate", "Validate"),
        Binding("a", "apply", "Apply"),
        Binding("r", "report", "Report"),
        Binding("l", "toggle_log", "Log"),
        Binding("R", "resume", "Resume"),
        Binding("tab", "focus_next", "Next arm", show=False),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Detach"),
        *(Binding(str(n), f"focus_arm({n})", f"Focus arm {n}", show=False) for n in range(1, 10)),
    ]

    def __init__(self, exp: ExperimentPaths, *, clock: Callable[[], float] = time.time,
                 sampler: SamplerLike | None = None, own_sampler: bool = False, note: str | None = None) -> None:
        super().__init__()
        self.exp = exp
        self.note = note  # said on opening: e.g. that this attached to an experiment already running
        self.clock = clock
        self.sampler = sampler
        self._own_sampler = own_sampler
        self.state: ExperimentState | None = None  # the UI thread's copy; replaced on every update
        self.updates = 0  # state updates shown so far (tests wait on it)
        self.reports = 0  # reports kept (written, or found current) so far
        self.applied: list[str] = []  # verdict actions taken, as lines for the verdict pane
        self._focused_arm: str | None = None
        self._log_arm: str | None = None  # read by the watch thread: whose stderr to tail
        self._update_pending = threading.Event()  # an update is posted and not yet shown
        self._stop_polling = threading.Event()
        self._auto_started = False
        self._sampler_failure_shown = False
        self._updated_at = float("-inf")  # time.monotonic() of the last state update shown
        self._reported: str | None = None  # autoreport.signature of the last verdict the report was kept for
        self.terminal_gone = False  # the UI ended because its terminal went away (nothing left to print to)
        self._terminal_fds: tuple[int, ...] = ()
        # The dashboard's widgets, held: a query from the app searches the active screen, which is a
        # dialog while one is open, and the dashboard must keep updating under it.
        self._top = LiveText(f"gputwin · {exp.name} · {display_path(exp.root)}", id="top-bar")
        self._arms = ArmsArea(Static(f"Reading {display_path(exp.root)} …", id="loading"), id="arms")
        self._panes: list[ArmPane] = []
        self._verdict = VerdictPane(id="verdict", can_focus=False)
        self._log = LogView(id="log")

    # ------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield self._top
        yield self._arms
        yield self._verdict
        yield self._log
        yield Footer()

    def on_mount(self) -> None:
        self._log.can_focus = False
        if self._own_sampler and self.sampler is not None:
            self.sampler.start()  # type: ignore[attr-defined]
        self.watch_files()
        self.set_interval(DEVICE_S, self._tick_devices)
        self._terminal_fds = tuple(fd for fd in (0, 1, 2) if os.isatty(fd))
        if self._terminal_fds:
            self.set_interval(TERMINAL_CHECK_S, self._check_terminal)
        if self.note:
            self.notify(self.note, title="Attached to a running experiment", timeout=ATTACHED_NOTICE_S)

    def _check_terminal(self) -> None:
        """End when the terminal has gone (a closed SSH connection or tmux pane: a hung-up terminal is no longer a
        terminal). SIGHUP does not always say so: started through make, as `make demo` starts it, the UI gets
        none, since make takes the signal and waits for its child. Training goes on, as after `q`."""
        if not all(os.isatty(fd) for fd in self._terminal_fds):
            self.terminal_gone = True
            self.exit()

    def on_unmount(self) -> None:
        self._stop_polling.set()
        if self._own_sampler and self.sampler is not None:
            self.sampler.stop()  # type: ignore[attr-defined]

    def on_resize(self) -> None:
        self._arrange()

    def _arrange(self) -> None:
        columns, rows = grid_shape(len(self._panes), self.size.width)
        self._arms.styles.grid_size_columns = columns
        self._arms.styles.grid_size_rows = rows
        self._verdict.styles.max_height = verdict_max_rows(self.size.height, rows, self._log.has_class("-shown"))

    def fit_notifications(self) -> None:
        """Keep the dashboard's notifications over the arm panes, centred on their height, where the loss
        charts are: the verdict's reasons stay readable while a notification shows."""
        try:
            rack = self.screen_stack[0].query_one(TOAST_RACK)
        except NoMatches:  # notifications disabled, or the screen is going away: nothing to fit
            return
        region = self._arms.region
        if region.height:
            rack.styles.margin = (region.y, 0, 0, 0)
            rack.styles.height = region.height

    # ------------------------------------------------------------ reading the files (worker thread)

    @work(thread=True, exclusive=True, exit_on_error=False, group="watch", name="watch experiment")
    def watch_files(self) -> None:
        """Poll the files; post a copy of the state when something changed, the last one was shown
        (so a slow screen never queues a backlog of stale states) and UPDATE_S has passed since it,
        or at once for news (a stop, a validation, an extension: feed.news())."""
        worker = get_current_worker()
        feed = ExperimentFeed(self.exp, self.clock)
        changed: set[str] = set()
        first = True
        posted = 0.0  # time.monotonic() of the last post
        shown = None  # feed.news() as of the last post
        while not worker.is_cancelled and not self._stop_polling.is_set():
            changed |= feed.poll()
            news = feed.news()
            due = first or news != shown or time.monotonic() - posted >= UPDATE_S
            if (changed or first) and due and not self._update_pending.is_set():
                self._update_pending.set()
                state, applied = feed.snapshot()
                self.post_message(StateUpdated(state, frozenset(changed), applied))
                changed, first, posted, shown = set(), False, time.monotonic(), news
            arm = self._log_arm
            tail = feed.stderr_tail(arm)
            if arm is not None and tail is not None:
                self.post_message(LogTailRead(arm, *tail))
            self._stop_polling.wait(POLL_S)

    # ------------------------------------------------------------ showing the state

    async def on_state_updated(self, message: StateUpdated) -> None:
        previous, state = self.state, message.state
        self.state = state
        self.applied = message.applied or self.applied
        await self._ensure_panes(state)
        now = self.clock()
        with self.batch_update():
            for pane in self._panes:
                arm = state.arms.get(pane.arm_name)
                if arm is not None:
                    pane.show_arm(arm, now, state.differing_keys, state.baseline)
            self._show_verdict()
        self._keep_report(state)
        if self.sampler is not None:
            self.sampler.set_pids(a.pid for a in state.arms.values() if a.pid is not None and not a.ended)
        if previous is not None:
            self._announce(previous, state)
        if state.problems and (previous is None or previous.problems != state.problems):
            self.notify("\n".join(state.problems), title="Reading the experiment", severity="warning", timeout=15)
        self._maybe_apply_automatically(state)
        self.updates += 1
        self._update_pending.clear()
        self.refresh_devices()
        self._updated_at = time.monotonic()

    async def _ensure_panes(self, state: ExperimentState) -> None:
        shown = {pane.arm_name for pane in self._panes}
        new = [ArmPane(name, len(shown) + i + 1, self.exp.root)
               for i, name in enumerate(n for n in state.arms if n not in shown)]
        if not new:
            return
        if not self._panes:
            await self._arms.remove_children()  # the "Reading ..." line
        self._panes += new
        await self._arms.mount_all(new)
        self._arrange()
        if self._focused_arm is None:
            self.call_after_refresh(self.action_focus_arm, 1)

    def _show_verdict(self) -> None:
        if self.state is None:
            return
        rules = self.state.rules
        auto = rules is not None and rules.on_verdict == "apply"
        self._verdict.show_state(self.state, self.clock(), self.applied, auto)
        attached = " · attached (it was running)" if self.note else ""
        if rules is not None:
            self._top.show(
                f"gputwin · {self.state.name}{attached} · baseline {rules.baseline} · on verdict: {rules.on_verdict}"
                f" · {display_path(self.exp.root)}")

    def _keep_report(self, state: ExperimentState) -> None:
        """Write comparison.md and verdict.json when the verdict forms or changes (a thread: the report
        folds the logs again and runs the bootstrap)."""
        verdict = state.verdict
        if verdict is None or verdict.scenario == "waiting":
            return
        key = autoreport.signature(verdict)
        if key == self._reported:
            return
        self._reported = key
        self.run_worker(partial(autoreport.keep_report, self.exp, verdict, now=self.clock()),
                        name="write the report", group="report", thread=True, exit_on_error=False)

    def _announce(self, before: ExperimentState, after: ExperimentState) -> None:
        """Bell and a notification for each new validation and for the verdict when it forms."""
        for name, arm in after.arms.items():
            old = before.arms.get(name)
            for point in arm.validations[len(old.validations) if old else 0:]:
                self.bell()
                self.notify(f"{name} validated at step {point.step:,}: precision {point.precision:.1%}, "
                            f"recall {point.recall:.1%}, F1 {point.f1:.1%}", title="Validation")
        if after.verdict is not None and before.verdict is None:
            self.bell()
            self.notify(after.verdict.headline, title="Verdict", timeout=VERDICT_NOTICE_S)

    def on_log_tail_read(self, message: LogTailRead) -> None:
        if message.arm == self._log_arm:
            self._log.show_tail(message.arm, message.path, message.lines)

    def _tick_devices(self) -> None:
        """The device panels' own clock, for when no state update comes. While arms log, every update
        refreshes the panels in its own screen pass; a second pass a second would cost as much CPU."""
        if time.monotonic() - self._updated_at >= UPDATE_S + 2 * POLL_S:
            self.refresh_devices()

    def refresh_devices(self) -> None:
        """Copy the sampler's latest readings into each pane's device panel."""
        if self.sampler is None or self.state is None:
            return
        failure = getattr(self.sampler, "failure", None)
        if failure is not None and not self._sampler_failure_shown:
            self._sampler_failure_shown = True
            self.notify(f"GPU/CPU sampling stopped: {failure!r}", severity="error", timeout=30)
        gpus, cpus = self.sampler.latest_gpus(), self.sampler.latest_cpus()
        for pane in self._panes:
            arm = self.state.arms.get(pane.arm_name)
            if arm is not None:
                pane.device_panel.show_for(arm, self.sampler, gpus, cpus)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Dashboard keys do nothing while a dialog or the help is open over it."""
        if action in DASHBOARD_ACTIONS and len(self.screen_stack) > 1:
            return False
        return True

    # ------------------------------------------------------------ focus

    def on_descendant_focus(self, event: DescendantFocus) -> None:
        if isinstance(event.widget, ArmPane):
            self._aim_at(event.widget.arm_name)

    def _aim_at(self, arm: str) -> None:
        """The arm the keys act on from now (the log view follows it)."""
        self._focused_arm = arm
        if self._log_arm is not None:
            self._log_arm = arm

    def action_focus_arm(self, number: int) -> None:
        panes = self._panes
        if not panes:
            self.notify("No arms yet: the experiment folder has none.", severity="warning")
        elif number > len(panes):
            self.notify(f"There is no arm {number}: this experiment has {len(panes)}.", severity="warning")
        else:
            # Aim at once: the focus event comes later, after a key typed right behind this one ("2e").
            self._aim_at(panes[number - 1].arm_name)
            panes[number - 1].focus()

    def focused_arm(self) -> ArmState | None:
        """The arm the keys act on: the focused pane's (the first arm before any focus)."""
        if self.state is None or not self.state.arms:
            return None
        name = self._focused_arm if self._focused_arm in self.state.arms else next(iter(self.state.arms))
        return self.state.arms[name]

    # ------------------------------------------------------------ keys

    def _arm_or_say(self) -> ArmState | None:
        arm = self.focused_arm()
        if arm is None:
            self.notify("No arm to act on yet: the experiment's files are still being read.", severity="warning")
        return arm

    def _refuse(self, arm: ArmState, action: str) -> bool:
        """Say why `action` does not apply to `arm` now; True when it does not."""
        reason = why_not(arm, action)
        if reason:
            self.notify(reason, title=f"{action}: not now", severity="warning")
        return reason is not None

    def action_stop(self) -> None:
        arm = self._arm_or_say()
        if arm is None or self._refuse(arm, "stop"):
            return
        name = arm.name
        self._confirm(stop_prompt(arm), "Stop", lambda: launcher.request_stop(self.exp, name, by=BY))

    def action_extend(self) -> None:
        arm = self._arm_or_say()
        if arm is None or self._refuse(arm, "extend"):
            return
        name = arm.name
        extend_lr = self.state.rules.extend_lr if self.state.rules is not None else 0.5
        self._confirm(extend_prompt(arm, self.clock(), extend_lr=extend_lr), "Extend",
                      lambda: launcher.request_extend(self.exp, name, 1, by=BY))

    def action_validate(self) -> None:
        arm = self._arm_or_say()
        if arm is None or self._refuse(arm, "validate"):
            return
        name = arm.name
        self.run_control(lambda: launcher.request_validate(self.exp, name, by=BY), "validate")

    def action_resume(self) -> None:
        arm = self._arm_or_say()
        if arm is None or self._refuse(arm, "resume"):
            return
        name = arm.name
        self.run_control(lambda: launcher.resume_arm(self.exp, name, by=BY), "resume")

    def action_apply(self) -> None:
        verdict = self.state.verdict if self.state is not None else None
        if verdict is None or verdict.scenario == "waiting":
            waiting = [a.name for a in self.state.arms.values() if not a.validations] if self.state else []
            self.notify("No verdict yet: it forms when every arm has its milestone validation"
                        + (f" (waiting for {', '.join(waiting)})." if waiting else "."),
                        title="apply: not now", severity="warning")
            return
        if not launcher.changing_actions(verdict):
            self.notify(f"The verdict recommends no stop or extend ({verdict.headline}).",
                        title="apply: nothing to do", severity="warning")
            return
        self._confirm(apply_prompt(verdict, self.applied), "Apply", lambda: self._apply_actions(verdict, BY))

    def _apply_actions(self, verdict: Any, by: str) -> str:
        messages = launcher.apply_actions(self.exp, verdict, by=by)
        return "\n".join(messages)

    def action_report(self) -> None:
        def write() -> str:
            from .report import write_report

            written = write_report(self.exp.root)
            names = written if isinstance(written, (list, tuple)) else [written] if written else []
            return "Report written: " + (", ".join(str(p) for p in names) or str(self.exp.comparison))

        self.run_control(write, "report")

    def action_toggle_log(self) -> None:
        log = self._log
        shown = not log.has_class("-shown")
        arm = self.focused_arm() if shown else None
        if shown and arm is None:
            self.notify("No arm to show the log of yet.", severity="warning")
            return
        log.set_class(shown, "-shown")
        self._verdict.set_class(shown, "-beside-log")
        self._log_arm = arm.name if arm is not None else None
        self._arrange()

    def action_help(self) -> None:
        self.push_screen(HelpScreen(KEY_HELP))

    def _confirm(self, prompt: tuple[str, Any], label: str, act: Callable[[], str]) -> None:
        title, body = prompt

        def done(confirmed: bool | None) -> None:
            if confirmed:
                self.run_control(act, label.lower())
            else:
                self.notify(f"{label} cancelled; nothing was changed.")

        self.push_screen(ConfirmScreen(title, body, label), done)

    # ------------------------------------------------------------ acting (worker threads)

    def run_control(self, act: Callable[[], str], what: str) -> Worker[str]:
        """Launcher calls read and write files and may start a process: never on the UI thread."""
        return self.run_worker(act, name=what, group="control", thread=True, exit_on_error=False)

    def _maybe_apply_automatically(self, state: ExperimentState) -> None:
        """rules.on_verdict = "apply": carry out the verdict's actions once (across re-attaches too)."""
        verdict, rules = state.verdict, state.rules
        if self._auto_started or verdict is None or rules is None or rules.on_verdict != "apply":
            return
        if verdict.scenario == "waiting" or not launcher.changing_actions(verdict):
            return
        self._auto_started = True

        def apply_once() -> str:
            applied, lines = launcher.apply_verdict_once(self.exp, verdict)
            head = ["Applied the verdict automatically (rules.on_verdict = \"apply\"):"] if applied else []
            return "\n".join(head + lines)

        self.run_control(apply_once, "apply automatically")

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """One place where every worker's outcome becomes visible."""
        worker = event.worker
        if event.state == WorkerState.SUCCESS and worker.group == "control" and worker.result:
            self.notify(str(worker.result), timeout=10)
        elif event.state == WorkerState.SUCCESS and worker.group == "report":
            self._verdict.show_report(worker.result)
            self.reports += 1
        elif event.state == WorkerState.ERROR:
            error = worker.error
            if isinstance(error, UserError):
                self.notify(error.message + (f"\nhint: {error.hint}" if error.hint else ""),
                            title="Not done", severity="warning", timeout=15)
            else:
                what = "reading the experiment stopped" if worker.group == "watch" else f"{worker.name} failed"
                self.notify(f"{what}: {type(error).__name__}: {error}", title="Error", severity="error", timeout=60)


def make_app(exp: ExperimentPaths, *, clock: Callable[[], float] = time.time,
             sampler: SamplerLike | None = None, note: str | None = None) -> GputwinApp:
    """The one way to build the UI (CLI and tests). Without a sampler, a real one (NVML or psutil) runs.
    `note` is said when the UI opens (attaching to an experiment that was already running)."""
    if not exp.root.is_dir():
        raise UserError(f"{exp.root}: no such experiment folder",
                        "`gputwin status` lists experiments; GPUTWIN_LOGS sets where they live")
    own = sampler is None
    if sampler is None:
        from ..reading.gpu import Sampler

        sampler = Sampler(clock=clock)
    return GputwinApp(exp, clock=clock, sampler=sampler, own_sampler=own, note=note)
