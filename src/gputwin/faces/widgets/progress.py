"""Progress toward one target step: a bar, "167/879 steps", and when it will be reached."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text
from textual.geometry import Size
from textual.reactive import reactive
from textual.widget import Widget

from ..formatting import steps

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
    # Changes repaint only: a layout reflows the whole screen, and the height changes only when the line
    # no longer fits its width (or fits again), which show() checks.
    done: reactive[int | None] = reactive(None)
    """Steps done so far."""
    target: reactive[int | None] = reactive(None)
    """The step this bar counts toward; None while the trainer has not said."""
    when: reactive[str] = reactive("")
    """When the target is (or was) reached, already worded ("ETA 14:52 (in 20m)", "reached")."""
    bar: reactive[bool] = reactive(True)
    """False once the bar says nothing more than `when` does (a milestone already validated)."""

    def __init__(self, label: str, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.set_reactive(StepProgress.label, label)

    def show(self, done: int | None, target: int | None, when: str, *, bar: bool = True) -> None:
        """Set everything at once (the caller batches the repaint); lay out when the height changes."""
        width = self.size.width
        one_line = self._fits_one_line(width)
        self.done, self.target, self.when, self.bar = done, target, when, bar
        if self._fits_one_line(width) != one_line:
            self.refresh(layout=True)

    def _figures(self) -> Text:
        figures = Text(steps(self.done, self.target))
        if self.target and self.done is not None:
            figures.append(f" {min(self.done / self.target, 1.0):.0%}", style="dim")
        return figures

    def _fits_one_line(self, width: int) -> bool:
        return not self.bar or not self.when or (
            width >= LABEL_WIDTH + MIN_BAR + len(self._figures()) + len(self.when) + 4)

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return 1 if self._fits_one_line(width) else 2

    def render(self) -> RenderableType:
        if not self.bar:
            return Text.assemble((self.label.ljust(LABEL_WIDTH), "bold"), " ", self.when,
                                 overflow="ellipsis", no_wrap=True)
        done, target = self.done, self.target
        total = float(target) if target else 100.0
        bar = ProgressBar(total=total, completed=min(float(done or 0), total) if target else 0.0)
        figures = self._figures()
        one_line = self._fits_one_line(self.size.width)
        if one_line and self.when:
            figures.append("  " + self.when)
        grid = Table.grid(expand=True, padding=(0, 1))
        grid.add_column(width=LABEL_WIDTH, no_wrap=True)
        grid.add_column(ratio=1, min_width=MIN_BAR)
        grid.add_column(no_wrap=True)
        grid.add_row(Text(self.label, style="bold"), bar, figures)
        if one_line:
            return grid
        # Too narrow for one line: the ETA goes under the bar.
        return Group(grid, Text(" " * (LABEL_WIDTH + 1) + self.when, overflow="ellipsis", no_wrap=True))
