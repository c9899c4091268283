"""The learning-rate plan as a pure function of the step: warmup, then linear/cosine decay or constant.

Steps are numbered from 1 (the first optimizer update is step 1). Warmup rises linearly to the peak
at step ``warmup_steps``; after it the decay follows a *progress* value from 0 towards 1 that never
quite reaches 1, so every update (the last one too) has a positive learning rate.

Extending a run must not make the learning rate jump or warm up again. The plan therefore carries an
*anchor*: the step where the current decay segment starts and the progress reached there. Extending
moves the anchor to the current step and stretches the remaining progress (anchor -> 1) over the new
remainder, so the lr is continuous and the decay still reaches its end. The plan is a small frozen
record that lives in every checkpoint and in the ``extended`` event.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

SCHEDULERS = ("linear", "cosine", "constant")


@dataclass(frozen=True)
class LrPlan:
    peak_lr: float
    warmup_steps: int
    scheduler: str
    total_steps: int
    anchor_step: int = -1  # -1: the decay segment starts where warmup ends (no extension yet)
    anchor_progress: float = 0.0

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; expected one of {SCHEDULERS}")
        if self.anchor_step < 0:
            object.__setattr__(self, "anchor_step", self.warmup_steps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LrPlan:
        return cls(peak_lr=float(d["peak_lr"]), warmup_steps=int(d["warmup_steps"]), scheduler=str(d["scheduler"]),
                   total_steps=int(d["total_steps"]), anchor_step=int(d["anchor_step"]),
                   anchor_progress=float(d["anchor_progress"]))


def progress_at(step: int, plan: LrPlan) -> float:
    """How far the decay has gone at `step` (0 at its start, approaching 1 at total_steps).

    Defined from the anchor on: steps before an extension's anchor are history (the event log has
    their lr), and the plan no longer describes them.
    """
    if step < plan.anchor_step:
        if step <= plan.warmup_steps:
            return 0.0
        raise ValueError(f"step {step} lies before the plan's anchor step {plan.anchor_step}")
    if step == plan.anchor_step:
        return plan.anchor_progress
    remaining = max(1, plan.total_steps - plan.anchor_step + 1)
    fraction = min(1.0, (step - plan.anchor_step) / remaining)
    return plan.anchor_progress + (1.0 - plan.anchor_progress) * fraction


def lr_at(step: int, plan: LrPlan) -> float:
    """The learning rate of update number `step` (1-based)."""
    if step <= plan.warmup_steps:
        return plan.peak_lr * max(step, 0) / max(1, plan.warmup_steps)
    if plan.scheduler == "constant":
        return plan.peak_lr
    progress = progress_at(step, plan)
    if plan.scheduler == "linear":
        return plan.peak_lr * (1.0 - progress)
    return plan.peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def extend_plan(plan: LrPlan, at_step: int, extra_steps: int) -> LrPlan:
    """The plan after adding `extra_steps` once `at_step` updates are done.

    lr_at(at_step) is unchanged (no jump, no new warmup); after it the remaining decay is stretched
    over the longer remainder. During warmup nothing needs anchoring: the decay has not started.
    """
    if extra_steps < 1:
        raise ValueError(f"extra_steps must be >= 1, got {extra_steps}")
    anchor = max(at_step, plan.anchor_step)
    return replace(plan, total_steps=plan.total_steps + extra_steps, anchor_step=anchor,
                   anchor_progress=progress_at(anchor, plan))
