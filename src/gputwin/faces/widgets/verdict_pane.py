"""The verdict: who it waits for, then each arm's P/R/F1 with intervals, then scenario, reasons, actions."""

from __future__ import annotations

import time
from typing import Any, Sequence

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.containers import VerticalScroll

from .arm_pane import eta_text
from ...core.state import ExperimentState
from ...core.verdict import Verdict
from ..formatting import display_path, interval, percent
from ...control.launcher import changing_actions
from .live_text import LiveText

SCENARIO_STYLE = {"A": "bold green", "B": "bold yellow", "C": "bold cyan", "mismatch": "bold red"}
OUTCOME_STYLE = {"beats": "green", "ties": "yellow", "short": "red"}  # an arm against the reference


def waiting_view(state: ExperimentState, now: float) -> tuple[RenderableType, list[Text]]:
    """Before every arm has a validation: where each arm stands toward its milestone; with the Texts the
    view is made of (what LiveText compares)."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for arm in state.arms.values():
        point = arm.validation_at(arm.milestone_step) if arm.milestone_step is not None else None
        point = point or arm.last_validation
        if point is not None:
            row = Text(f"validated at step {point.step:,}: precision {percent(point.precision)} · "
                       f"recall {percent(point.recall)} · F1 {percent(point.f1)}", style="green")
            planned = (point.schedule or {}).get("probe_steps")
            if planned and arm.probe_at(point.step) is None and not arm.ended:
                row.append(f" · cooling down ({planned:,}-step probe, LR {point.lr_fraction or 0:.0%} of peak → 0)",
                           style="yellow")
        elif arm.status == "crashed":
            row = Text(f"crashed at step {arm.step:,} before its validation (R resumes it)", style="red")
        elif arm.ended:
            row = Text(f"{arm.status} at step {arm.step:,} without a validation", style="yellow")
        elif arm.milestone_step is None:
            row = Text("not started yet", style="dim")
        else:
            row = Text(f"at step {arm.step:,} of {arm.milestone_step:,} · {eta_text(arm, arm.milestone_step, now)}")
        table.add_row(Text(arm.name), row)
    reference = getattr(state, "reference", None)
    if reference is not None:
        table.add_row(*reference_waiting_row(reference))
    missing = [a for a in state.arms.values() if not a.validations]
    live = [a.name for a in missing if not a.ended]
    if live:
        title = Text("waiting for the milestone validation of " + ", ".join(live), style="bold")
    elif missing:
        title = Text("no verdict: " + ", ".join(a.name for a in missing) + " ended without a validation", style="bold red")
    else:
        title = Text("waiting for the verdict", style="bold")
    cells = [cell for column in table.columns for cell in column.cells]
    return Group(title, table), [title, *cells]


def reference_waiting_row(reference: Any) -> tuple[Text, Text]:
    """The reference's scores (validated before the arms started), or why it has none."""
    name = Text(f"{reference.name} (reference)", style="italic")
    if not reference.usable():
        return name, Text(f"no usable validation: {reference.problem}", style="yellow")
    v = reference.validation
    return name, Text(f"validated on {v.get('n', '?')} samples: precision {percent(v.get('precision'))} · "
                      f"recall {percent(v.get('recall'))} · F1 {percent(v.get('f1'))}", style="italic")


def versus_line(reference: Any) -> Text | None:
    """Each arm's F1 against the reference with its interval and what it means, on one line under the table
    (a column would not fit a 100-column terminal beside the intervals)."""
    comparisons = (reference or {}).get("comparisons") or {}
    if not comparisons:
        return None
    first = next(iter(comparisons.values()))
    text = Text(f"F1 against the reference ({first['confidence'] * 100:.4g}% intervals): ", style="bold")
    for i, (arm, c) in enumerate(comparisons.items()):
        f1, outcome = c["f1"], c["outcome"]
        text.append(" · " if i else "")
        text.append(f"{arm} {f1['diff'] * 100:+.1f} [{f1['low'] * 100:+.1f}, {f1['high'] * 100:+.1f}] ")
        text.append(c["describe"], style=OUTCOME_STYLE.get(outcome, ""))
    return text


def _score_cells(m: Any, goal: Any) -> list[Any]:
    """Precision, recall and F1 with their intervals, then which final goals are still missed."""
    cells: list[Any] = []
    for key in ("precision", "recall", "f1"):
        figure = m.get(key, {})
        cells.append(f"{percent(figure.get('value'))} {interval(figure.get('low'), figure.get('high'))}")
    missed = [label for key, label in (("precision", "precision"), ("recall", "recall"), ("f1", "F1"))
              if goal.get(key) is False]
    cells.append(Text("✓ met", style="green") if goal.get("met") else Text("✗ " + ", ".join(missed), style="yellow"))
    return cells


