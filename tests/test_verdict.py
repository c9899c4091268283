"""The verdict: each scenario reached from crafted results, refusals, ranking, and soundness by simulation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from gputwin.core.profiles import Rules
from gputwin.core.verdict import A, B, C, MISMATCH, WAITING, Action, ArmResult, decide

RULES = Rules(baseline="conservative", extend_epochs=2, bootstrap_resamples=1000)


def outcomes(seed: int, recall: float, precision: float, n: int = 500, gold: np.ndarray | None = None) -> np.ndarray:
    """Per-sample [tp, fp, fn] with the wanted expected recall and precision."""
    rng = np.random.default_rng(seed)
    gold = rng.poisson(3, n) if gold is None else gold
    tp = rng.binomial(gold, recall)
    return np.stack([tp, rng.poisson(gold * recall * (1 - precision) / precision), gold - tp], axis=1)


def result(counts: np.ndarray, step: int = 879, **extra) -> ArmResult:
    tp, fp, fn = (int(x) for x in counts.sum(axis=0))
    validation = {"per_sample": counts.tolist(), "indices": list(range(len(counts))), "tp": tp, "fp": fp, "fn": fn,
                  "macro_f1": 0.5, **extra}
    return ArmResult(step=step, validation=validation)


GOLD = np.random.default_rng(0).poisson(3, 500)


def arms(**quality: tuple[float, float]) -> dict[str, ArmResult]:
    return {name: result(outcomes(i + 1, r, p, gold=GOLD)) for i, (name, (r, p)) in enumerate(quality.items())}


def test_a_challenger_clearly_better_and_meets_targets():
    v = decide(arms(conservative=(0.78, 0.80), aggressive=(0.90, 0.90)), RULES)
    assert v.scenario == A and v.winner == "aggressive"
    assert v.actions == (Action("stop", "conservative"), Action("extend", "aggressive", 2))
    assert v.actions[1].describe() == "extend aggressive by 2 epochs"
    diff = v.comparisons["aggressive"]["f1"]["diff"]
    assert v.comparisons["aggressive"]["outcome"] == "better" and diff > 0.08
    assert f"{diff * 100:+.1f} points" in v.reasons[0] and "meets the targets" in v.reasons[1]
    assert v.headline.startswith("A: aggressive is clearly better")
    json.dumps(v.to_dict())


def test_better_but_missing_targets_is_b_with_a_leader():
    v = decide(arms(conservative=(0.62, 0.70), aggressive=(0.72, 0.78)), RULES)
    assert v.scenario == B and v.winner is None and v.leader == "aggressive"
    assert {a.kind for a in v.actions} == {"continue"}
    assert any("misses the targets" in r and "85.0%" in r for r in v.reasons)


def test_b_too_close_when_the_interval_covers_zero():
    v = decide(arms(conservative=(0.80, 0.80), aggressive=(0.80, 0.80)), RULES)
    comp = v.comparisons["aggressive"]
    assert v.scenario == B and v.winner is None and v.leader is None
    assert comp["outcome"] == "close" and comp["f1"]["low"] <= 0 <= comp["f1"]["high"]
    assert v.actions == (Action("continue", "conservative"), Action("continue", "aggressive"))
    assert any("too close to call" in r and "includes zero" in r for r in v.reasons)


def test_b_too_close_when_significant_but_under_the_margin():
    big_gold = np.random.default_rng(1).poisson(3, 20000)
    base = result(outcomes(1, 0.80, 0.80, gold=big_gold))
    challenger = result(outcomes(2, 0.82, 0.82, gold=big_gold))
    v = decide({"conservative": base, "aggressive": challenger}, RULES)
    comp = v.comparisons["aggressive"]
    assert comp["f1"]["low"] > 0 and comp["f1"]["diff"] < RULES.close_margin
    assert v.scenario == B and comp["outcome"] == "close" and comp["samples_needed"] is None
    assert any("3.0-point margin" in r for r in v.reasons)


def test_tie_reports_samples_needed():
    gold = np.random.default_rng(0).poisson(3, 100)  # few samples: +4 points is not yet clear
    v = decide({"conservative": result(outcomes(3, 0.80, 0.80, gold=gold)),
                "aggressive": result(outcomes(13, 0.85, 0.85, gold=gold))}, RULES)
    comp = v.comparisons["aggressive"]
    assert comp["f1"]["diff"] >= RULES.close_margin and comp["f1"]["low"] < 0
    assert comp["outcome"] == "close"
    assert comp["samples_needed"] is not None and comp["samples_needed"] > 100
    assert any(f"About {comp['samples_needed']:,} samples" in r for r in v.reasons)


def test_c_baseline_better():
    v = decide(arms(conservative=(0.88, 0.88), aggressive=(0.75, 0.78)), RULES)
    assert v.scenario == C and v.winner == "conservative"
    assert v.actions == (Action("stop", "aggressive"), Action("continue", "conservative"))
    assert v.comparisons["aggressive"]["outcome"] == "worse"


def test_waiting_names_the_arm_and_its_eta():
    done = arms(conservative=(0.8, 0.8))["conservative"]
    eta = "step 167/879, ETA 14:32 (in 1h 12m)"
    v = decide({"conservative": done, "aggressive": None}, RULES, waiting={"aggressive": eta})
    assert v.scenario == WAITING and v.winner is None and v.actions == ()
    assert v.headline == f"waiting for aggressive: {eta}"
    assert v.waiting == {"aggressive": eta}
    assert "conservative" in v.metrics and "aggressive" not in v.metrics
    assert any(eta in r for r in v.reasons)


def test_goal_status_per_arm():
    v = decide(arms(conservative=(0.80, 0.80), aggressive=(0.95, 0.95)), RULES)
    assert v.goal["aggressive"] == {"precision": True, "recall": True, "f1": True, "met": True}
    assert v.goal["conservative"]["met"] is False
    assert "is met by aggressive" in v.reasons[-1]


@pytest.mark.parametrize("change, message", [
    ({"step": 900}, "at step 879 and aggressive at step 900"),
    ({"indices": list(range(1, 501))}, "different samples"),
    ({"rows": 400}, "on 500 samples and aggressive on 400"),
    ({"test_data": "other.jsonl"}, "different test files"),
])
def test_mismatched_results_are_refused(change, message):
    base = result(outcomes(1, 0.8, 0.8), test_data="test.jsonl")
    counts = outcomes(2, 0.9, 0.9, n=change.get("rows", 500))
    other = result(counts, step=change.get("step", 879), test_data=change.get("test_data", "test.jsonl"))
    if "indices" in change:
        other = ArmResult(879, {**other.validation, "indices": change["indices"]})
    v = decide({"conservative": base, "aggressive": other}, RULES)
    assert v.scenario == MISMATCH and v.winner is None and v.actions == ()
    assert message in v.headline and v.reasons[0].startswith("Cannot compare")


def test_same_epoch_at_different_steps_is_comparable():
    base = ArmResult(879, result(outcomes(1, 0.8, 0.8)).validation, epoch=1.0)
    other = ArmResult(440, result(outcomes(2, 0.8, 0.8)).validation, epoch=1.0)
    assert decide({"conservative": base, "aggressive": other}, RULES).scenario == B


def test_more_arms_ranked_against_the_baseline():
    v = decide(arms(conservative=(0.78, 0.78), good=(0.87, 0.87), best=(0.94, 0.94), bad=(0.65, 0.70)), RULES)
    assert v.scenario == A and v.winner == "best"
    assert v.confidence == pytest.approx(1 - 0.05 / 3)
    assert {c: v.comparisons[c]["outcome"] for c in ("good", "best", "bad")} == \
        {"good": "better", "best": "better", "bad": "worse"}
    assert v.actions == (Action("stop", "conservative"), Action("stop", "good"), Action("stop", "bad"),
                         Action("extend", "best", 2))


def test_more_arms_without_a_winner_stop_only_the_worse():
    v = decide(arms(conservative=(0.80, 0.80), same=(0.80, 0.80), bad=(0.65, 0.70)), RULES)
    assert v.scenario == B
    assert v.actions == (Action("stop", "bad"), Action("continue", "conservative"), Action("continue", "same"))


def test_decide_is_deterministic_and_refuses_a_missing_baseline():
    inputs = arms(conservative=(0.8, 0.8), aggressive=(0.82, 0.82))
    assert decide(inputs, RULES).to_dict() == decide(inputs, RULES).to_dict()
    with pytest.raises(ValueError, match="baseline"):
        decide(inputs, Rules(baseline="nobody"))


# ---------------------------------------------------------------- soundness (bench/soundness.py, fewer trials)


def _soundness():
    path = Path(__file__).parent.parent / "bench" / "soundness.py"
    spec = importlib.util.spec_from_file_location("soundness_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_winner_on_noise_and_a_real_difference_is_found():
    bench = _soundness()
    null = bench.run_trials(0.0, 500, 150, seed=11, resamples=1000)
    assert null["called"] <= 0.05
    power = bench.run_trials(0.05, 500, 60, seed=12, resamples=1000)
    assert power["right"] >= 0.85


def test_actions_on_arms_that_already_ended_are_dropped_with_a_reason() -> None:
    from gputwin.core.verdict import CONTINUE, EXTEND, STOP, Action, Verdict, account_for_ended

    verdict = Verdict(scenario="A", headline="A: new is better - stop base, extend new by 1 epoch", baseline="base",
                      winner="new",
                      actions=(Action(STOP, "base"), Action(EXTEND, "new", 1), Action(CONTINUE, "other")))
    adjusted = account_for_ended(verdict, {"base": "finished", "new": "finished", "other": "stopped"})
    assert [(a.kind, a.arm) for a in adjusted.actions] == [(EXTEND, "new")]
    assert adjusted.headline == "A: new is better - extend new by 1 epoch"
    assert any("base has already ended (finished)" in r for r in adjusted.reasons)
    assert any("other is stopped; resume it" in r for r in adjusted.reasons)
    finished = account_for_ended(Verdict(scenario="B", headline="h", baseline="base",
                                         actions=(Action(CONTINUE, "base"),)), {"base": "finished"})
    assert finished.actions == () and "extend it to train on" in finished.reasons[-1]
    assert account_for_ended(verdict, {}) is verdict


def test_final_stage_compares_arms_that_ended_at_different_steps() -> None:
    """Scenario B's "let it finish and compare again": the baseline at step 1758 against the challenger at 879."""
    import random

    from gputwin.core.profiles import Rules
    from gputwin.core.verdict import ArmResult, decide

    rng = random.Random(5)
    indices = list(range(300))

    def result(step: int, hit: float) -> ArmResult:
        rows = [[1, 0, 0] if rng.random() < hit else [0, 1, 1] for _ in indices]
        return ArmResult(step=step, epoch=step / 879, validation={"per_sample": rows, "indices": indices})

    arms = {"conservative": result(1758, 0.97), "aggressive": result(879, 0.80)}
    rules = Rules(baseline="conservative")
    assert decide(arms, rules).scenario == "mismatch"  # not a milestone comparison
    final = decide(arms, rules, stage="final")
    assert final.stage == "final" and final.scenario == "C"
    assert final.headline.startswith("final: ")
    assert "conservative at step 1758, aggressive at step 879" in final.reasons[0]
    assert final.to_dict()["stage"] == "final"


def test_the_final_look_never_asks_to_wait_for_an_arm_to_finish() -> None:
    """Too close to call once both arms have finished: no "let it finish and compare again"."""
    import random

    from gputwin.core.profiles import Rules
    from gputwin.core.verdict import ArmResult, decide

    rng = random.Random(11)
    indices = list(range(300))
    hits = [rng.random() < 0.9 for _ in indices]

    def result(step: int, flips: int) -> ArmResult:
        rows = [[1, 0, 0] if (hit if i >= flips else not hit) else [0, 1, 1] for i, hit in enumerate(hits)]
        return ArmResult(step=step, epoch=step / 879, validation={"per_sample": rows, "indices": indices})

    arms = {"conservative": result(1758, 0), "aggressive": result(879, 2)}
    rules = Rules(baseline="conservative")
    final = decide(arms, rules, stage="final")
    assert final.scenario == "B" and final.headline.startswith("final: B: too close to call")
    assert not any("finish" in reason and "compare again" in reason for reason in final.reasons), final.reasons
