"""Text that the dashboard rewrites every second, repainted only when it changed.

Textual's ``Static.update`` repaints and asks for a layout, a reflow of the whole screen, on every call.
The dashboard sets about twenty of these a second; most carry the same text as before, and the rest
change only digits. ``LiveText.show`` skips an unchanged text, and lays out only when the new text could
take a different size: texts with the same words' widths and the same spaces between them wrap alike.
"""

from __future__ import annotations

import re
from typing import Hashable, Sequence

from rich.cells import cell_len
from rich.console import RenderableType
from rich.text import Text
from textual.widgets import Static

_WORDS = re.compile(r"(\s+)")


def text_key(text: Text) -> Hashable:
    """Everything that decides how a Text looks: its characters, styles and wrapping settings."""
    return (text.plain, tuple(text.spans), str(text.style), text.justify, text.overflow, text.no_wrap, text.end)


def text_shape(text: Text) -> Hashable:
    """What decides the room a Text takes at any width: each word's cells, the spaces between them
    as they are, and the wrapping settings."""
    words = tuple(part if part.isspace() else cell_len(part) for part in _WORDS.split(text.plain))
    return words, text.overflow, text.no_wrap


class LiveText(Static):
    """A Static for often-rewritten text: ``show`` repaints only a change and lays out only a new shape."""

    def __init__(self, text: str | Text = "", *, id: str | None = None, classes: str | None = None) -> None:
        text = Text(text) if isinstance(text, str) else text
        super().__init__(text, id=id, classes=classes)
        self._key: Hashable = (text_key(text),)
        self._shape: Hashable = (text_shape(text),)

    def show(self, content: str | RenderableType, parts: Sequence[Text] | None = None) -> None:
        """Show `content` (a str is plain text, not markup).

        For content composed of Texts (a table, a group), `parts` lists them all, in order, and the
        layout around them must depend on nothing else: then equal parts look alike and parts of the
        same shapes take the same room. Without them, non-Text content always repaints and lays out."""
        if isinstance(content, str):
            content = Text(content)
        if parts is None and isinstance(content, Text):
            parts = (content,)
        if parts is None:
            key: Hashable = object()  # equal to nothing shown before
            shape: Hashable = object()
        else:
            key = tuple(text_key(t) for t in parts)
            shape = tuple(text_shape(t) for t in parts)
        if key == self._key:
            return
        layout = shape != self._shape
        self._key, self._shape = key, shape
        self.update(content, layout=layout)
