"""Pictures for the comparison report, written beside ``comparison.md`` as small SVG files that
``comparison.md`` links (people compare runs by looking at curves):

    comparison-loss.svg     each arm's training loss, raw and smoothed, its validations (F1) and the milestone
    comparison-scores.svg   precision, recall and F1 per entity type with intervals, one marker per arm

    write_figures(folder, state, results, verdict) -> list[str]   the report's "Figures" section (markdown)

The data for each picture is gathered by pure functions (``loss_curves``, ``score_table``); matplotlib is
imported only when the files are drawn (it costs about a second, which the UI's start never pays), and
only through its object API (a ``Figure`` without pyplot): no global backend, safe in the UI's worker
thread. The SVGs keep their text as text and carry fixed ids and no date: the same experiment gives the
same bytes, a few tens of KB, readable in any browser. Each series is an SVG group with a fixed id
(``loss-smoothed-ARM``, ``f1-ARM``, ...) so scripts and tests can find it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from ..core import state as st
from ..core.metrics import METRICS, arm_intervals, pooled_intervals
from ..core.paths import write_atomic
from ..core.verdict import FAMILY_CONFIDENCE, ArmResult, Verdict, level

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LOSS_FILE = "comparison-loss.svg"
SCORES_FILE = "comparison-scores.svg"
MAX_POINTS = 200  # per curve: a browser shows no more at this size, and each point costs ~15 bytes
ALL_TYPES = "all types"
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
LABELS = {"precision": "precision", "recall": "recall", "f1": "F1"}
STYLE = {  # matplotlib rc settings for every figure
    "svg.fonttype": "none",  # text stays text: smaller files, sharp and searchable in a browser
    "svg.hashsalt": "gputwin",  # ids from a fixed salt: the same figure gives the same bytes
    "svg.id": "gputwin",
    "path.simplify": False,  # every point of the (already thinned) curves is drawn, at its exact place
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial"],  # DejaVu ships with matplotlib; a short list per text
    "font.size": 9,
    "text.parse_math": False,  # an entity type or arm name with a '$' is text, not a formula
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#dddddd",
    "grid.linewidth": 0.6,
    "legend.frameon": False,
}


# ---------------------------------------------------------------- what is drawn (pure)


@dataclass(frozen=True)
class LossCurve:
    """One arm's loss as the chart draws it: equal-length lists, at most MAX_POINTS long."""

    arm: str
    steps: list[int]
    raw: list[float]
    smoothed: list[float]
    validations: list[tuple[int, float]]  # (step, F1)
    milestone_step: int | None


def thin(steps: Sequence[int], raw: Sequence[float], smoothed: Sequence[float],
         max_points: int = MAX_POINTS) -> tuple[list[int], list[float], list[float]]:
    """Halve a curve until it fits in ``max_points``, as LossHistory merges its buckets: neighbours
    become one point at the later step, raw values averaged, the smoothed value of the later one kept."""
    s, r, m = list(steps), list(raw), list(smoothed)
    while len(s) > max_points:
        odd = len(s) % 2  # the first point stays alone, so the newest pair always merges
        s = s[:odd] + s[odd + 1::2]
        r = r[:odd] + [(a + b) / 2 for a, b in zip(r[odd::2], r[odd + 1::2])]
        m = m[:odd] + m[odd + 1::2]
    return s, r, m


def loss_curves(state: st.ExperimentState, max_points: int = MAX_POINTS) -> list[LossCurve]:
    """Every arm with at least one step, in the experiment's order."""
    curves = []
    for name, arm in state.arms.items():
        history = arm.loss_history
        if not len(history):
            continue
        steps, raw, smoothed = thin(history.steps, history.raw, history.smoothed, max_points)
        curves.append(LossCurve(name, steps, raw, smoothed, [(v.step, v.f1) for v in arm.validations],
                                arm.milestone_step))
    return curves


@dataclass(frozen=True)
class ScoreTable:
    """Scores with intervals: ``scores[arm][row][metric] = {"value", "low", "high"}`` (fractions).

    Row ``ALL_TYPES`` comes from the sample-level bootstrap (the same intervals as the report's table),
    the entity types from ``pooled_intervals`` (per-type counts are kept pooled only)."""

    rows: list[str]
    support: dict[str, int]  # gold entities of the row, in the baseline's validation
    scores: dict[str, dict[str, dict[str, dict[str, float]]]]
    confidence: float
    step: dict[str, int]  # arm -> step validated


