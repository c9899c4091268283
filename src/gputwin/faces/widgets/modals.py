"""Screens over the dashboard: confirm an action, and the key help.

A confirm screen is dismissed with True (confirm) or False (cancel); the app then calls the
launcher. Nothing here writes files.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ConfirmScreen(ModalScreen[bool]):
    """Asks before an action that changes a training run (stop, extend, apply the verdict)."""

    BINDINGS = [
        Binding("y,enter", "confirm", "Confirm", priority=True),
        Binding("n,escape", "cancel", "Cancel", priority=True),
    ]

    def __init__(self, title: str, body: Text | Table | str, confirm_label: str = "Confirm") -> None:
        super().__init__()
        self._title = title
        self._body = body
        self._confirm_label = confirm_label

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog") as dialog:
            dialog.border_title = self._title
            yield Static(self._body, id="dialog-body")
            with Horizontal(id="dialog-buttons"):
                yield Button(f"{self._confirm_label} (y)", variant="primary", id="confirm")
                yield Button("Cancel (n)", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "confirm")

    def action_confirm(self) -> None:
        self.dismiss(True)

    def action_cancel(self) -> None:
        self.dismiss(False)


KEY_HELP = [  # what the help screen lists: every key of the dashboard
    ("s", "stop the focused arm (asks first): it finishes its step, saves a checkpoint and exits"),
    ("e", "extend the focused arm by one epoch (shows the new end step, ETA and LR plan; asks first)"),
    ("v", "validate the focused arm's current adapter now, without stopping it"),
    ("a", "apply the verdict's recommended actions (asks first)"),
    ("r", "write the report now (comparison.md, verdict.json; kept in step with the verdict anyway)"),
    ("l", "show or hide the focused arm's stderr log"),
    ("R", "resume a stopped or crashed arm from its last checkpoint"),
    ("tab, 1-9", "focus the next arm, or arm number N"),
    ("?", "this help"),
    ("q", "detach: close this screen; training continues (`gputwin attach` comes back)"),
]

HELP_TEXT = """\
Each pane is one arm: its device and status, the hyperparameters that differ between arms \
(highlighted), progress toward the milestone and the end with ETAs, the loss chart \
(raw, smoothed, and validation points), and the device it runs on.

The verdict pane waits for every arm's milestone validation, then shows precision, recall and F1 \
with 95% intervals, the scenario, the reasons and the recommended actions.

Training runs detached from this screen: quitting (q) or losing the terminal never stops it. \
Run `gputwin attach` to come back."""


class HelpScreen(ModalScreen[None]):
    """The keys and what they do; any of escape, q or ? closes it."""

    BINDINGS = [Binding("escape,q,question_mark", "close", "Close", priority=True)]

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        super().__init__()
        self._keys = keys

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        for key, description in self._keys:
            table.add_row(key, description)
        with VerticalScroll(id="help") as box:
            box.border_title = "gputwin keys"
            box.border_subtitle = "escape closes"
            yield Static(table, id="help-keys")
            yield Static(HELP_TEXT, id="help-text")

    def action_close(self) -> None:
        self.dismiss(None)
