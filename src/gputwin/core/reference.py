"""The model in production as the bar to beat: every arm compared with the experiment's reference.

    resolve_targets(rules, reference) -> Resolved        "reference + 1.5" targets as fractions
    judge(verdict, arms, reference, resolved, rules) -> Verdict   the verdict with its reference row and reasons

Pure: no files, no Textual, no torch. The reference's validation (gputwin.control.reference_run writes it with
`gputwin validate`) covers the same seeded sample as the arms, so each arm's difference from it comes from
the same paired bootstrap as the arms' own comparison: the same resampled samples (they depend only on the
sample count, the resample count and the seed), micro P/R/F1 recomputed per resample. An arm

    beats   the reference when the interval for its F1 difference lies above zero and the difference is at
            least rules.close_margin;
    short   (falls short of it) in the mirror case;
    ties    it otherwise: the same rule that keeps the verdict from calling a winner on noise.

The intervals of these comparisons are widened (Bonferroni) over the arms compared, so the chance that
any arm is called better or worse than the reference on noise stays at 5%.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from .metrics import METRICS, as_counts, difference_stats, interval_stats, prf, resampled_totals
from .profiles import RELATIVE_TARGETS, Rules
from .verdict import FAMILY_CONFIDENCE, MISMATCH, WAITING, ArmResult, Verdict, level, mismatch_reasons, pct, points
from .verdict import decide as decide_arms

BEATS, TIES, SHORT = "beats", "ties", "short"
OUTCOME_WORDS = {BEATS: "beats", TIES: "ties", SHORT: "falls short of"}
_EPS = 1e-12  # float slack when a difference sits exactly on the margin


@dataclass(frozen=True)
class ReferenceResult:
    """The reference's validation as `gputwin validate --json` wrote it, or why there is none."""

    name: str
    validation: Mapping[str, Any] | None
    path: str | None = None  # the file it was read from
    model: str | None = None  # the adapter or model folder
    problem: str | None = None  # why `validation` is None or cannot be used, with what to do about it

    def usable(self) -> bool:
        return self.validation is not None and self.problem is None


@dataclass(frozen=True)
class Resolved:
    """The rules with targets stated relative to the reference turned into fractions."""

    rules: Rules
    targets: dict[str, dict[str, float]]  # target_f1 -> {offset, reference, value}; only relative ones
    problem: str | None = None  # a relative target that cannot be resolved: no verdict may conclude


def relative_offsets(rules: Rules) -> dict[str, float]:
    """target name -> offset (a fraction) for the targets written as "reference + N"."""
    offsets = {key: getattr(rules, f"{key}_reference_offset", None) for key in RELATIVE_TARGETS}
    return {key: value for key, value in offsets.items() if value is not None}


def resolve_targets(rules: Rules, reference: ReferenceResult) -> Resolved:
    """target_f1 = reference F1 + offset (and the same for recall), clipped to [0, 1]."""
    offsets = relative_offsets(rules)
    if not offsets:
        return Resolved(rules, {})
    if not reference.usable():
        keys = " and ".join(offsets)
        return Resolved(rules, {}, f"{keys} {'is' if len(offsets) == 1 else 'are'} stated relative to "
                                   f"{reference.name}, which has no usable validation: {reference.problem}")
    counts = as_counts(reference.validation["per_sample"])  # type: ignore[index]
    point = dict(zip(METRICS, prf(*(int(x) for x in counts.sum(axis=0)))))
    targets, values = {}, {}
    for key, offset in offsets.items():
        base = point[RELATIVE_TARGETS[key]]
        value = min(1.0, max(0.0, base + offset))
        targets[key] = {"offset": offset, "reference": base, "value": value}
        values[key] = value
    return Resolved(replace(rules, **values), targets)


def _as_arm(reference: ReferenceResult) -> ArmResult:
    """The reference in the shape the verdict's sample checks take (it has no step)."""
    return ArmResult(step=0, validation=reference.validation or {}, path=reference.path)


