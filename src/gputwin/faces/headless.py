"""`gputwin run --headless`: progress lines instead of the UI, for SSH sessions, CI and logs.

Prints one line per arm every ~10 s, each validation result as it arrives, then the verdict
(reasons and actions) with the report paths, and returns when every arm has ended: 0, or 3 when
an arm crashed or failed. The report is written once, when the verdict forms; with
``rules.on_verdict = "apply"`` the verdict's actions are carried out once (recorded in
actions.jsonl with by="auto", so a second monitor on the same experiment does not repeat them).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from ..core import eta as eta_mod
from ..core.errors import EXIT_ARM_CRASHED
from .formatting import status_text
from ..core.paths import ExperimentPaths
from ..core.profiles import Rules
from ..core.state import CRASHED
from ..control.supervise import arm_alive
from ..core.verdict import pct

PROGRESS_EVERY_S = 10.0
POLL_EVERY_S = 0.3  # as often as the UI reads the files: a verdict shows within 0.3 s
WAITING = "waiting"  # verdict.WAITING: an arm has not reached its milestone


def progress_line(arm: Any, now: float) -> str:
    """One arm's status: step/total, loss, ETA as a clock time, status."""
    total = arm.total_steps if arm.total_steps is not None else "?"
    loss = arm.smoothed_loss if arm.smoothed_loss is not None else arm.loss
    loss_text = f"loss {loss:.4f}" if isinstance(loss, float) else "loss -"
    parts = [f"{arm.name:<20}", f"{status_text(arm):<10}", f"step {arm.step}/{total}", loss_text]
    if not arm.ended:
        finish = eta_mod.eta(arm, arm.total_steps, now)
        parts.append(f"ETA {finish.clock} ({finish.human})" if finish else "ETA -")
        if arm.milestone_step and arm.step < arm.milestone_step < (arm.total_steps or 0):
            milestone = eta_mod.eta(arm, arm.milestone_step, now)
            if milestone:
                parts.append(f"milestone {milestone.clock}")
    if arm.failure is not None:
        parts.append(f"{arm.failure.error}: {arm.failure.message}")
    elif arm.exit_code not in (None, 0):
        parts.append(f"exit {arm.exit_code}")
    return "  ".join(parts)


def validation_line(arm_name: str, point: Any) -> str:
    size = f" on {point.sample_size} samples" if point.sample_size else ""
    schedule = point.schedule or {}
    where = ""
    if isinstance(schedule.get("lr_fraction"), (int, float)):
        where = f"  (LR {schedule['lr_fraction']:.0%} of peak, decay {schedule.get('decay_done', 0):.0%} done)"
        if schedule.get("probe_steps"):
            where += f"; cooling down over {schedule['probe_steps']} steps to score it as if finished"
    return (f"{arm_name}: validation at step {point.step}{size}: precision {pct(point.precision)}  "
            f"recall {pct(point.recall)}  F1 {pct(point.f1)}{where}")


def probe_line(arm_name: str, point: Any) -> str:
    if point.failed:
        return f"{arm_name}: cooldown probe at step {point.step} gave no score: {point.failed}"
    cost = f", {point.seconds:.1f} s" if point.seconds is not None else ""
    return (f"{arm_name}: cooled down from step {point.step} ({point.steps} steps{cost}): precision "
            f"{pct(point.precision)}  recall {pct(point.recall)}  F1 {pct(point.f1)}")


def score_lines(verdict: Any) -> list[str]:
    """Each arm's and the reference's P/R/F1 with intervals, and each arm's F1 against the reference."""
    reference = getattr(verdict, "reference", None) or {}
    if not reference.get("metrics"):
        return []  # without a reference the reasons say it all
    rows = [*getattr(verdict, "metrics", {}).items(), (f"{reference['name']} (reference)", reference["metrics"])]
    width = max(len(name) for name, _ in rows)
    versus = reference.get("comparisons") or {}
    lines = []
    for name, m in rows:
        cells = "  ".join(f"{label} {pct(m[key]['value'])} [{100 * m[key]['low']:.1f}, {100 * m[key]['high']:.1f}]"
                          for key, label in (("precision", "P"), ("recall", "R"), ("f1", "F1")))
        line = f"  {name:<{width}}  {cells}"
        if name in versus:
            f1 = versus[name]["f1"]
            line += (f"  F1 {100 * f1['diff']:+.1f} [{100 * f1['low']:+.1f}, {100 * f1['high']:+.1f}]: "
                     f"{versus[name]['describe']}")
        lines.append(line)
    return lines


def verdict_lines(verdict: Any) -> list[str]:
    headline = getattr(verdict, "headline", "")
    lines = [f"Verdict: scenario {verdict.scenario}" + (f" — {headline}" if headline else "")]
    lines += score_lines(verdict)
    lines += [f"  - {reason}" for reason in verdict.reasons]
    if verdict.actions:
        lines.append("Recommended actions:")
        lines += [f"  - {action.describe()}" for action in verdict.actions]
    return lines