def score_table(results: Mapping[str, ArmResult | None], verdict: Verdict | None, *, resamples: int = 2000,
                seed: int = 0) -> ScoreTable | None:
    """The arms that have a validation result; None when none has."""
    done = {name: r for name, r in results.items() if r is not None}
    if not done:
        return None
    confidence = verdict.confidence if verdict is not None else FAMILY_CONFIDENCE
    reference = done.get(verdict.baseline) if verdict is not None else None
    reference = reference or next(iter(done.values()))
    types = sorted({t for r in done.values() for t in r.validation.get("per_type", {})})
    support = {etype: int(reference.validation.get("per_type", {}).get(etype, {}).get("support", 0))
               for etype in types}
    v = reference.validation
    support[ALL_TYPES] = int(v.get("tp", 0)) + int(v.get("fn", 0))
    scores: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for name, result in done.items():
        shown = verdict.metrics.get(name) if verdict is not None else None
        overall = ({m: dict(shown[m]) for m in METRICS} if shown else
                   arm_intervals(result.counts, resamples=resamples, seed=seed, confidence=confidence))
        rows = {ALL_TYPES: overall}
        for etype, counts in result.validation.get("per_type", {}).items():
            rows[etype] = pooled_intervals(int(counts.get("tp", 0)), int(counts.get("fp", 0)),
                                           int(counts.get("fn", 0)), resamples=resamples, seed=seed,
                                           confidence=confidence)
        scores[name] = rows
    return ScoreTable([ALL_TYPES, *types], support, scores, confidence, {n: r.step for n, r in done.items()})


# ---------------------------------------------------------------- drawing


def _colour(index: int) -> str:
    return COLOURS[index % len(COLOURS)]


def draw_loss(curves: Sequence[LossCurve]) -> Figure:
    """Raw loss thin and faint, smoothed bold, one colour per arm; validations as diamonds on an F1 axis
    at the right; each milestone a dashed line."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(8.0, 3.6), layout="constrained")
    ax = fig.add_subplot()
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    f1_ax = ax.twinx() if any(c.validations for c in curves) else None
    for i, curve in enumerate(curves):
        colour = _colour(i)
        raw, = ax.plot(curve.steps, curve.raw, color=colour, linewidth=0.8, alpha=0.45)
        raw.set_gid(f"loss-raw-{curve.arm}")
        smooth, = ax.plot(curve.steps, curve.smoothed, color=colour, linewidth=1.8)
        smooth.set_gid(f"loss-smoothed-{curve.arm}")
        if f1_ax is not None and curve.validations:
            steps, f1s = zip(*curve.validations)
            marks, = f1_ax.plot(steps, [f * 100 for f in f1s], linestyle="none", marker="D", markersize=6,
                                color=colour, markeredgecolor="white")
            marks.set_gid(f"validation-{curve.arm}")
            for step, f1 in curve.validations:
                f1_ax.annotate(f"{f1 * 100:.1f}%", (step, f1 * 100), xytext=(-7, 0), textcoords="offset points",
                               ha="right", va="center", color=colour, fontsize=8)
    top = max(max(c.smoothed) for c in curves)
    bottom = min(min(c.raw) for c in curves)
    ax.set_ylim(max(0.0, bottom - 0.05 * (top - bottom)), top + 0.1 * (top - bottom or 1.0))
    for milestone in sorted({c.milestone_step for c in curves if c.milestone_step is not None}):
        line = ax.axvline(milestone, color="#555555", linestyle="--", linewidth=1.0)
        line.set_gid(f"milestone-{milestone}")
        ax.annotate(f"milestone {milestone:,}", (milestone, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -10), textcoords="offset points", fontsize=8, color="#555555")
    if f1_ax is not None:
        f1_ax.set_ylabel("validation F1 (%)")
        f1_ax.grid(False)
        f1_ax.spines["right"].set_visible(True)
        low = min(f * 100 for c in curves for _, f in c.validations)
        f1_ax.set_ylim(max(0.0, low - 20), 100)
    grey = "#777777"
    handles = [Line2D([], [], color=_colour(i), linewidth=1.8, label=c.arm) for i, c in enumerate(curves)]
    handles += [Line2D([], [], color=grey, linewidth=0.7, alpha=0.6, label="raw"),
                Line2D([], [], color=grey, linewidth=1.8, label="smoothed (EMA 0.9)")]
    if f1_ax is not None:
        handles.append(Line2D([], [], color=grey, linestyle="none", marker="D", label="validation F1"))
    if any(c.milestone_step is not None for c in curves):
        handles.append(Line2D([], [], color="#555555", linestyle="--", linewidth=1.0, label="milestone"))
    fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), fontsize=8, handlelength=1.6)
    return fig


def draw_scores(table: ScoreTable, goals: Mapping[str, float]) -> Figure:
    """One panel per metric; a row per entity type (all types first); each arm a marker with its interval
    bar, the arms side by side within a row; the final goal of each metric a dotted line."""
    from matplotlib.figure import Figure

    arms = list(table.scores)
    height = 1.3 + 0.36 * len(table.rows) * max(1.0, len(arms) / 2)
    fig = Figure(figsize=(8.0, height), layout="constrained")
    axes = fig.subplots(1, len(METRICS), sharey=True)
    lows = [s[m]["low"] for a in arms for s in table.scores[a].values() for m in METRICS]
    left = max(0.0, min(lows) * 100 - 5)
    spread = 0.5 / max(1, len(arms))
    for ax, metric in zip(axes, METRICS):
        for i, arm in enumerate(arms):
            rows = [(y, table.scores[arm][row][metric]) for y, row in enumerate(table.rows) if row in table.scores[arm]]
            ys = [y + (i - (len(arms) - 1) / 2) * spread for y, _ in rows]
            values = [s["value"] * 100 for _, s in rows]
            below = [max(0.0, (s["value"] - s["low"]) * 100) for _, s in rows]
            above = [max(0.0, (s["high"] - s["value"]) * 100) for _, s in rows]
            bars = ax.errorbar(values, ys, xerr=[below, above], fmt="o", markersize=4, color=_colour(i),
                               elinewidth=1.4, capsize=0, label=f"{arm} (step {table.step[arm]:,})")
            bars.lines[0].set_gid(f"{metric}-{arm}")
            bars.lines[2][0].set_gid(f"{metric}-interval-{arm}")
        goal = goals.get(metric)
        if goal is not None:
            ax.axvline(goal * 100, color="#555555", linestyle=":", linewidth=1.0).set_gid(f"goal-{metric}")
        ax.set_title(LABELS[metric] + (f" (goal {goal * 100:.4g}%)" if goal is not None else ""), fontsize=9)
        ax.set_xlim(left, 100.5)
        ax.set_xlabel("%")
        ax.grid(axis="y", visible=False)
    axes[0].set_yticks(range(len(table.rows)), [f"{row} ({table.support.get(row, 0):,})" for row in table.rows])
    axes[0].invert_yaxis()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=len(arms), fontsize=8)
    return fig


def svg_text(fig: Figure) -> str:
    """The figure as SVG text, with no date in it."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": "gputwin"})
    return buffer.getvalue()