def _metrics(reference: ReferenceResult, counts: Any, totals: Any, confidence: float) -> dict[str, Any]:
    v = reference.validation or {}
    return {"step": None, "epoch": None, "n": len(counts), "macro_f1": v.get("macro_f1"), "tp": v.get("tp"),
            "fp": v.get("fp"), "fn": v.get("fn"), **interval_stats(counts, totals, confidence=confidence)}


def _goal(metrics: Mapping[str, Any], rules: Rules) -> dict[str, bool]:
    met = {"precision": metrics["precision"]["value"] >= rules.goal_precision - _EPS,
           "recall": metrics["recall"]["value"] >= rules.goal_recall - _EPS,
           "f1": metrics["f1"]["value"] >= rules.goal_f1 - _EPS}
    return {**met, "met": all(met.values())}


def _outcome(f1: Mapping[str, float], margin: float) -> str:
    if f1["low"] > 0 and f1["diff"] >= margin - _EPS:
        return BEATS
    if f1["high"] < 0 and -f1["diff"] >= margin - _EPS:
        return SHORT
    return TIES


def compare(arms: Mapping[str, ArmResult | None], reference: ReferenceResult, rules: Rules, *,
            row_confidence: float) -> tuple[dict[str, Any], list[str]]:
    """The reference's row (metrics with intervals at the verdict's level), each validated arm's difference
    from it, and the problems that kept an arm from being compared."""
    counts = as_counts(reference.validation["per_sample"])  # type: ignore[index]
    done = {name: r.fair for name, r in arms.items() if r is not None}  # finished or cooled, as the arms compare
    problems = {name: mismatch_reasons(reference.name, _as_arm(reference), name, r, any_step=True)
                for name, r in done.items()}
    comparable = [name for name in done if not problems[name]]
    totals = resampled_totals([counts, *(done[n].counts for n in comparable)], resamples=rules.bootstrap_resamples,
                              seed=rules.seed)
    confidence = 1 - (1 - FAMILY_CONFIDENCE) / max(1, len(comparable))
    comparisons = {}
    for name, arm_totals in zip(comparable, totals[1:]):
        stats = difference_stats(counts, totals[0], done[name].counts, arm_totals, confidence=confidence)
        outcome = _outcome(stats["f1"], rules.close_margin)
        comparisons[name] = {"vs": reference.name, "outcome": outcome,
                             "describe": f"{OUTCOME_WORDS[outcome]} {reference.name}", "n": len(counts),
                             "resamples": rules.bootstrap_resamples, "seed": rules.seed, "confidence": confidence,
                             **stats}
    metrics = _metrics(reference, counts, totals[0], row_confidence)
    row = {"metrics": metrics, "goal": _goal(metrics, rules), "comparisons": comparisons, "confidence": confidence}
    return row, [p for name in done for p in problems[name]]


# ---------------------------------------------------------------- sentences


def _row_sentence(name: str, m: Mapping[str, Any], confidence: float) -> str:
    f1 = m["f1"]
    return (f"{name} (the reference) scores precision {pct(m['precision']['value'])}, recall "
            f"{pct(m['recall']['value'])}, F1 {pct(f1['value'])} ({level(confidence)} interval {pct(f1['low'])} "
            f"to {pct(f1['high'])}) on the same {m['n']} samples.")


def _arm_sentence(arm: str, ref: str, comp: Mapping[str, Any], margin: float) -> str:
    f1 = comp["f1"]
    text = (f"{arm} {OUTCOME_WORDS[comp['outcome']]} {ref}: F1 {points(f1['diff'])} ({level(comp['confidence'])} "
            f"interval {f1['low'] * 100:+.1f} to {f1['high'] * 100:+.1f}; precision "
            f"{points(comp['precision']['diff'])}, recall {points(comp['recall']['diff'])})")
    if comp["outcome"] == TIES:
        why = []
        if f1["low"] <= 0 <= f1["high"]:
            why.append("the interval includes zero")
        if abs(f1["diff"]) < margin - _EPS:
            why.append(f"the difference is under the {margin * 100:.1f}-point margin")
        text += ": " + " and ".join(why or ["the difference is not clear"])
    return text + "."


