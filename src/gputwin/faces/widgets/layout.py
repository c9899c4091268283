"""How the dashboard shares the terminal: arm panes side by side as the width allows, the verdict under
them with at most its share of the height, and never so much that a pane loses its loss trend."""

from __future__ import annotations

import math

from textual.containers import Container
from textual.events import Resize

PANE_MIN_WIDTH = 48  # columns an arm pane needs before another fits beside it
PANE_MIN_ROWS = 7  # border, header, hyperparameters, milestone, end and the loss trend: the verdict gives way
VERDICT_MIN_ROWS = 5  # ... down to its headline and two lines
VERDICT_SHARE, VERDICT_SHARE_BESIDE_LOG = 0.40, 0.25  # of the height under the top bar, at most
LOG_SHARE, LOG_MIN_ROWS = 0.30, 6  # the log view's height (gputwin.tcss #log)
BARS = 2  # the top bar and the key bar


def grid_shape(panes: int, width: int) -> tuple[int, int]:
    """(columns, rows) of the arm panes' grid."""
    panes = max(1, panes)
    columns = max(1, min(panes, width // PANE_MIN_WIDTH))
    return columns, max(1, math.ceil(panes / columns))


def verdict_max_rows(height: int, pane_rows: int, log_shown: bool) -> int:
    """The verdict pane's largest height: its share of the screen, less where the panes need the rows
    (an 80x24 terminal with two panes stacked gives up one row of the verdict, which scrolls)."""
    share = VERDICT_SHARE_BESIDE_LOG if log_shown else VERDICT_SHARE
    log_rows = max(LOG_MIN_ROWS, int(height * LOG_SHARE)) if log_shown else 0
    room = height - BARS - log_rows - pane_rows * PANE_MIN_ROWS
    return max(VERDICT_MIN_ROWS, min(int((height - 1) * share), room))  # the key bar is docked: not in the share


class ArmsArea(Container):
    """The grid of arm panes. Notifications are shown over it, never over the verdict under it."""

    def on_resize(self, event: Resize) -> None:
        self.call_after_refresh(self.app.fit_notifications)  # type: ignore[attr-defined]
