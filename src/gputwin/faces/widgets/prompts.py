"""What the keys say: why an action does not apply now, and what a confirm dialog asks.

Pure (Rich text, no Textual), so the wording is tested without running the app. The launcher checks
again when it acts (the files may have moved on since the screen was drawn).
"""

from __future__ import annotations

from typing import Sequence

from rich.text import Text

from ...core.state import ArmState
from ...core.verdict import Verdict
from ...core.eta import eta, human_duration
from ..planview import plan_text
from ..formatting import is_number, sci

RUNNING = ("queued", "starting", "training", "validating", "stalled")
LOW_LR_SHARE = 0.05  # below this share of the peak, an extension's learning rate is worth a warning


def why_not(arm: ArmState, action: str) -> str | None:
    """The reason `action` (stop, extend, validate, resume) does not apply to `arm` now, or None."""
    name, status = arm.name, arm.status
    if action in ("stop", "validate") and status not in RUNNING:
        verb = "stop" if action == "stop" else "validate now (that needs its trainer running)"
        after = {"finished": " Press e to train it one more epoch.", "stopped": " Press R to resume it.",
                 "crashed": " Press R to resume it."}.get(status, "")
        return f"Cannot {verb}: {name} is {status}.{after}"
    if action == "validate" and status == "validating":
        return f"{name} is validating right now; its result appears when it is done."
    if action == "extend":
        if status == "crashed":
            return f"Cannot extend {name}: it crashed. Press R to resume it first, then extend."
        if not arm.steps_per_epoch or not arm.total_steps:
            return f"Cannot extend {name} yet: its trainer has not said how many steps an epoch is."
    if action == "resume":
        if status in RUNNING:
            return f"{name} is already running ({status}); nothing to resume."
        if status == "finished":
            return f"{name} finished its schedule; nothing to resume. Press e to train it one more epoch."
    return None


def stop_prompt(arm: ArmState) -> tuple[str, Text]:
    total = f" of {arm.total_steps:,}" if arm.total_steps else ""
    body = Text.assemble(
        "Stop ", (arm.name, "bold"), f" at step {arm.step:,}{total}?\n\n",
        "It finishes its current step, saves a checkpoint and exits. ",
        "R resumes it later from that checkpoint.",
    )
    return f"Stop {arm.name}", body


def extend_prompt(arm: ArmState, now: float, epochs: int = 1, extend_lr: float = 0.5) -> tuple[str, Text]:
    """New end step, when it would be reached, and what happens to the learning rate (the trainer's own
    plan, as numbers and a sparkline, when its started/extended events gave it)."""
    extra = arm.steps_per_epoch * epochs
    new_end = arm.total_steps + extra
    body = Text.assemble("Extend ", (arm.name, "bold"), f" by {epochs} epoch ({extra:,} steps)?\n\n")
    body.append(f"end step:   {arm.total_steps:,} → ")
    body.append(f"{new_end:,}\n", style="bold")
    mean = arm.mean_step_s
    if arm.ended:
        left = new_end - arm.step
        body.append(f"it is {arm.status}: it restarts from its last checkpoint", style="")
        if arm.last_checkpoint is not None:
            body.append(f" (step {arm.last_checkpoint.step:,})")
        if mean is not None:
            body.append(f"\ntraining time: about {human_duration(left * mean)} for {left:,} steps "
                        f"at the measured {mean:.2f} s/step, plus loading")
        body.append("\n")
    else:
        estimate = eta(arm, new_end, now)
        body.append("new end ETA: ")
        body.append(f"{estimate.clock} (in {estimate.human})" if estimate else "not known yet (measuring step time)",
                    style="bold")
        body.append("\n")
    peak = arm.hparams.get("train.learning_rate")
    if arm.lr_plan and is_number(peak) and peak > 0:
        body.append_text(plan_text(arm.lr_plan, arm.step, extra, float(peak), extend_lr))
        return f"Extend {arm.name} by {epochs} epoch", body
    scheduler = arm.hparams.get("train.scheduler", "linear")
    body.append("LR plan:    ")
    if scheduler == "constant":
        body.append(f"constant at {sci(arm.lr)} to the new end")
    else:
        body.append(f"{scheduler} decay goes on from the current {sci(arm.lr)} without a jump or a new warmup, "
                    f"stretched to end at step {new_end:,}")
        if is_number(arm.lr) and is_number(peak) and peak > 0 and arm.lr < LOW_LR_SHARE * peak:
            body.append(f"\nnote: the learning rate is down to {arm.lr / peak:.1%} of its peak {sci(peak)}, "
                        "so the added steps would change the adapter very little", style="bold yellow")
    return f"Extend {arm.name} by {epochs} epoch", body


def apply_prompt(verdict: Verdict, applied: Sequence[str] = ()) -> tuple[str, Text]:
    body = Text(verdict.headline + "\n\n", style="bold")
    if applied:
        body.append("Already done: " + "; ".join(applied) + ". Applying again extends again.\n\n", style="bold yellow")
    for action in verdict.actions:
        body.append(f"• {action.describe()}\n")
    body.append("\nStops take effect after the current step; an extended arm that had ended restarts "
                "from its last checkpoint.", style="italic")
    return f"Apply the verdict (scenario {verdict.scenario})", body
