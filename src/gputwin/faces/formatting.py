"""Numbers as the screen shows them, each with its unit.

Pure string helpers shared by the widgets, `gputwin status` and the plan preview; no Textual here, so they are tested as plain functions.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..core.verdict import pct

GIB = 1024**3

STATUS_STYLE = {
    "queued": "magenta",
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


def status_text(arm: object) -> str:
    """An arm's status in words; a queued arm on a Ray cluster with its place ("queued 2/3": second of three)."""
    status = str(getattr(arm, "status", ""))
    place, length = getattr(arm, "queue_place", None), getattr(arm, "queue_length", None)
    if status == "queued" and place:
        return f"queued {place}/{length}" if length else f"queued {place}"
    return status


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def num(value: object, digits: int = 4) -> str:
    """A plain figure, or an en dash when there is none yet."""
    return f"{value:.{digits}f}" if is_number(value) else "–"


def sci(value: object) -> str:
    """Learning rates read best in scientific notation (1.5e-04)."""
    return f"{value:.2e}" if is_number(value) else "–"


def percent(fraction: object, digits: int = 1) -> str:
    """A fraction (0.861) as a percentage (86.1%); a dash when there is none."""
    return pct(float(fraction), digits) if is_number(fraction) else "–"


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


def steps(done: object, total: object) -> str:
    """Progress in steps (167/879 steps)."""
    d = f"{done:,}" if isinstance(done, int) else "–"
    t = f"{total:,}" if isinstance(total, int) else "?"
    return f"{d}/{t} steps"


def device_label(device: object) -> str:
    """A device as people name it: GPU 0, or CPU ("cuda:1 NVIDIA H200" -> GPU 1)."""
    if device is None or device == "cpu" or device == "":
        return "CPU"
    if isinstance(device, int) and not isinstance(device, bool):
        return f"GPU {device}"
    text = str(device).split()[0]
    if text.startswith("cuda:"):
        return f"GPU {text.removeprefix('cuda:')}"
    if text == "cuda":
        return "GPU 0"
    return text.upper() if text.lower() == "cpu" else text


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


# Hyperparameters every arm shows (pane, `gputwin status`), with the short names people use for them.
SHOWN_KEYS = {
    "train.learning_rate": "lr",
    "lora.r": "r",
    "lora.alpha": "alpha",
    "train.batch_size": "batch",
    "train.epochs": "epochs",
}
NOT_SHOWN = {"device", "name", "source"}  # the device is shown with the status already


def shown_hparams(hparams: dict[str, object], differing: list[str]) -> list[tuple[str, str, bool]]:
    """(label, value, differs between arms) for the usual keys, then every other key that differs."""
    keys = [k for k in SHOWN_KEYS if k in hparams]
    keys += [k for k in differing if k not in SHOWN_KEYS and k not in NOT_SHOWN and k in hparams]
    return [(SHOWN_KEYS.get(k, k), value_text(hparams[k]), k in differing) for k in keys]


def step_ticks(first: int, last: int, count: int = 5) -> list[int]:
    """Round step numbers (0, 200, 400, ...) for a chart axis from `first` to `last`, at most `count`+1."""
    span = last - first
    if span <= 0:
        return [first]
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    step = max(1, int(round(step)))
    start = -(-first // step) * step
    return list(range(start, last + 1, step))


def display_path(path: Path | str, cwd: Path | None = None) -> str:
    """A path as short as it can be told: relative to the working folder when inside it, else with ~."""
    path = Path(path)
    cwd = cwd or Path.cwd()
    try:
        return str(path.relative_to(cwd))
    except ValueError:
        pass
    home = Path.home()
    try:
        return "~/" + str(path.relative_to(home))
    except ValueError:
        return str(path)


def shorten_paths(text: str, root: Path | str, cwd: Path | None = None) -> str:
    """Messages from other modules name files by absolute path; within a pane the short form reads better."""
    root = str(root)
    short = display_path(root, cwd)
    return text if short == root else text.replace(root, short)
