"""The learning-rate plan: warmup, decay shapes, and extensions that keep the lr continuous."""

from __future__ import annotations

import math

import pytest

from gputwin.core.schedule import LrPlan, extend_plan, lr_at


def lrs(plan: LrPlan, first: int, last: int) -> list[float]:
    return [lr_at(k, plan) for k in range(first, last + 1)]


def test_warmup_rises_linearly_to_the_peak() -> None:
    plan = LrPlan(peak_lr=1e-3, warmup_steps=4, scheduler="linear", total_steps=20)
    assert lrs(plan, 1, 4) == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])


@pytest.mark.parametrize("scheduler", ["linear", "cosine"])
def test_decay_falls_every_step_and_every_update_has_a_positive_lr(scheduler: str) -> None:
    plan = LrPlan(peak_lr=1e-3, warmup_steps=3, scheduler=scheduler, total_steps=30)
    values = lrs(plan, 3, 30)
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] > 0
    assert values[-1] < 1e-3 / 20


def test_linear_decay_ends_one_step_short_of_zero() -> None:
    plan = LrPlan(peak_lr=1.0, warmup_steps=0, scheduler="linear", total_steps=9)
    assert lrs(plan, 1, 9) == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])


def test_constant_stays_at_the_peak_after_warmup() -> None:
    plan = LrPlan(peak_lr=2e-4, warmup_steps=2, scheduler="constant", total_steps=10)
    assert lrs(plan, 2, 10) == [2e-4] * 9


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("at_step", [5, 17, 40])
def test_extension_keeps_the_lr_continuous_and_stretches_the_decay(scheduler: str, at_step: int) -> None:
    plan = LrPlan(peak_lr=1e-3, warmup_steps=10, scheduler=scheduler, total_steps=40)
    longer = extend_plan(plan, at_step, 40)
    assert longer.total_steps == 80
    # no jump at the moment of extension, no new warmup
    assert lr_at(at_step, longer) == pytest.approx(lr_at(at_step, plan))
    after = lrs(longer, max(at_step, 10), 80)  # from the end of warmup on
    assert all(a >= b for a, b in zip(after, after[1:]))
    if scheduler == "constant":
        assert after[-1] == pytest.approx(1e-3)
        return
    # the step after the extension decays by less than the old plan would have (stretched, not cut)
    if at_step < 40:
        assert lr_at(at_step, plan) - lr_at(at_step + 1, longer) <= lr_at(at_step, plan) - lr_at(at_step + 1, plan)
    # the decay still reaches its end at the new last step: what is left is one step's worth
    assert after[-1] < after[0] / 20 and after[-1] > 0


def test_extension_during_warmup_changes_only_the_end() -> None:
    plan = LrPlan(peak_lr=1e-3, warmup_steps=10, scheduler="linear", total_steps=20)
    longer = extend_plan(plan, 4, 10)
    assert lrs(longer, 1, 10) == lrs(plan, 1, 10)
    assert longer == LrPlan(peak_lr=1e-3, warmup_steps=10, scheduler="linear", total_steps=30)


def test_linear_extension_continues_on_a_straight_line_to_the_new_end() -> None:
    plan = LrPlan(peak_lr=1.0, warmup_steps=0, scheduler="linear", total_steps=9)
    longer = extend_plan(plan, 6, 6)  # lr 0.4 at step 6, 9 steps left instead of 3
    after = lrs(longer, 6, 15)
    steps = [a - b for a, b in zip(after, after[1:])]
    assert after[0] == pytest.approx(0.4)
    assert steps == pytest.approx([0.04] * 9)


def test_two_extensions_compose_and_survive_a_round_trip_through_a_dict() -> None:
    plan = LrPlan(peak_lr=1e-3, warmup_steps=5, scheduler="cosine", total_steps=50)
    once = extend_plan(plan, 30, 50)
    twice = extend_plan(once, 70, 50)
    assert lr_at(70, twice) == pytest.approx(lr_at(70, once))
    assert LrPlan.from_dict(twice.to_dict()) == twice
    assert math.isclose(lr_at(150, twice), lr_at(150, LrPlan.from_dict(twice.to_dict())))


def test_history_before_the_anchor_is_not_described() -> None:
    longer = extend_plan(LrPlan(1e-3, 2, "linear", 20), 10, 10)
    with pytest.raises(ValueError, match="before the plan's anchor"):
        lr_at(5, longer)


def test_bad_plans_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown scheduler"):
        LrPlan(1e-3, 0, "exponential", 10)
    with pytest.raises(ValueError, match="extra_steps"):
        extend_plan(LrPlan(1e-3, 0, "linear", 10), 5, 0)
