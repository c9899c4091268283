"""An extension's LR plan in words, numbers and a sparkline: the extend dialog and `gputwin extend` say
what the trainer will do (gputwin.core.schedule.extension_preview is the same function it uses)."""

from __future__ import annotations

import json
from typing import Any

from rich.text import Text

from ..core.sparkline import sparkline
from ..core.schedule import LrPlan, extension_preview
from .formatting import sci


def plan_text(lr_plan: dict[str, Any], step: int, extra: int, peak: float, extend_lr: float) -> Text:
    """What extending by `extra` steps after `step` does to the LR (lr_plan: the arm's, from its events)."""
    preview = extension_preview(LrPlan.from_dict(lr_plan), step, extra, profile_peak=peak, extend_lr=extend_lr)
    new = preview["plan"]
    text = Text("LR plan:    ")
    if preview["new_cycle"]:
        text.append(f"a new cycle: warmup over {new.warmup_steps:,} steps to {sci(preview['lr_peak'])} "
                    f"({extend_lr:.0%} of its peak {sci(peak)}), then {new.scheduler} decay", style="bold")
    elif new.scheduler == "constant":
        text.append(f"constant at {sci(preview['lr_now'])} to the new end")
    elif new.scheduler == "wsd" and step <= new.decay_start:
        text.append(f"holds {sci(new.peak_lr)} to step {new.decay_start:,}, then decays over {new.decay_steps:,} steps")
    else:
        text.append(f"{new.scheduler} decay goes on from the current {sci(preview['lr_now'])}, stretched to the new end")
    text.append(f"\n            LR now {sci(preview['lr_now'])} · peak {sci(preview['lr_peak'])} · "
                f"end {sci(preview['lr_end'])} · {preview['steps']:,} steps\n            ")
    text.append(sparkline(preview["curve"]), style="cyan")
    text.append(f"  step {step:,} → {new.total_steps:,}")
    return text


def arm_plan_text(experiment_json: Any, events_path: Any, arm: str, epochs: int) -> Text | None:
    """plan_text for an arm as its files stand (None when its log has no LR plan yet, e.g. a callback arm)."""
    from ..core import events as ev
    from ..core import state as st

    try:
        experiment = json.loads(experiment_json.read_text(encoding="utf-8"))
        profile = next(a for a in experiment["arms"] if a["name"] == arm)
        peak = float(profile["train"]["learning_rate"])
        extend_lr = float(experiment.get("rules", {}).get("extend_lr", 0.5))
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None
    folded = st.fold(arm, ev.read_events(events_path).events)
    if not folded.lr_plan or not folded.steps_per_epoch:
        return None
    return plan_text(folded.lr_plan, folded.step, folded.steps_per_epoch * epochs, peak, extend_lr)
