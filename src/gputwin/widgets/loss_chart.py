"""The training-loss chart: raw and smoothed curves with axes, validation steps marked."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import RenderableType
from rich.text import Text
from textual_plotext import PlotextPlot

from .formatting import percent, step_ticks

MIN_HEIGHT = 6
LEGEND_MIN_HEIGHT = 12
MIN_WIDTH = 20


@dataclass(frozen=True)
class LossSeries:
    """What the chart draws: equal-length step/loss lists and the validations to mark."""

    steps: list[int] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    validations: list[tuple[int, float]] = field(default_factory=list)  # (step, F1)
    milestone_step: int | None = None


class LossChart(PlotextPlot):
    """A real chart with a step axis and a loss axis; redraws only when its series changes."""

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._series = LossSeries()
        self._compact = False  # short plots drop the raw/smoothed legend rows to keep the curve visible

    @property
    def series(self) -> LossSeries:
        return self._series

    def show(self, series: LossSeries) -> None:
        if series == self._series:
            return
        self._series = series
        self._draw()
        self.refresh()

    def on_mount(self) -> None:
        self._draw()

    def render(self) -> RenderableType:
        if self.size.height < MIN_HEIGHT or self.size.width < MIN_WIDTH:
            # A plot squeezed smaller than this has no readable axes.
            return Text("(too small for the loss chart)", style="dim")
        compact = self.size.height < LEGEND_MIN_HEIGHT
        if compact != self._compact:
            self._compact = compact
            self._draw()
        return super().render()

    def _draw(self) -> None:
        plt, s = self.plt, self._series
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
