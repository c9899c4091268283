"""A row of block characters for a short series (an LR plan in the extend dialog and `gputwin extend`)."""

from __future__ import annotations

from typing import Sequence

BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], top: float | None = None) -> str:
    """One character a value, from ▁ (0) to █ (`top`, by default the largest value)."""
    if not values:
        return ""
    top = max(values) if top is None else top
    if top <= 0:
        return BLOCKS[0] * len(values)
    return "".join(BLOCKS[min(len(BLOCKS) - 1, max(0, round(v / top * (len(BLOCKS) - 1))))] for v in values)
