"""The training-loss chart: raw and smoothed curves with axes, validation steps marked; squeezed too small
for axes (an 80x24 terminal), a one-line trend: a sparkline of the smoothed loss and the latest values."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

from rich.color import Color
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text
from textual.reactive import reactive
from textual.renderables.sparkline import Sparkline
from textual.timer import Timer
from textual_plotext import PlotextPlot

from ..formatting import percent, step_ticks

MIN_HEIGHT = 6
LEGEND_MIN_HEIGHT = 12
MIN_WIDTH = 20
REDRAW_S = 10.0  # a redraw costs ~80 ms of CPU on a small machine: new steps wait for it, a validation does not
TREND_LOW = Color.from_rgb(80, 210, 240)  # the sparkline's colours: low loss bright cyan, high loss grey
TREND_HIGH = Color.from_rgb(110, 110, 110)


@dataclass(frozen=True)
class LossSeries:
    """What the chart draws: equal-length step/loss lists and the validations to mark."""

    steps: list[int] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    validations: list[tuple[int, float]] = field(default_factory=list)  # (step, F1)
    milestone_step: int | None = None


def trend_values(losses: list[float]) -> list[float]:
    """On a log scale when every loss is positive: a loss falls fast, then slowly, and on a linear scale
    the slow part (what decides whether to train on) is a flat row of the lowest bar."""
    if losses and min(losses) > 0:
        return [math.log(v) for v in losses]
    return list(losses)


def trend_line(series: LossSeries, width: int) -> RenderableType:
    """One line for a chart too small for axes: "loss ▇▅▃▂▁ 0.3141 (smoothed 0.3312)". The sparkline shows the
    smoothed loss (the raw one is mostly noise at this size) from the first step to the latest."""
    if not series.steps:
        return Text("loss: no steps yet", style="dim", no_wrap=True, overflow="ellipsis")
    label = Text("loss ", style="bold")
    latest = Text(f" {series.raw[-1]:.4f}", style="bold")
    smoothed = f" (smoothed {series.smoothed[-1]:.4f})"
    if width - len(label) - len(latest) - len(smoothed) >= 12:
        latest.append(smoothed)  # only when the sparkline keeps a dozen cells beside it
    room = width - len(label) - len(latest)
    if room < 4:
        return Text.assemble(label, latest, no_wrap=True, overflow="ellipsis")
    grid = Table.grid()
    grid.add_column(no_wrap=True)
    grid.add_column(width=room, no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_row(label, Sparkline(trend_values(series.smoothed), width=room, min_color=TREND_LOW,
                                  max_color=TREND_HIGH, summary_function=statistics.fmean), latest)
    return grid


class LossChart(PlotextPlot):
    """A real chart with a step axis and a loss axis; redraws when its series changes, and for mere new
    steps at most every REDRAW_S seconds (arms logging 50 steps/s would otherwise keep a core busy).
    Smaller than MIN_HEIGHT x MIN_WIDTH it shows the one-line trend instead, which costs nothing to redraw.

    `series` drives the view: set it (or call show()) and watch_series decides when to redraw; an equal
    series changes nothing. No automatic repaint: a plot repaint is the costly part, so the watcher asks."""

    series: reactive[LossSeries] = reactive(LossSeries, repaint=False, init=False)

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._stale = False  # the plot does not hold the current series (it changed while the trend line showed)
        self._compact = False  # short plots drop the raw/smoothed legend rows to keep the curve visible
        self._drawn_at = float("-inf")  # time.monotonic() of the last redraw
        self._timer: Timer | None = None

    @property
    def too_small(self) -> bool:
        """A plot squeezed smaller than this has no readable axes."""
        return self.size.height < MIN_HEIGHT or self.size.width < MIN_WIDTH

    def show(self, series: LossSeries) -> None:
        self.series = series

    def watch_series(self, old: LossSeries, series: LossSeries) -> None:
        if self.too_small:
            self._stale = True
            self.refresh()  # the trend line: cheap, shown at once
            return
        urgent = (not old.steps or len(series.steps) < len(old.steps) or series.validations != old.validations
                  or series.milestone_step != old.milestone_step)
        wait = self._drawn_at + REDRAW_S - time.monotonic()
        if urgent or wait <= 0:
            self._redraw()
        elif self._timer is None:
            self._timer = self.set_timer(wait, self._redraw)

    def _redraw(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self._draw()
        self.refresh()

    def on_mount(self) -> None:
        self._draw()

    def render(self) -> RenderableType:
        if self.too_small:
            return trend_line(self.series, self.size.width)
        compact = self.size.height < LEGEND_MIN_HEIGHT
        if compact != self._compact or self._stale:
            self._compact = compact
            self._draw()
        return super().render()

    def _draw(self) -> None:
        self._drawn_at, self._stale = time.monotonic(), False
        plt, s = self.plt, self.series
        plt.clear_figure()
        plt.xlabel("step")
        plt.ylabel("loss")
        if not s.steps:
            plt.title("loss: no steps yet")
            return
        plt.plot(s.steps, s.raw, marker="braille", color="gray", label=None if self._compact else "raw")
        plt.plot(s.steps, s.smoothed, marker="braille", color="cyan", label=None if self._compact else "smoothed")
        low = min(min(s.raw), min(s.smoothed))
        high = max(max(s.raw), max(s.smoothed))
        if s.milestone_step and s.steps[0] <= s.milestone_step <= s.steps[-1]:
            plt.vline(s.milestone_step, "yellow")
        for step, f1 in s.validations:
            # A marker at the bottom of the plot at the validated step, labelled with its F1.
            plt.scatter([step], [low], marker="◆", color="magenta", label=f"val F1 {percent(f1)} @{step}")
        ticks = step_ticks(s.steps[0], s.steps[-1])
        plt.xticks(ticks, [f"{t:,}" for t in ticks])
        plt.ylim(low - 0.02 * (high - low or 1), high + 0.02 * (high - low or 1))
