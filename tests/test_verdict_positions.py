"""The verdict where arms stand at different points of their LR schedules: cooled scores are compared,
and a raw comparison never stops the arm that is still mid-schedule."""

from __future__ import annotations

import json
from dataclasses import replace

from gputwin.profiles import Rules
from gputwin.verdict import A, B, SAMPLE_ONLY, ArmResult, decide
from test_verdict import GOLD, outcomes, result

RULES = Rules(baseline="conservative", extend_epochs=1, bootstrap_resamples=1000)
MID = {"lr_fraction": 0.5, "decay_done": 0.5, "probe_steps": 88}
END = {"lr_fraction": 0.001, "decay_done": 1.0, "probe_steps": 0}


def scored(seed: int, recall: float, precision: float, schedule: dict | None) -> ArmResult:
    extra = {"schedule": schedule} if schedule is not None else {}
    return result(outcomes(seed, recall, precision, gold=GOLD), **extra)


def cooled(raw: ArmResult, seed: int, recall: float, precision: float) -> ArmResult:
    cool = scored(seed, recall, precision, {"lr_fraction": 0.0, "decay_done": 1.0})
    cool = replace(cool, validation={**cool.validation, "probe": {"steps": 88, "lr_from": 5e-5, "train_seconds": 2.5}})
    return replace(raw, cooled=cool)


def test_a_raw_comparison_does_not_stop_the_arm_still_mid_schedule() -> None:
    """What happened on a real model: aggressive at the end of its decay, conservative at half its peak LR."""
    arms = {"conservative": scored(1, 0.78, 0.80, MID), "aggressive": scored(2, 0.90, 0.90, END)}
    v = decide(arms, RULES)
    assert v.scenario == B and v.winner is None and v.leader == "aggressive"
    assert all(a.kind == "continue" for a in v.actions)
    assert any("different points of their LR schedules" in r and "conservative at LR 50% of its peak" in r
               and "aggressive at the end of its decay" in r for r in v.reasons)
    assert any("does not recommend stopping conservative" in r for r in v.reasons)
    assert v.headline.startswith("B: uncertain - aggressive leads")
    assert v.metrics["conservative"]["schedule"]["lr_fraction"] == 0.5


def test_the_same_scores_at_the_same_position_still_call_a_winner() -> None:
    arms = {"conservative": scored(1, 0.78, 0.80, END), "aggressive": scored(2, 0.90, 0.90, END)}
    v = decide(arms, RULES)
    assert v.scenario == A and v.winner == "aggressive"
    assert SAMPLE_ONLY in v.reasons and "final goal" in v.reasons[-1]


def test_the_verdict_compares_the_cooled_score_and_shows_the_raw_beside_it() -> None:
    raw = scored(1, 0.70, 0.72, MID)
    arms = {"conservative": cooled(raw, 3, 0.90, 0.90), "aggressive": scored(2, 0.90, 0.90, END)}
    v = decide(arms, RULES)
    m = v.metrics["conservative"]
    assert m["cooled"]["steps"] == 88 and m["f1"]["value"] > 0.85  # the cooled figures are the compared ones
    assert v.scenario == B and v.comparisons["aggressive"]["outcome"] == "close"  # cooled: a tie, not A
    assert any("cooled down over 88 steps" in r for r in v.reasons)
    assert not any("different points" in r for r in v.reasons)  # finished against cooled is a fair pair
    json.dumps(v.to_dict())


def test_a_cooled_arm_that_stays_behind_is_stopped_as_before() -> None:
    raw = scored(1, 0.60, 0.62, MID)
    arms = {"conservative": cooled(raw, 3, 0.65, 0.66), "aggressive": scored(2, 0.92, 0.92, END)}
    v = decide(arms, RULES)
    assert v.scenario == A and v.winner == "aggressive"
    assert [a.describe() for a in v.actions] == ["stop conservative", "extend aggressive by 1 epoch"]


def test_without_schedule_information_nothing_changes() -> None:
    arms = {"conservative": scored(1, 0.78, 0.80, None), "aggressive": scored(2, 0.90, 0.90, None)}
    assert decide(arms, RULES).scenario == A
