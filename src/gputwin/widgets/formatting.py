"""Numbers as the screen shows them, each with its unit.

Pure string helpers shared by the widgets; no Textual here, so they are tested as plain functions.
"""

from __future__ import annotations

import math
import time
from typing import Callable

GIB = 1024**3

STATUS_STYLE = {
    "starting": "yellow",
    "training": "green",
    "validating": "cyan",
    "stalled": "bold yellow",
    "stopped": "bright_black",
    "finished": "blue",
    "crashed": "bold red",
}


def status_style(status: str) -> str:
    """The colour a status is drawn in (unknown ones stay plain)."""
    return STATUS_STYLE.get(status, "")


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def num(value: object, digits: int = 4) -> str:
    """A plain figure, or an en dash when there is none yet."""
    return f"{value:.{digits}f}" if is_number(value) else "–"


def sci(value: object) -> str:
    """Learning rates read best in scientific notation (1.5e-04)."""
    return f"{value:.2e}" if is_number(value) else "–"


def percent(fraction: object, digits: int = 1) -> str:
    """A fraction (0.861) as a percentage (86.1%)."""
    return f"{fraction * 100:.{digits}f}%" if is_number(fraction) else "–"


def rate(value: object, unit: str) -> str:
    """A throughput with thousands separators (4,812 tokens/s)."""
    return f"{value:,.0f} {unit}" if is_number(value) else f"– {unit}"


def gib(n_bytes: object, digits: int = 1) -> str:
    """Bytes in GiB, the unit nvidia-smi users read memory in."""
    return f"{n_bytes / GIB:.{digits}f}" if is_number(n_bytes) else "–"


def interval(low: object, high: object) -> str:
    """A confidence interval in percent ([83.0, 88.9])."""
    if not (is_number(low) and is_number(high)):
        return ""
    return f"[{low * 100:.1f}, {high * 100:.1f}]"


def duration(seconds: object) -> str:
    """A duration a person reads at a glance: 45s, 12m 03s, 3h 07m, 2d 04h."""
    if not is_number(seconds) or seconds < 0:
        return "–"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def clock_time(at: float, now: float, localtime: Callable[[float], time.struct_time] = time.localtime) -> str:
    """Wall-clock time of a moment; the date is added when it is not today."""
    moment, today = localtime(at), localtime(now)
    if (moment.tm_year, moment.tm_yday) == (today.tm_year, today.tm_yday):
        return time.strftime("%H:%M", moment)
    return time.strftime("%a %d %b %H:%M", moment)


def steps(done: object, total: object) -> str:
    """Progress in steps (167/879 steps)."""
    d = f"{done:,}" if isinstance(done, int) else "–"
    t = f"{total:,}" if isinstance(total, int) else "?"
    return f"{d}/{t} steps"


def device_label(device: object) -> str:
    """A device as people name it: GPU 0, or CPU."""
    if device is None or device == "cpu" or device == "":
        return "CPU"
    if isinstance(device, int) and not isinstance(device, bool):
        return f"GPU {device}"
    text = str(device)
    if text.startswith("cuda:"):
        return f"GPU {text.removeprefix('cuda:')}"
    if text == "cuda":
        return "GPU 0"
    return text.upper() if text.lower() == "cpu" else text


def short_key(key: str) -> str:
    """A dotted profile key without its table (train.learning_rate -> learning_rate)."""
    return key.rsplit(".", 1)[-1]


def value_text(value: object) -> str:
    """A hyperparameter value, short: 1.5e-04, 12, bf16, q_proj+v_proj."""
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
            return f"{value:.1e}"
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    if value is None:
        return "none"
    return str(value)


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard smooths a loss curve),
    so the first points are not pulled toward zero."""
    out: list[float] = []
    average = 0.0
    for n, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**n))
    return out


def thin(points: list[tuple[int, float]], limit: int) -> list[tuple[int, float]]:
    """At most `limit` points, evenly picked and always keeping the last one: a chart a few
    hundred cells wide cannot show more, and plotting costs grow with the points given."""
    if limit <= 0 or len(points) <= limit:
        return list(points)
    stride = len(points) / limit
    picked = [points[int(i * stride)] for i in range(limit - 1)]
    return picked + [points[-1]]