def metrics_table(verdict: Verdict) -> Table:
    """Per-arm precision, recall and F1 with the verdict's intervals; the last column says which final
    goals an arm still misses. With a reference: its row under the arms' and each arm's F1 against it."""
    confidence = getattr(verdict, "confidence", 0.95)
    reference = getattr(verdict, "reference", None) or {}
    table = Table(box=None, padding=(0, 1), header_style="bold", show_edge=False,
                  title=Text(f"entity-level scores at the milestone, [low, high] = {confidence:.0%} interval"),
                  title_justify="left", title_style="dim")
    table.add_column("arm", no_wrap=True)
    table.add_column("step", justify="right", no_wrap=True)
    for name in ("precision", "recall", "F1"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("LR at score", no_wrap=True)
    table.add_column("final goal")
    for arm, m in verdict.metrics.items():
        step = m.get("step")
        style = "bold" if arm in (verdict.winner, verdict.leader) else ""
        cells = _score_cells(m, verdict.goal.get(arm, {}))
        table.add_row(Text(arm, style=style), f"{step:,}" if isinstance(step, int) else "–", *cells[:3],
                      schedule_cell(m), cells[3])
    if reference.get("metrics"):  # "ref" where an arm's step is: the table gets no wider than without it
        cells = _score_cells(reference["metrics"], reference.get("goal") or {})
        table.add_row(Text(reference["name"], style="italic"), Text("ref", style="italic"), *cells[:3],
                      Text("–", style="dim"), cells[3])
    return table


def schedule_cell(m: Any) -> Text:
    """Where in its LR schedule the compared score was taken: finished, cooled (with the raw F1), or mid-way."""
    schedule, cooled = m.get("schedule") or {}, m.get("cooled")
    fraction = schedule.get("lr_fraction")
    if cooled is not None:
        raw = (m.get("raw") or {}).get("f1")
        return Text(f"{fraction or 0:.0%}→0 cooled{'' if raw is None else ' (raw ' + percent(raw) + ')'}", style="cyan")
    if not isinstance(fraction, (int, float)):
        return Text("–", style="dim")
    if fraction <= 0.02 or schedule.get("decay_done", 0) >= 1:
        return Text("end of decay")
    return Text(f"{fraction:.0%} of peak", style="yellow")


def verdict_view(verdict: Verdict, applied: Sequence[str], auto: bool) -> RenderableType:
    """The decided verdict: headline in the scenario's colour, figures, reasons and what to do."""
    parts: list[RenderableType] = [Text(verdict.headline, style=SCENARIO_STYLE.get(verdict.scenario, "bold"))]
    if verdict.metrics:
        parts.append(metrics_table(verdict))
        versus = versus_line(getattr(verdict, "reference", None))
        if versus is not None:
            parts.append(versus)
    for reason in verdict.reasons:
        parts.append(Text(f"• {reason}"))
    actions = list(verdict.actions)
    if actions:
        text = Text("recommended: ", style="bold")
        text.append(" · ".join(a.describe() for a in actions))
        if applied:
            text.append("  (applied)", style="green")
        elif changing_actions(verdict):
            text.append("  press a to apply" if not auto else "  applying automatically", style="italic")
        parts.append(text)
    for message in applied:
        parts.append(Text(f"  {message}", style="green"))
    return Group(*parts)


class VerdictPane(VerticalScroll):
    """Scrolls when the reasons outgrow the space the arms leave it."""

    _decided: tuple[Any, ...] | None = None  # what the decided verdict's view was drawn from

    def compose(self):  # type: ignore[override]
        # kept, not queried: an update may arrive while the app is closing and the children are gone
        self._body = LiveText(id="verdict-body")
        yield self._body

    def show_report(self, report: Any) -> None:
        """Say under the verdict where its report is (an autoreport.ReportState) and when it was written."""
        when = time.strftime("%H:%M:%S", time.localtime(report.at))
        how = "written" if report.wrote else "up to date, written"
        self.border_subtitle = f"report {display_path(report.comparison)}, verdict.json: {how} {when}"

    def show_state(self, state: ExperimentState, now: float, applied: Sequence[str] = (), auto: bool = False) -> None:
        """Called on every update: the body repaints only when its text changed."""
        verdict = state.verdict
        scenario = getattr(verdict, "scenario", None)
        for name in ("waiting", "A", "B", "C", "mismatch"):
            self.set_class(scenario == name, f"-scenario-{name}")
        body = self._body
        if verdict is None or scenario == "waiting":
            live = any(not a.ended for a in state.arms.values() if not a.validations)
            title = "verdict: waiting" if live or not state.arms else "verdict: none"
            self._decided = None
            body.show(*waiting_view(state, now))
        else:
            title = f"verdict: scenario {scenario}"
            decided = (verdict, tuple(applied), auto)
            if decided != self._decided:
                self._decided = decided
                body.show(verdict_view(verdict, applied, auto))
        if self.border_title != title:  # setting it repaints the pane even when it is the same
            self.border_title = title
