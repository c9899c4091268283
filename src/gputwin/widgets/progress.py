"""Progress toward one target step: a bar, "167/879 steps", and when it will be reached."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from .formatting import steps

LABEL_WIDTH = 9
MIN_BAR = 8


class StepProgress(Widget):
    """One line: label, bar, steps done of the target, and the ETA text the pane computed."""

    DEFAULT_CSS = """
    StepProgress {
        height: auto;
    }
    """

    label: reactive[str] = reactive("")
    """What the target is ("milestone", "end")."""
    done: reactive[int | None] = reactive(None)
    """Steps done so far."""
    target: reactive[int | None] = reactive(None)
    """The step this bar counts toward; None while the trainer has not said."""
    when: reactive[str] = reactive("")
    """When the target is (or was) reached, already worded ("ETA 14:52 (in 20m)", "reached")."""

    def __init__(self, label: str, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.set_reactive(StepProgress.label, label)

    def show(self, done: int | None, target: int | None, when: str) -> None:
        """Set everything at once so the line repaints once."""
        with self.app.batch_update():
            self.done, self.target, self.when = done, target, when

    def render(self) -> RenderableType:
        done, target = self.done, self.target
        total = float(target) if target else 100.0
        bar = ProgressBar(total=total, completed=min(float(done or 0), total) if target else 0.0)
        figures = Text(steps(done, target))
        if target and done is not None:
            figures.append(f" {min(done / target, 1.0):.0%}", style="dim")
        one_line = self.when and self.size.width >= LABEL_WIDTH + MIN_BAR + len(figures) + len(self.when) + 4
        if one_line:
            figures.append("  " + self.when)
        grid = Table.grid(expand=True, padding=(0, 1))
        grid.add_column(width=LABEL_WIDTH, no_wrap=True)
        grid.add_column(ratio=1, min_width=MIN_BAR)
        grid.add_column(no_wrap=True)
        grid.add_row(Text(self.label, style="bold"), bar, figures)
        if one_line or not self.when:
            return grid
        # Too narrow for one line: the ETA goes under the bar.
        return Group(grid, Text(" " * (LABEL_WIDTH + 1) + self.when, overflow="ellipsis", no_wrap=True))