@dataclass
class Monitor:
    """What has been printed and done so far; one `step()` is one poll of the files."""

    exp: ExperimentPaths
    rules: Rules | None
    out: TextIO
    clock: Callable[[], float]
    progress_every: float = PROGRESS_EVERY_S
    last_progress: float | None = None
    validations_seen: set[tuple[str, int, float]] = field(default_factory=set)
    verdict_stages: set[str] = field(default_factory=set)  # printed: "milestone", then "final"
    watcher: Any = None

    def __post_init__(self) -> None:
        from ..reading.watcher import ExperimentWatcher

        self.watcher = ExperimentWatcher(self.exp, clock=self.clock)

    def say(self, line: str = "") -> None:
        print(line, file=self.out, flush=True)

    def step(self) -> int | None:
        """Poll once; returns the exit code when every arm has ended, else None."""
        # Liveness before reading: an arm whose process ends during the read may have written its
        # last events after them, so only a look at a moment when nothing ran can conclude.
        alive = any(arm_alive(a) for a in self.exp.arms())
        self.watcher.poll()
        state = self.watcher.state
        now = self.clock()
        printed = self.last_progress is None or now - self.last_progress >= self.progress_every
        if printed:
            self._progress(now)
        for arm in state.arms.values():
            for point in arm.validations:
                key = (arm.name, point.step, point.t)
                if key not in self.validations_seen:
                    self.validations_seen.add(key)
                    self.say(validation_line(arm.name, point))
            for probe in arm.probes:
                key = (arm.name + " probe", probe.step, probe.t)
                if key not in self.validations_seen:
                    self.validations_seen.add(key)
                    self.say(probe_line(arm.name, probe))
        acted = False
        verdict = state.verdict
        if verdict is not None and verdict.scenario != WAITING and getattr(verdict, "stage", "") not in self.verdict_stages:
            acted = self._verdict(verdict)
        if acted or not state.all_ended or alive:
            return None
        if not printed:
            self._progress(now)  # where each arm ended
        if not self.verdict_stages:
            self.say(f"No verdict: {self._no_verdict_reason()}.")
        crashed = [a.name for a in state.arms.values() if a.status == CRASHED]
        if crashed:
            self.say(f"Crashed or failed: {', '.join(crashed)} (see stderr.log in each arm's folder; "
                     f"`gputwin resume ARM -x {self.exp.name}` restarts one).")
            return EXIT_ARM_CRASHED
        self.say(f"All arms of {self.exp.name} have ended.")
        return 0

    def _no_verdict_reason(self) -> str:
        state = self.watcher.state
        missing = [a.name for a in state.arms.values() if not a.validations]
        if len(state.arms) < 2:
            return "a verdict compares two or more arms"
        if missing:
            return f"no validation result from {', '.join(missing)}"
        return state.verdict.headline if state.verdict is not None else "the validations could not be compared"

    def _progress(self, now: float) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(now))
        for arm in self.watcher.state.arms.values():
            self.say(f"{stamp}  {progress_line(arm, now)}")
        self.last_progress = now

    def _verdict(self, verdict: Any) -> bool:
        """Print the verdict and write the report (once per stage: milestone, final); apply the actions when
        the rules say so (once).

        Returns True when actions were applied (arms may restart: do not conclude yet).
        """
        from .report import write_report

        self.verdict_stages.add(getattr(verdict, "stage", ""))
        for line in verdict_lines(verdict):
            self.say(line)
        self.say("Report: " + ", ".join(str(p) for p in write_report(self.exp.root)))
        rules = self.rules or self.watcher.state.rules
        if rules is None or rules.on_verdict != "apply":
            return False
        from ..control.launcher import apply_verdict_once

        applied, lines = apply_verdict_once(self.exp, verdict)
        if applied:
            self.say("Applying the verdict (rules.on_verdict = \"apply\"):")
        for line in lines:
            self.say(f"  {line}" if applied else line)
        return applied


def monitor(exp: ExperimentPaths, *, rules: Rules | None = None, out: TextIO | None = None,
            clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
            poll_every: float = POLL_EVERY_S, progress_every: float = PROGRESS_EVERY_S) -> int:
    """Follow `exp` until every arm has ended; returns the process exit code."""
    watch = Monitor(exp, rules, out or sys.stdout, clock, progress_every)
    watch.say(f"Watching {exp.name} ({exp.root}); Ctrl-C detaches, training continues.")
    try:
        while True:
            code = watch.step()
            if code is not None:
                return code
            sleep(poll_every)
    except KeyboardInterrupt:
        watch.say(f"Detached. Training continues: gputwin attach {exp.name} | gputwin status {exp.name}")
        return 130
