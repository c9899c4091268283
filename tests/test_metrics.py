"""Entity-level scoring and the paired bootstrap, checked against hand-computed numbers."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from gputwin.core.metrics import (
    arm_intervals,
    disagreements,
    evaluate,
    f1_diff_standard_error,
    normalize_type,
    normalize_value,
    paired_bootstrap,
    pooled_intervals,
    prf,
    resampled_totals,
    samples_needed,
)


@dataclass(frozen=True)
class Ent:
    type: str
    value: str
    start: int | None = None
    end: int | None = None


def score(gold, pred, **kw):
    n = len(gold)
    return evaluate(gold, pred, texts=[f"text {i}" for i in range(n)], indices=list(range(100, 100 + n)), **kw)


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize("raw, expected", [
    ("  Mary   Jones ", "mary jones"),
    ('"John Smith",', "john smith"),
    ("“张伟”。", "张伟"),
    ("１３８ ００１３ ８０００", "138 0013 8000"),  # full-width digits
    ("11010519491231002X", "11010519491231002x"),
    ("(555) 123-4567", "(555) 123-4567"),  # separators and balanced brackets inside are kept
    ("[foo]", "foo"),
    ("(a) (b)", "(a) (b)"),
    ("<ann@example.com>", "ann@example.com"),
    ("x)", "x"),
    ("Straße", "strasse"),
    ("...", ""),
])
def test_normalize_value(raw, expected):
    assert normalize_value(raw) == expected


def test_normalize_type():
    assert normalize_type(" phone number ") == "PHONE_NUMBER"
    assert normalize_type("national-id") == "NATIONAL_ID"
    assert normalize_type("EMAIL") == "EMAIL"


# ---------------------------------------------------------------- evaluate


def test_hand_computed_sample_set():
    gold = [[Ent("PERSON", "John Smith"), Ent("EMAIL", "a@b.com")], [Ent("PHONE", "555-0100")]]
    pred = [[Ent("person", "john smith"), Ent("EMAIL", "x@y.com")], []]
    r = score(gold, pred)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 2)
    assert r["precision"] == pytest.approx(0.5)
    assert r["recall"] == pytest.approx(1 / 3)
    assert r["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert r["per_sample"] == [[1, 1, 1], [0, 0, 1]]
    assert r["indices"] == [100, 101] and r["n"] == 2
    assert r["per_type"]["PERSON"]["f1"] == 1.0 and r["per_type"]["PERSON"]["support"] == 1
    email = dict(r["per_type"]["EMAIL"])
    assert email.pop("undefined") == []  # pytest.approx compares numbers only (pytest 9 refuses a nested list)
    assert email == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 1, "fn": 1, "support": 1})
    assert r["per_type"]["PHONE"]["undefined"] == ["precision"]
    assert r["macro_f1"] == pytest.approx(1 / 3)
    json.dumps(r)  # JSON-ready


def test_empty_predictions_and_empty_everything():
    r = score([[Ent("PHONE", "1")], [Ent("EMAIL", "e")]], [[], []])
    assert (r["precision"], r["recall"], r["f1"]) == (0.0, 0.0, 0.0)
    assert r["undefined"] == ["precision"]
    nothing = score([[], []], [[], []])
    assert (nothing["precision"], nothing["recall"], nothing["f1"], nothing["macro_f1"]) == (1.0, 1.0, 1.0, 1.0)
    assert nothing["undefined"] == [] and nothing["per_type"] == {} and nothing["examples"] == []
    invented = score([[]], [[Ent("PHONE", "1")]])
    assert (invented["precision"], invented["recall"], invented["f1"]) == (0.0, 0.0, 0.0)
    assert invented["undefined"] == ["recall"]


def test_prf_conventions():
    assert prf(0, 0, 0) == (1.0, 1.0, 1.0)
    assert prf(3, 1, 0) == pytest.approx((0.75, 1.0, 6 / 7))
    assert prf(0, 0, 4) == (0.0, 0.0, 0.0)


def test_duplicates_count_once_per_occurrence():
    twice = [Ent("PERSON", "Ann"), Ent("PERSON", "Ann")]
    once = [Ent("PERSON", "Ann")]
    assert score([twice], [once])["per_sample"] == [[1, 0, 1]]
    assert score([once], [twice + once])["per_sample"] == [[1, 2, 0]]
    assert score([twice], [twice])["per_sample"] == [[2, 0, 0]]


def test_unicode_chinese_values_match_after_normalisation():
    gold = [[Ent("PERSON", "张伟"), Ent("NATIONAL_ID", "11010519491231002X"), Ent("PHONE", "13800138000")]]
    pred = [[Ent("PERSON", " 张伟，"), Ent("NATIONAL_ID", "11010519491231002x"), Ent("PHONE", "１３８００１３８０００")]]
    r = score(gold, pred)
    assert (r["tp"], r["fp"], r["fn"]) == (3, 0, 0)
    wrong = score(gold, [[Ent("PERSON", "张伟伟")]])
    assert wrong["examples"][0]["missed"] == [{"type": e.type, "value": e.value} for e in gold[0]]
    assert wrong["examples"][0]["invented"] == [{"type": "PERSON", "value": "张伟伟"}]


def test_type_must_match():
    r = score([[Ent("PHONE", "12345")]], [[Ent("NATIONAL_ID", "12345")]])
    assert r["per_sample"] == [[0, 1, 1]]


def test_spans_matter_only_when_asked():
    gold = [[Ent("PERSON", "Ann", 0, 3)]]
    pred = [[Ent("PERSON", "Ann", 10, 13)]]
    assert score(gold, pred)["tp"] == 1
    spans = score(gold, pred, use_spans=True)
    assert spans["tp"] == 0 and spans["match"] == "type+value+span"


def test_examples_worst_first_with_missed_and_invented():
    gold = [[Ent("PERSON", "A")], [Ent("PERSON", "B"), Ent("EMAIL", "b@x")], [Ent("PHONE", "1")]]
    pred = [[Ent("PERSON", "A")], [Ent("PHONE", "9")], [Ent("PHONE", "1 ")]]
    r = evaluate(gold, pred, texts=["t0", "t1", "t2"], indices=[7, 8, 9])
    assert [e["index"] for e in r["examples"]] == [8]
    ex = r["examples"][0]
    assert ex["text"] == "t1"
    assert ex["missed"] == [{"type": "PERSON", "value": "B"}, {"type": "EMAIL", "value": "b@x"}]
    assert ex["invented"] == [{"type": "PHONE", "value": "9"}]
    many = score([[Ent("P", str(i))] * (i + 1) for i in range(5)], [[] for _ in range(5)], worst=2)
    assert [e["index"] for e in many["examples"]] == [104, 103]


def test_dict_entities_from_json_are_accepted():
    r = score([[{"type": "EMAIL", "value": "a@b.com"}]], [[{"type": "EMAIL", "value": "A@B.COM"}]])
    assert r["f1"] == 1.0


def test_misaligned_inputs_are_refused():
    with pytest.raises(ValueError, match="one gold list"):
        evaluate([[]], [[], []], texts=[""], indices=[0])


# ---------------------------------------------------------------- bootstrap


def outcomes(seed: int, n: int, recall: float, precision: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    gold = rng.poisson(3, n)
    tp = rng.binomial(gold, recall)
    return np.stack([tp, rng.poisson(gold * recall * (1 - precision) / precision), gold - tp], axis=1)


def test_bootstrap_is_deterministic_per_seed():
    a, b = outcomes(1, 300, 0.8, 0.8), outcomes(2, 300, 0.85, 0.85)
    first = paired_bootstrap(a, b, resamples=1000, seed=5)
    assert paired_bootstrap(a, b, resamples=1000, seed=5) == first
    assert paired_bootstrap(a, b, resamples=1000, seed=6)["f1"]["low"] != first["f1"]["low"]
    json.dumps(first)


def test_intervals_contain_the_point_estimate():
    a, b = outcomes(3, 400, 0.8, 0.8), outcomes(4, 400, 0.83, 0.86)
    r = paired_bootstrap(a, b)
    for metric in ("precision", "recall", "f1"):
        assert r[metric]["low"] <= r[metric]["diff"] <= r[metric]["high"]
        for arm in ("a", "b"):
            m = r[arm][metric]
            assert m["low"] <= m["value"] <= m["high"]
    tp_a, fp_a, fn_a = a.sum(axis=0)
    tp_b, fp_b, fn_b = b.sum(axis=0)
    assert r["f1"]["diff"] == pytest.approx(prf(tp_b, fp_b, fn_b)[2] - prf(tp_a, fp_a, fn_a)[2])
    assert r["a"]["f1"] == arm_intervals(a)["f1"]  # same indices: the same interval on its own


def test_pooled_intervals_match_the_binomial_and_the_sample_bootstrap_of_one_entity_samples():
    tp, fp, fn = 300, 60, 90
    got = pooled_intervals(tp, fp, fn, resamples=4000, seed=1)
    for name, hits, trials in (("precision", tp, tp + fp), ("recall", tp, tp + fn)):
        p = hits / trials
        half = 1.96 * (p * (1 - p) / trials) ** 0.5  # the normal approximation of a binomial proportion
        m = got[name]
        assert m["value"] == pytest.approx(p)
        assert m["low"] == pytest.approx(p - half, abs=0.15 * half)
        assert m["high"] == pytest.approx(p + half, abs=0.15 * half)
    # With one entity outcome a sample, resampling samples is resampling entities: the same widths.
    rows = [[1, 0, 0]] * tp + [[0, 1, 0]] * fp + [[0, 0, 1]] * fn
    by_sample = arm_intervals(rows, resamples=4000, seed=1)
    for name in ("precision", "recall", "f1"):
        width, expected = got[name]["high"] - got[name]["low"], by_sample[name]["high"] - by_sample[name]["low"]
        assert width == pytest.approx(expected, rel=0.1)
    assert pooled_intervals(0, 0, 0)["f1"] == {"value": 1.0, "low": 1.0, "high": 1.0}
    assert pooled_intervals(5, 0, 0)["precision"] == {"value": 1.0, "low": 1.0, "high": 1.0}


def test_identical_arms_differ_by_exactly_zero():
    a = outcomes(5, 200, 0.8, 0.8)
    r = paired_bootstrap(a, a.copy(), resamples=1000)
    assert (r["f1"]["diff"], r["f1"]["low"], r["f1"]["high"], r["f1"]["p_b_better"]) == (0.0, 0.0, 0.0, 0.0)


def test_bootstrap_pools_counts_instead_of_averaging_sample_f1():
    # One sample with 100 entities all found, nine with one entity missed: micro F1 ~0.96, mean sample F1 0.1.
    a = np.array([[100, 0, 0]] + [[0, 0, 1]] * 9)
    r = arm_intervals(a, resamples=2000)
    assert r["f1"]["value"] == pytest.approx(200 / 209)
    assert r["f1"]["high"] > 0.9


def test_bootstrap_standard_error_matches_the_linearised_one():
    a, b = outcomes(6, 500, 0.8, 0.8), outcomes(7, 500, 0.85, 0.85)
    se = paired_bootstrap(a, b)["f1"]["se"]
    assert f1_diff_standard_error(a, b) == pytest.approx(se, rel=0.15)


def test_resampling_refuses_unpaired_or_empty_inputs():
    with pytest.raises(ValueError, match="same samples"):
        resampled_totals([np.zeros((3, 3)), np.zeros((4, 3))], resamples=10, seed=0)
    with pytest.raises(ValueError, match="zero samples"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="tp, fp, fn"):
        paired_bootstrap([[1, 2]], [[1, 2]])


def test_samples_needed_scales_with_the_square_of_the_difference():
    a, b = outcomes(8, 200, 0.8, 0.8), outcomes(9, 200, 0.82, 0.82)
    small = samples_needed(0.04, a, b, margin=0.03)
    large = samples_needed(0.08, a, b, margin=0.03)
    assert small == pytest.approx(4 * large, rel=0.02)
    assert samples_needed(0.02, a, b, margin=0.03) is None  # under the margin: never a winner
    assert samples_needed(0.0, a, b, margin=0.0) is None
    # A difference whose interval covers zero needs more samples than we have.
    r = paired_bootstrap(a, b)
    assert r["f1"]["low"] < 0 < r["f1"]["high"] and r["f1"]["diff"] != 0
    assert samples_needed(r["f1"]["diff"], a, b, margin=0.0) > 200


# ---------------------------------------------------------------- disagreements between two results


def test_disagreements_use_examples_and_per_sample_counts():
    missed_by = {"examples": [{"index": 5, "text": "t5", "missed": [{"type": "PERSON", "value": "Ann"},
                                                                    {"type": "PHONE", "value": "1"}]},
                              {"index": 6, "text": "t6", "missed": [{"type": "EMAIL", "value": "e"}]},
                              {"index": 7, "text": "t7", "missed": [{"type": "EMAIL", "value": "f"}]}]}
    found_by = {"indices": [5, 6, 7], "per_sample": [[1, 0, 1], [1, 0, 0], [0, 0, 1]],
                "examples": [{"index": 5, "text": "t5", "missed": [{"type": "phone", "value": "1 "}]}]}
    rows = disagreements(found_by, missed_by)
    # 5: the other arm missed the phone too; 6: it missed nothing; 7: unknown (it missed something there).
    assert [(r["index"], r["value"]) for r in rows] == [(5, "Ann"), (6, "e")]
