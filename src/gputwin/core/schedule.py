"""The learning-rate plan as a pure function of the step: warmup, then linear/cosine decay, constant, or
warmup-stable-decay (wsd: the peak held, then a linear decay over the last `decay_steps`).

Steps are numbered from 1 (the first optimizer update is step 1). Warmup rises linearly to the peak
at step ``warmup_steps``; after it the decay follows a *progress* value from 0 towards 1 that never
quite reaches 1, so every update (the last one too) has a positive learning rate.

Extending a run must not make the learning rate jump or warm up again. The plan therefore carries an
*anchor*: the step where the current decay segment starts and the progress reached there. Extending
moves the anchor to the current step and stretches the remaining progress (anchor -> 1) over the new
remainder, so the lr is continuous and the decay still reaches its end. The plan is a small frozen
record that lives in every checkpoint and in the ``extended`` event.

Stretching is right while there is decay left to stretch. An arm that has finished, or is in the last
part of its decay, learns almost nothing from more steps at the LR where its decay ended, so extending
it starts a new *cycle* instead (``start_step``): a short warmup to a fraction of the original peak
(the experiment's ``rules.extend_lr``), then the arm's own decay shape over the added steps. A wsd arm
still in its stable phase just holds the peak longer (the decay moves to the new end); one already
decaying goes back to the checkpoint kept where its decay began (the trainer does that) and then holds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

SCHEDULERS = ("linear", "cosine", "constant", "wsd")
RESTART_FROM = 0.75  # an extension once this much of the decay is done starts a new cycle


@dataclass(frozen=True)
class LrPlan:
    peak_lr: float
    warmup_steps: int
    scheduler: str
    total_steps: int
    anchor_step: int = -1  # -1: the decay segment starts where warmup ends (no extension yet)
    anchor_progress: float = 0.0
    start_step: int = 0  # the cycle's warmup begins after this step (0, or where an extension restarted)
    decay_steps: int = 0  # wsd: the length of the final linear decay

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; expected one of {SCHEDULERS}")
        if self.anchor_step < 0:
            object.__setattr__(self, "anchor_step", self.start_step + self.warmup_steps)

    @property
    def warmup_end(self) -> int:
        return self.start_step + self.warmup_steps

    @property
    def decay_start(self) -> int:
        """The last step at the peak before the decay (wsd: the stable phase's last step)."""
        if self.scheduler == "wsd":
            return max(self.warmup_end, self.total_steps - self.decay_steps)
        return self.warmup_end

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LrPlan:
        return cls(peak_lr=float(d["peak_lr"]), warmup_steps=int(d["warmup_steps"]), scheduler=str(d["scheduler"]),
                   total_steps=int(d["total_steps"]), anchor_step=int(d["anchor_step"]),
                   anchor_progress=float(d["anchor_progress"]), start_step=int(d.get("start_step", 0)),
                   decay_steps=int(d.get("decay_steps", 0)))


def make_plan(peak_lr: float, warmup_steps: int, scheduler: str, total_steps: int,
              decay_fraction: float = 0.1) -> LrPlan:
    """A fresh plan; for wsd the decay takes the last `decay_fraction` of the steps after warmup."""
    decay = max(1, round(decay_fraction * max(1, total_steps - warmup_steps))) if scheduler == "wsd" else 0
    return LrPlan(peak_lr, warmup_steps, scheduler, total_steps, decay_steps=decay)


def progress_at(step: int, plan: LrPlan) -> float:
    """How far the decay has gone at `step` (0 at its start, approaching 1 at total_steps).

    Defined from the anchor on: steps before an extension's anchor are history (the event log has
    their lr), and the plan no longer describes them.
    """
    if plan.scheduler == "wsd":
        if step <= plan.decay_start:
            return 0.0
        return min(1.0, (step - plan.decay_start) / (plan.decay_steps + 1))
    if step < plan.anchor_step:
        if step <= plan.warmup_end:
            return 0.0
        raise ValueError(f"step {step} lies before the plan's anchor step {plan.anchor_step}")
    if step == plan.anchor_step:
        return plan.anchor_progress
    remaining = max(1, plan.total_steps - plan.anchor_step + 1)
    fraction = min(1.0, (step - plan.anchor_step) / remaining)
    return plan.anchor_progress + (1.0 - plan.anchor_progress) * fraction


def lr_at(step: int, plan: LrPlan) -> float:
    """The learning rate of update number `step` (1-based)."""
    if step <= plan.warmup_end:
        return plan.peak_lr * max(step - plan.start_step, 0) / max(1, plan.warmup_steps)
    if plan.scheduler == "constant":
        return plan.peak_lr
    progress = progress_at(step, plan)
    if plan.scheduler in ("linear", "wsd"):
        return plan.peak_lr * (1.0 - progress)
    return plan.peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def decay_done(step: int, plan: LrPlan) -> float:
    """The share of the current cycle's decay done after `step` updates: 0 before it starts, 1 at its end
    (a constant plan never decays: 0)."""
    if plan.scheduler == "constant" or step <= plan.decay_start:
        return 0.0
    if step >= plan.total_steps:
        return 1.0
    return progress_at(step, plan)


def restarts(plan: LrPlan, at_step: int) -> bool:
    """Would an extension now start a new cycle? (finished, or in the last part of a linear/cosine decay)"""
    if plan.scheduler == "constant":
        return False
    if plan.scheduler == "wsd":  # past its stable phase (and not taken back to it: wsd_rewind_step)
        return at_step > plan.decay_start
    return at_step >= plan.total_steps or decay_done(at_step, plan) >= RESTART_FROM


def wsd_rewind_step(plan: LrPlan, at_step: int) -> int | None:
    """For a wsd plan already past its stable phase: the step to go back to (where the decay began)."""
    if plan.scheduler == "wsd" and at_step > plan.decay_start:
        return plan.decay_start
    return None


def extend_plan(plan: LrPlan, at_step: int, extra_steps: int, *, restart_peak: float | None = None) -> LrPlan:
    """The plan after adding `extra_steps` once `at_step` updates are done.

    While there is decay left (restarts() is False), lr_at(at_step) is unchanged (no jump, no new
    warmup) and the remaining decay is stretched over the longer remainder; during warmup nothing needs
    anchoring. Past that, with `restart_peak` given, a new cycle starts at `at_step`: a warmup of about
    5% of the added steps to restart_peak, then the plan's decay shape to the new end. A wsd plan holds
    its peak longer; the caller rewinds one that is already decaying (wsd_rewind_step) first.
    """
    if extra_steps < 1:
        raise ValueError(f"extra_steps must be >= 1, got {extra_steps}")
    if plan.scheduler == "wsd" and at_step <= plan.decay_start:
        return replace(plan, total_steps=plan.total_steps + extra_steps)
    if restart_peak is not None and restarts(plan, at_step):
        warmup = max(1, round(0.05 * extra_steps))
        decay = 0
        if plan.scheduler == "wsd":  # the same share of the new cycle decays
            share = plan.decay_steps / max(1, plan.total_steps - plan.warmup_end)
            decay = max(1, round(share * (extra_steps - warmup)))
        return LrPlan(peak_lr=restart_peak, warmup_steps=warmup, scheduler=plan.scheduler,
                      total_steps=at_step + extra_steps, start_step=at_step, decay_steps=decay)
    if plan.scheduler == "wsd":
        raise ValueError(f"a wsd plan extended at step {at_step} is already decaying (from step "
                         f"{plan.decay_start}): go back to that step first, or give restart_peak")
    anchor = max(at_step, plan.anchor_step)
    return replace(plan, total_steps=plan.total_steps + extra_steps, anchor_step=anchor,
                   anchor_progress=progress_at(anchor, plan))


def lr_curve(plan: LrPlan, from_step: int, to_step: int, points: int = 24) -> list[float]:
    """lr_at sampled at `points` steps from from_step to to_step (for a sparkline of a plan)."""
    if to_step <= from_step:
        return [lr_at(max(from_step, 1), plan)]
    span = to_step - from_step
    steps = sorted({from_step + round(span * i / (points - 1)) for i in range(points)})
    return [lr_at(max(step, 1), plan) for step in steps]


def extension_preview(plan: LrPlan, at_step: int, extra_steps: int, *, profile_peak: float,
                      extend_lr: float) -> dict[str, Any]:
    """What extending by `extra_steps` at `at_step` would do to the LR, as numbers (for the extend dialog,
    `gputwin extend` and the `extended` event): LR now, the new plan's peak and end, its steps, and a curve."""
    new = extend_plan(plan, at_step, extra_steps, restart_peak=profile_peak * extend_lr)
    curve = lr_curve(new, at_step, new.total_steps)
    new_cycle = restarts(plan, at_step)
    return {"new_cycle": new_cycle, "lr_now": lr_at(max(at_step, 1), plan),
            "lr_peak": new.peak_lr if new_cycle else max(curve),
            "lr_end": lr_at(new.total_steps, new), "steps": new.total_steps - at_step, "total_steps": new.total_steps,
            "curve": curve, "plan": new, "profile_peak": profile_peak}
