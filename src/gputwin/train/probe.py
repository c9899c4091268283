"""The cooldown probe: what an arm would score if its schedule ended now.

A milestone score depends on where the arm stands in its LR schedule: an arm at the end of its decay
looks better than one mid-schedule that will end better (the seed's own plan compares a 1-epoch arm at
LR ~0 with a 2-epoch arm at half its peak). When an arm is validated while its LR is still well above
the end of its decay, the probe trains a short side branch from the arm's exact state, on the arm's
next batches, with the LR falling linearly from its current value towards 0, validates it, and puts
everything back in place: trainable weights, optimizer state, RNG (the data position never moves). The
live arm then continues exactly as if no probe had run, and the verdict compares finished-or-cooled
arms against each other.

Everything is restored in place (copy_ into the same tensors), so the fast engine's captured CUDA
graphs stay valid; the probe holds one extra copy of the trainable weights and optimizer state (a few
MB for LoRA), not a second model.
"""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Any, Iterator

import torch

from .checkpoint import rng_states, set_rng_states

PROBE_ABOVE = 0.1  # probe when the LR is above this share of its peak
PROBE_SHARE = 0.1  # default length: this share of the steps done


def probe_steps(setting: int | None, steps_done: int) -> int:
    """milestone.cooldown_steps: None = 10% of the steps done (at least 1), 0 = off."""
    if setting is not None:
        return setting
    return max(1, round(PROBE_SHARE * steps_done))


def wanted(lr_fraction: float, setting: int | None, steps_done: int) -> int:
    """How many cooldown steps to probe with now (0: no probe; the LR is near the end of its decay)."""
    return probe_steps(setting, steps_done) if lr_fraction > PROBE_ABOVE else 0


def cooldown_lrs(lr_from: float, steps: int) -> list[float]:
    """Linear from the current LR towards 0: lr_from, ..., lr_from / steps."""
    return [lr_from * (steps - k) / steps for k in range(steps)]


@contextlib.contextmanager
def side_branch(model: Any, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Whatever the block does to the trainable weights, optimizer state, LR and RNG is undone after it."""
    params = [p for p in model.parameters() if p.requires_grad]
    weights = [p.detach().clone() for p in params]
    state = {p: {k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in optimizer.state[p].items()}
             for p in params if p in optimizer.state}
    lrs = [g["lr"].detach().clone() if torch.is_tensor(g["lr"]) else g["lr"] for g in optimizer.param_groups]
    rng = rng_states()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, saved in zip(params, weights):
                p.copy_(saved)
            for p in params:
                if p not in state:
                    optimizer.state.pop(p, None)
                    continue
                live = optimizer.state[p]
                for key, saved in state[p].items():
                    current = live.get(key)
                    if torch.is_tensor(saved) and torch.is_tensor(current) and current.shape == saved.shape:
                        current.copy_(saved)  # the same tensor: a captured graph keeps pointing at it
                    else:
                        live[key] = saved
            for group, lr in zip(optimizer.param_groups, lrs):
                if torch.is_tensor(group["lr"]) and torch.is_tensor(lr):
                    group["lr"].copy_(lr)
                else:
                    group["lr"] = lr
        model.zero_grad(set_to_none=True)
        set_rng_states(rng)


def train_cooldown(run: Any, batches: Any, epoch: int, index: int, lr_from: float, steps: int) -> dict[str, Any]:
    """`steps` updates on the arm's next batches (from epoch/index on), LR linear from lr_from towards 0.
    Call inside side_branch. Returns the losses and the time it took (and the engine's captures and eager steps
    meanwhile, where it has graphs)."""
    started = time.perf_counter()
    branch = []
    for _ in range(steps):
        branch.append([run.examples[i] for i in batches.indices(epoch, index)])
        epoch, index = (epoch + 1, 0) if index + 1 >= run.steps_per_epoch else (epoch, index + 1)
    plan = getattr(run.engine, "plan", None)
    if plan is not None:  # an engine that plans its shapes (train/shapeplan.py): these steps may be new to it
        plan(branch)
    graphs = getattr(run.engine, "graphs", None)  # its CUDA graphs (train/graphs.py), where the engine has them
    before = graphs.summary() if graphs is not None else None
    losses, pending = [], None
    for lr, examples in zip(cooldown_lrs(lr_from, steps), branch):
        issued = run.engine.step(run.engine.collate(examples), lr)
        if pending is not None:  # each loss read once the next step is issued, as the training loop reads it
            losses.append(pending.result().loss)
        pending = issued
    if pending is not None:
        losses.append(pending.result().loss)
    out = {"losses": losses, "seconds": round(time.perf_counter() - started, 3)}
    if before is not None:  # what the branch's new shapes cost: its eager steps and captures
        after = graphs.summary()
        out["graphs"] = {key: round(after[key] - before[key], 3) for key in ("captures", "capture_seconds", "eager_steps")}
    return out
