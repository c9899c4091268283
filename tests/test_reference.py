"""The reference row of the verdict, pure: each arm beats, ties or falls short of the model in production by
the same paired bootstrap as the arms' own comparison; targets stated relative to it; refusals."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np

from gputwin.core.metrics import paired_bootstrap
from gputwin.core.profiles import Rules
from gputwin.core.reference import BEATS, SHORT, TIES, ReferenceResult, decide, resolve_targets
from gputwin.core.verdict import A, B, MISMATCH, WAITING
from test_verdict import GOLD, arms, outcomes

RULES = Rules(baseline="conservative", bootstrap_resamples=1000)


def reference(recall: float, precision: float, *, seed: int = 9, name: str = "production", **extra) -> ReferenceResult:
    counts = outcomes(seed, recall, precision, gold=GOLD)
    validation = {"per_sample": counts.tolist(), "indices": list(range(len(counts))), **extra}
    return ReferenceResult(name, validation, path="/logs/x/_reference/validation.json", model="/models/prod")


def relative(f1: float | None = None, recall: float | None = None, **rules) -> Rules:
    return replace(RULES, target_f1_reference_offset=f1, target_recall_reference_offset=recall, **rules)


def test_each_arm_is_compared_with_the_reference_by_the_same_paired_bootstrap() -> None:
    results = arms(conservative=(0.74, 0.95), aggressive=(0.90, 0.93))
    ref = reference(0.74, 0.95)
    verdict = decide(results, RULES, reference=ref)
    row = verdict.reference
    assert row["name"] == "production" and row["metrics"]["n"] == 500
    assert row["comparisons"]["aggressive"]["outcome"] == BEATS
    assert row["comparisons"]["conservative"]["outcome"] == TIES
    # The arm's difference is exactly what a paired bootstrap of (reference, arm) at the rules' seed gives.
    direct = paired_bootstrap(ref.validation["per_sample"], results["aggressive"].validation["per_sample"],
                              resamples=1000, seed=0, confidence=row["comparisons"]["aggressive"]["confidence"])
    assert row["comparisons"]["aggressive"]["f1"] == direct["f1"]
    # The reference's own interval is drawn at the verdict's level, like the arms' rows beside it.
    assert row["metrics"]["f1"]["value"] == direct["a"]["f1"]["value"]
    assert row["comparisons"]["aggressive"]["confidence"] == 0.975  # two arms compared with it
    text = " ".join(verdict.reasons)
    assert "production (the reference) scores precision" in text
    assert "aggressive beats production: F1 +" in text
    assert "conservative ties production" in text
    assert "aggressive, the arm to keep, also beats production" in text
    # The arms' own verdict is what it is without a reference.
    plain = decide(results, RULES)
    assert (verdict.scenario, verdict.winner, verdict.actions) == (plain.scenario, plain.winner, plain.actions)
    assert verdict.reasons[: len(plain.reasons)] == plain.reasons
    assert json.loads(json.dumps(verdict.to_dict()))["reference"]["comparisons"]["aggressive"]["outcome"] == BEATS
    assert plain.to_dict()["reference"] is None


def test_an_arm_worse_than_the_reference_falls_short_and_the_winner_is_not_deployed() -> None:
    results = arms(conservative=(0.60, 0.90), aggressive=(0.75, 0.95))
    verdict = decide(results, replace(RULES, target_f1=0.8, target_recall=0.7), reference=reference(0.90, 0.96))
    assert verdict.scenario == A and verdict.winner == "aggressive"
    assert verdict.reference["comparisons"]["aggressive"]["outcome"] == SHORT
    assert verdict.reference["comparisons"]["conservative"]["outcome"] == SHORT
    text = " ".join(verdict.reasons)
    assert "aggressive falls short of production: F1 -" in text
    assert "aggressive is the better arm but falls short of production: keep production deployed" in text


def test_targets_relative_to_the_reference_decide_whether_the_winner_qualifies() -> None:
    # aggressive is clearly better than conservative with F1 near 0.91.
    results = arms(conservative=(0.74, 0.95), aggressive=(0.90, 0.93))
    assert decide(results, RULES).scenario == A
    ref = reference(0.74, 0.95)
    ref_f1 = resolve_targets(relative(f1=0.0), ref).targets["target_f1"]["reference"]
    low = decide(results, relative(f1=0.015), reference=ref)
    assert low.scenario == A
    assert abs(low.reference["targets"]["target_f1"]["value"] - (ref_f1 + 0.015)) < 1e-12
    assert "Targets relative to production: F1 >= " in " ".join(low.reasons)
    high = decide(results, relative(f1=0.25, recall=0.05), reference=ref)  # F1 >= reference + 25 points: out of reach
    assert high.scenario == B and high.leader == "aggressive"
    assert high.reference["targets"]["target_recall"]["offset"] == 0.05
    assert f"(misses the {100 * min(1.0, ref_f1 + 0.25):.1f}% target)" in " ".join(high.reasons)


def test_relative_targets_without_a_usable_reference_refuse_to_conclude() -> None:
    results = arms(conservative=(0.74, 0.95), aggressive=(0.90, 0.93))
    missing = ReferenceResult("production", None, problem="its validation file /x/validation.json is missing")
    verdict = decide(results, relative(f1=0.015), reference=missing)
    assert verdict.scenario == MISMATCH and verdict.actions == () and verdict.winner is None
    assert "stated relative to production" in verdict.headline and "/x/validation.json" in verdict.headline
    # Absolute targets do not need it: the verdict stands and says why the row is missing.
    stands = decide(results, RULES, reference=missing)
    assert stands.scenario == A and stands.reference["problem"].startswith("its validation file")
    assert "The reference cannot be used: its validation file" in " ".join(stands.reasons)


def test_a_reference_validated_on_other_samples_is_not_compared() -> None:
    results = arms(conservative=(0.74, 0.95), aggressive=(0.90, 0.93))
    ref = reference(0.74, 0.95)
    other = replace(ref, validation={**ref.validation, "indices": list(range(1, 501))})
    verdict = decide(results, RULES, reference=other)
    assert verdict.scenario == A and verdict.reference["comparisons"] == {}
    assert "Cannot compare with the reference: production and conservative were validated on different samples" \
        in " ".join(verdict.reasons)
    assert decide(results, relative(f1=0.01), reference=other).scenario == MISMATCH
    wrong_file = replace(ref, validation={**ref.validation, "test_data": "/a.jsonl"})
    arm_file = {n: replace(r, validation={**r.validation, "test_data": "/b.jsonl"}) for n, r in results.items()}
    assert "different test files" in " ".join(decide(arm_file, RULES, reference=wrong_file).reasons)


def test_while_waiting_the_reference_row_is_there_and_done_arms_are_compared() -> None:
    results = {**arms(conservative=(0.74, 0.95)), "aggressive": None}
    verdict = decide(results, RULES, waiting={"aggressive": "step 400/879"}, reference=reference(0.74, 0.95))
    assert verdict.scenario == WAITING
    assert set(verdict.reference["comparisons"]) == {"conservative"}
    assert verdict.reference["comparisons"]["conservative"]["confidence"] == 0.95


def test_the_final_stage_keeps_the_reference() -> None:
    results = arms(conservative=(0.74, 0.95), aggressive=(0.90, 0.93))
    results["aggressive"] = replace(results["aggressive"], step=1758)
    verdict = decide(results, RULES, stage="final", reference=reference(0.74, 0.95))
    assert verdict.stage == "final" and verdict.reference["comparisons"]["aggressive"]["outcome"] == BEATS
    assert verdict.reasons[0].startswith("Final comparison")


def test_same_inputs_same_numbers() -> None:
    results = arms(conservative=(0.74, 0.95), aggressive=(0.80, 0.93))
    ref = reference(0.76, 0.95)
    assert decide(results, RULES, reference=ref).to_dict() == decide(results, RULES, reference=ref).to_dict()
    assert np.isclose(resolve_targets(relative(f1=-0.02), ref).rules.target_f1,
                      resolve_targets(relative(f1=0.0), ref).rules.target_f1 - 0.02)