def _targets_sentence(ref: str, targets: Mapping[str, Mapping[str, float]]) -> str:
    parts = []
    for key, t in targets.items():
        metric = "F1" if RELATIVE_TARGETS[key] == "f1" else RELATIVE_TARGETS[key]
        sign = "+" if t["offset"] >= 0 else "-"
        parts.append(f"{metric} >= {pct(t['reference'])} {sign} {abs(t['offset']) * 100:.1f} points "
                     f"= {pct(t['value'])}")
    return f"Targets relative to {ref}: " + "; ".join(parts) + "."


def _winner_sentence(verdict: Verdict, ref: str, comparisons: Mapping[str, Any]) -> str | None:
    """Scenario A or C names a winner among the arms; say whether it also beats what is deployed."""
    winner = verdict.winner
    if winner is None or winner not in comparisons:
        return None
    outcome = comparisons[winner]["outcome"]
    if outcome == BEATS:
        return f"{winner}, the arm to keep, also beats {ref}: it is worth deploying."
    return (f"{winner} is the better arm but {OUTCOME_WORDS[outcome]} {ref}: keep {ref} deployed until an arm "
            "beats it.")


# ---------------------------------------------------------------- the verdict with its reference


def judge(verdict: Verdict, arms: Mapping[str, ArmResult | None], reference: ReferenceResult,
          resolved: Resolved, rules: Rules) -> Verdict:
    """`verdict` (decided with resolved.rules) with the reference's row, comparisons and reasons added.

    A relative target that could not be resolved, or a reference validated on other samples than the arms,
    turns a decided verdict into `mismatch`: its targets would mean nothing."""
    name = reference.name
    summary: dict[str, Any] = {"name": name, "model": reference.model, "path": reference.path, "metrics": None,
                               "goal": None, "comparisons": {}, "targets": resolved.targets, "problem": None}
    reasons: list[str] = []
    problem = resolved.problem or (None if reference.usable() else reference.problem)
    if reference.usable():
        row, mismatched = compare(arms, reference, resolved.rules, row_confidence=verdict.confidence)
        summary.update(row)
        reasons.append(_row_sentence(name, row["metrics"], verdict.confidence))
        reasons += [_arm_sentence(arm, name, comp, rules.close_margin) for arm, comp in row["comparisons"].items()]
        if mismatched:
            reasons += [f"Cannot compare with the reference: {p}." for p in mismatched]
            if resolved.targets and not problem:
                problem = f"the targets are relative to {name}, which was validated differently: {mismatched[0]}"
    if problem:
        summary["problem"] = problem
        reasons.append(f"The reference cannot be used: {problem}.")
    elif resolved.targets:
        reasons.append(_targets_sentence(name, resolved.targets))
    winner = _winner_sentence(verdict, name, summary["comparisons"])
    if winner:
        reasons.append(winner)
    judged = replace(verdict, reference=summary, reasons=(*verdict.reasons, *reasons))
    if problem and relative_offsets(rules) and verdict.scenario not in (WAITING, MISMATCH):
        return replace(judged, scenario=MISMATCH, headline="cannot judge the targets: " + problem, winner=None,
                       leader=None, actions=())
    return judged


def decide(arms: Mapping[str, ArmResult | None], rules: Rules, *, waiting: Mapping[str, str] | None = None,
           stage: str = "milestone", replicate_of: Mapping[str, str] | None = None,
           reference: ReferenceResult | None = None) -> Verdict:
    """The verdict (gputwin.core.verdict.decide) with the experiment's reference, when it has one: the model in
    production as a row that every arm is compared with, and targets written relative to it resolved."""
    if reference is None:
        return decide_arms(arms, rules, waiting=waiting, stage=stage, replicate_of=replicate_of)
    resolved = resolve_targets(rules, reference)
    verdict = decide_arms(arms, resolved.rules, waiting=waiting, stage=stage, replicate_of=replicate_of)
    return judge(verdict, arms, reference, resolved, rules)