# ---------------------------------------------------------------- the report's section


def _goals(state: st.ExperimentState) -> dict[str, float]:
    rules = state.rules
    return {} if rules is None else {"precision": rules.goal_precision, "recall": rules.goal_recall,
                                     "f1": rules.goal_f1}


def write_figures(folder: Path, state: st.ExperimentState, results: Mapping[str, ArmResult | None],
                  verdict: Verdict | None) -> list[str]:
    """Draw the figures that have data into ``folder`` (a figure with none is removed, so no stale picture
    stays beside a new report) and return the markdown section that links them."""
    curves = loss_curves(state)
    rules = state.rules
    table = score_table(results, verdict, resamples=rules.bootstrap_resamples if rules else 2000,
                        seed=rules.seed if rules else 0)
    if not curves and table is None:
        for name in (LOSS_FILE, SCORES_FILE):
            (folder / name).unlink(missing_ok=True)
        return []
    try:
        from matplotlib import rc_context
    except ImportError:
        return ["## Figures", "", "Not drawn: matplotlib is not installed (`pip install matplotlib`).", ""]
    out = ["## Figures", ""]
    with rc_context(STYLE):
        if curves:
            write_atomic(folder / LOSS_FILE, svg_text(draw_loss(curves)))
            alt = "Training loss of each arm, raw and smoothed, validations and the milestone marked"
            out += [f"![{alt}]({LOSS_FILE})", ""]
        else:
            (folder / LOSS_FILE).unlink(missing_ok=True)
        if table is not None:
            write_atomic(folder / SCORES_FILE, svg_text(draw_scores(table, _goals(state))))
            interval = level(table.confidence)
            out += [f"![Precision, recall and F1 per entity type with {interval} intervals]({SCORES_FILE})", "",
                    f"Bars are {interval} intervals: for all types the paired bootstrap over samples (as in the "
                    "metrics table); per type a bootstrap over the entities, somewhat narrower because per-sample "
                    "counts are not kept by type. Dotted lines: the final goal.", ""]
        else:
            (folder / SCORES_FILE).unlink(missing_ok=True)
    return out
