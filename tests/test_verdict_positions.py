"""The verdict where arms stand at different points of their LR schedules: cooled scores are compared,
and a raw comparison never stops the arm that is still mid-schedule."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from gputwin.core.profiles import Rules
from gputwin.core.verdict import A, B, SAMPLE_ONLY, ArmResult, decide
from test_verdict import GOLD, outcomes, result

REPO = Path(__file__).resolve().parents[1]
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


# ---------------------------------------------------------------- replicates: the run-to-run noise


def test_replicates_widen_the_interval_by_the_spread_between_runs() -> None:
    runs = {"conservative": scored(1, 0.80, 0.80, END), "conservative-seed43": scored(5, 0.86, 0.86, END),
            "aggressive": scored(2, 0.84, 0.84, END), "aggressive-seed43": scored(6, 0.78, 0.78, END)}
    replicate_of = {"conservative-seed43": "conservative", "aggressive-seed43": "aggressive"}
    alone = decide({k: runs[k] for k in ("conservative", "aggressive")}, RULES)
    grouped = decide(runs, RULES, replicate_of=replicate_of)
    width = lambda v: v.comparisons["aggressive"]["f1"]["high"] - v.comparisons["aggressive"]["f1"]["low"]  # noqa: E731
    assert width(grouped) > 1.5 * width(alone)
    assert set(grouped.metrics) == {"conservative", "aggressive"} and len(grouped.metrics["aggressive"]["runs"]) == 2
    assert any("run-to-run noise of training: conservative over 2 runs" in r for r in grouped.reasons)
    assert SAMPLE_ONLY not in grouped.reasons and SAMPLE_ONLY in alone.reasons


def test_a_stopped_arm_stops_with_its_replicates_and_a_pending_replicate_is_waited_for() -> None:
    runs = {"conservative": scored(1, 0.60, 0.60, END), "conservative-seed43": scored(5, 0.61, 0.61, END),
            "aggressive": scored(2, 0.92, 0.92, END), "aggressive-seed43": scored(6, 0.91, 0.91, END)}
    replicate_of = {"conservative-seed43": "conservative", "aggressive-seed43": "aggressive"}
    v = decide(runs, RULES, replicate_of=replicate_of)
    assert v.scenario == A and [a.describe() for a in v.actions] == [
        "stop conservative", "extend aggressive by 1 epoch", "stop conservative-seed43"]
    waiting = decide({**runs, "aggressive-seed43": None}, RULES, replicate_of=replicate_of)
    assert waiting.scenario == "waiting" and "aggressive-seed43" in waiting.waiting


def test_with_replicates_adds_seeded_copies_of_every_arm() -> None:
    from gputwin.core.profiles import load_experiment, with_replicates

    exp = load_experiment(REPO / "profiles" / "seed.toml", check_files=False)
    more = with_replicates(exp, 1)
    assert [a.name for a in more.arms] == ["conservative", "conservative-seed43", "aggressive", "aggressive-seed43"]
    copy = more.arms[1]
    assert copy.replicate_of == "conservative" and copy.train.seed == 43 and copy.device == exp.arms[0].device
    assert more.rules.replicates == 1 and with_replicates(more, 1) == more
    assert "replicate_of" not in exp.arms[0].to_dict() and copy.to_dict()["replicate_of"] == "conservative"
    assert with_replicates(exp) == exp  # rules.replicates = 0


def test_at_the_milestone_a_finished_arm_that_should_continue_is_extended_while_the_other_trains() -> None:
    from gputwin.core.verdict import account_for_ended

    arms = {"conservative": cooled(scored(1, 0.70, 0.72, MID), 3, 0.90, 0.90), "aggressive": scored(2, 0.90, 0.90, END)}
    v = account_for_ended(decide(arms, RULES), {"aggressive": "finished"}, extend_epochs=1)
    assert [a.describe() for a in v.actions] == ["let conservative continue to the end of its schedule",
                                                  "extend aggressive by 1 epoch"]
    assert v.headline.endswith("let conservative continue to the end of its schedule, extend aggressive by 1 epoch")
    assert any("aggressive has finished its schedule while conservative trains on" in r for r in v.reasons)
    final = account_for_ended(replace(decide(arms, RULES), stage="final"), {"aggressive": "finished"})
    assert not [a for a in final.actions if a.kind == "extend"]  # the final comparison extends nothing
