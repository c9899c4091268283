"""Progress toward one target step: a bar, "167/879 steps", and when it will be reached."""

from __future__ import annotations

from rich.console import RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from .formatting import steps


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
        grid = Table.grid(expand=True, padding=(0, 1))
        grid.add_column(width=9, no_wrap=True)
        grid.add_column(ratio=1, min_width=6)
        grid.add_column()  # wraps under the bar's row end when the pane is narrow
        done, target = self.done, self.target
        total = float(target) if target else 100.0
        bar = ProgressBar(total=total, completed=min(float(done or 0), total) if target else 0.0)
        text = Text(steps(done, target))
        if target and done is not None:
            text.append(f" {min(done / target, 1.0):.0%}", style="dim")
        if self.when:
            text.append("  " + self.when)
        grid.add_row(Text(self.label, style="bold"), bar, text)
        return grid
