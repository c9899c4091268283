"""Which arm to keep: a pure decision from the arms' milestone validations and the experiment's rules.

Scenarios (DESIGN.md; docs/validation.md gives the full rules):
    waiting   an arm has not reached its milestone yet
    A         a challenger is significantly better than the baseline and meets the targets:
              stop the others, extend the winner by rules.extend_epochs
    B         too close to call, or a challenger is better but misses the targets: keep going
    C         every challenger is significantly worse than the baseline: stop them, the baseline finishes
    mismatch  the arms were validated on different samples or at different points: no comparison

A winner is never called on noise: a difference counts only when its bootstrap interval excludes
zero AND it is at least rules.close_margin. With more than one challenger the interval is widened
(Bonferroni) so that the chance of any false call stays at 5%.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from .metrics import (METRICS, arm_intervals, as_counts, difference_stats, interval_stats, resampled_totals,
                      samples_needed)
from .profiles import Rules

WAITING, A, B, C, MISMATCH = "waiting", "A", "B", "C", "mismatch"
SCENARIOS = (WAITING, A, B, C, MISMATCH)
STOP, EXTEND, CONTINUE = "stop", "extend", "continue"
FAMILY_CONFIDENCE = 0.95
POSITION_GAP = 0.25  # arms whose LR (as a share of its peak) differs by more were compared at different points
SAMPLE_ONLY = ("The intervals cover the test sample only, not the run-to-run noise of training (another seed, or "
               "the GPU's nondeterministic kernels, can move F1 by a point or more).")
_EPS = 1e-12  # float slack when a difference sits exactly on the margin


@dataclass(frozen=True)
class ArmResult:
    """An arm's milestone validation (the dict stored in validation/step-NNNNNN.json) and when it was taken."""

    step: int
    validation: Mapping[str, Any]
    epoch: float | None = None
    path: str | None = None  # the file it was read from, for the report
    cooled: ArmResult | None = None  # the cooldown probe's validation at the same step, when one ran

    @property
    def fair(self) -> ArmResult:
        """What the verdict compares: the arm finished (its own schedule) or cooled down (a probe)."""
        return self.cooled or self

    @property
    def schedule(self) -> Mapping[str, Any]:
        value = self.validation.get("schedule")
        return value if isinstance(value, Mapping) else {}

    @property
    def lr_fraction(self) -> float | None:
        value = self.schedule.get("lr_fraction")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def counts(self) -> Any:
        return as_counts(self.validation["per_sample"])

    @property
    def indices(self) -> list[int] | None:
        return self.validation.get("indices")


@dataclass(frozen=True)
class Action:
    """One thing the verdict recommends doing to one arm."""

    kind: str  # stop | extend | continue
    arm: str
    epochs: int | None = None

    def describe(self) -> str:
        if self.kind == STOP:
            return f"stop {self.arm}"
        if self.kind == EXTEND:
            return f"extend {self.arm} by {self.epochs} epoch{'s' if self.epochs != 1 else ''}"
        return f"let {self.arm} continue to the end of its schedule"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "describe": self.describe()}


@dataclass(frozen=True)
class Verdict:
    """The decision and everything that led to it, ready for the UI, `status` and verdict.json."""

    scenario: str
    headline: str
    baseline: str
    winner: str | None = None
    leader: str | None = None  # best significant challenger that missed the targets (scenario B)
    reasons: tuple[str, ...] = ()
    actions: tuple[Action, ...] = ()
    metrics: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # arm -> metrics with intervals
    comparisons: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # challenger -> bootstrap vs baseline
    goal: Mapping[str, Mapping[str, bool]] = field(default_factory=dict)  # arm -> which final goals it meets
    waiting: Mapping[str, str] = field(default_factory=dict)
    confidence: float = FAMILY_CONFIDENCE
    stage: str = "milestone"  # or "final": every arm's adapter at the end of its schedule
    reference: Mapping[str, Any] | None = None  # the reference's row and each arm against it (gputwin.core.reference)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "headline": self.headline,
            "baseline": self.baseline,
            "winner": self.winner,
            "leader": self.leader,
            "reasons": list(self.reasons),
            "actions": [a.to_dict() for a in self.actions],
            "metrics": {k: dict(v) for k, v in self.metrics.items()},
            "comparisons": {k: dict(v) for k, v in self.comparisons.items()},
            "goal": {k: dict(v) for k, v in self.goal.items()},
            "waiting": dict(self.waiting),
            "confidence": self.confidence,
            "stage": self.stage,
            "reference": None if self.reference is None else dict(self.reference),
        }


def pct(x: float, digits: int = 1) -> str:
    """A fraction (0.861) as a percentage (86.1%): the one way scores and progress are written as percent."""
    return f"{x * 100:.{digits}f}%"


def points(x: float) -> str:
    return f"{x * 100:+.1f} points"


def level(confidence: float) -> str:
    """Confidence level as people write it: 95%, 97.5%."""
    return f"{confidence * 100:.4g}%"


def _arm_metrics(result: ArmResult, n: int, intervals: Mapping[str, Any]) -> dict[str, Any]:
    """The compared (fair) result's figures, with the raw score and the schedule position beside them."""
    v = result.fair.validation
    out = {"step": result.step, "epoch": result.epoch, "n": n, "macro_f1": v.get("macro_f1"),
           "tp": v.get("tp"), "fp": v.get("fp"), "fn": v.get("fn"), **intervals,
           "schedule": dict(result.schedule) or None,
           "raw": {k: result.validation.get(k) for k in METRICS}}
    if result.cooled is not None:
        probe = result.cooled.validation.get("probe") or {}
        out["cooled"] = {"steps": probe.get("steps"), "lr_from": probe.get("lr_from"),
                         "seconds": probe.get("train_seconds"), **{k: v.get(k) for k in METRICS}}
    return out


def _goal(metrics: Mapping[str, Any], rules: Rules) -> dict[str, bool]:
    met = {
        "precision": metrics["precision"]["value"] >= rules.goal_precision - _EPS,
        "recall": metrics["recall"]["value"] >= rules.goal_recall - _EPS,
        "f1": metrics["f1"]["value"] >= rules.goal_f1 - _EPS,
    }
    return {**met, "met": all(met.values())}


def _describe_arm(name: str, m: Mapping[str, Any], confidence: float) -> str:
    f1 = m["f1"]
    return (f"{name} was validated at step {m['step']} on {m['n']} samples: precision {pct(m['precision']['value'])}, "
            f"recall {pct(m['recall']['value'])}, F1 {pct(f1['value'])} "
            f"({level(confidence)} interval {pct(f1['low'])} to {pct(f1['high'])}).")


def _goal_reason(goal: Mapping[str, Mapping[str, bool]], metrics: Mapping[str, Any], rules: Rules) -> str:
    target = (f"precision >= {pct(rules.goal_precision)}, recall >= {pct(rules.goal_recall)}, "
              f"F1 >= {pct(rules.goal_f1)}")
    meeting = [arm for arm, g in goal.items() if g["met"]]
    if meeting:
        return f"The final goal ({target}) is met by {', '.join(meeting)}."
    short = "; ".join(
        f"{arm} misses " + ", ".join(f"{k} ({pct(metrics[arm][k]['value'])})" for k in METRICS if not g[k])
        for arm, g in goal.items()
    )
    return f"No arm meets the final goal yet ({target}): {short}."


def mismatch_reasons(base: str, base_result: ArmResult, other: str, result: ArmResult, *,
                     any_step: bool = False) -> list[str]:
    """Why two validations cannot be compared (empty when they can). `any_step`: final adapters, taken
    wherever each arm's schedule ended, are compared as they are."""
    problems = []
    same_epoch = base_result.epoch is not None and result.epoch is not None and abs(base_result.epoch - result.epoch) < 1e-6
    if base_result.step != result.step and not same_epoch and not any_step:
        problems.append(f"{base} was validated at step {base_result.step} and {other} at step {result.step}; "
                        "compare arms at the same milestone (same step or same epoch)")
    n_base, n_other = len(base_result.counts), len(result.counts)
    if n_base != n_other:
        problems.append(f"{base} was validated on {n_base} samples and {other} on {n_other}")
    elif base_result.indices is not None and result.indices is not None and list(base_result.indices) != list(result.indices):
        at = next(i for i, (x, y) in enumerate(zip(base_result.indices, result.indices)) if x != y)
        problems.append(f"{base} and {other} were validated on different samples (first difference at position {at}: "
                        f"sample {base_result.indices[at]} against {result.indices[at]}); use the same sample_seed and test file")
    for key, what in (("test_data", "test files"), ("match", "matching rules")):
        x, y = base_result.validation.get(key), result.validation.get(key)
        if x is not None and y is not None and x != y:
            problems.append(f"{base} and {other} used different {what} ({x} against {y})")
    return problems


def decide(arms: Mapping[str, ArmResult | None], rules: Rules, *, waiting: Mapping[str, str] | None = None,
           stage: str = "milestone", replicate_of: Mapping[str, str] | None = None) -> Verdict:
    """The verdict for arms validated at the same milestone; None marks an arm that has not got there yet.

    stage "final" compares every arm's validation at the end of its schedule (steps may differ): the
    second look that scenario B asks for once the arms have finished.

    replicate_of maps a replicate arm (the same profile with another seed) to its arm: each arm is then
    compared as the group of its runs, with intervals that resample runs, then samples. The model in
    production as a row beside the arms is gputwin.core.reference.decide's, which builds on this one."""
    if stage == "final":
        verdict = decide(arms, rules, waiting=waiting, stage="final-inner", replicate_of=replicate_of)
        where = ", ".join(f"{name} at step {r.step}" for name, r in arms.items() if r is not None)
        headline = verdict.headline.split(" - ")[0] if verdict.scenario == B else verdict.headline
        return replace(verdict, stage="final", headline="final: " + headline,
                       reasons=(f"Final comparison of each arm at the end of its schedule ({where}).",
                                *verdict.reasons))
    waiting = dict(waiting or {})
    base = rules.baseline
    if base not in arms:
        raise ValueError(f"baseline {base!r} is not one of the arms {sorted(arms)}")
    groups = run_groups(arms, replicate_of or {})
    challengers = [name for name in groups if name != base]
    if not challengers:
        raise ValueError("a verdict needs at least two arms")
    confidence = 1 - (1 - FAMILY_CONFIDENCE) / len(challengers)
    raw = {name: r for name, r in arms.items() if r is not None}
    done = {name: r.fair for name, r in raw.items()}  # finished-or-cooled against finished-or-cooled
    counts = {name: r.counts for name, r in done.items()}
    totals: dict[str, Any] = {}
    if done and len({len(c) for c in counts.values()}) == 1:  # one shared resampling for every arm
        totals = dict(zip(done, resampled_totals(counts.values(), resamples=rules.bootstrap_resamples, seed=rules.seed)))
        if len(done) == len(arms):
            counts, totals = pooled_runs(groups, counts, totals, seed=rules.seed)
            raw = {name: raw[name] for name in groups}
            done = {name: done[name] for name in groups}
        intervals = {name: interval_stats(counts[name], totals[name], confidence=confidence) for name in done}
    else:  # different sample counts: no comparison will be made, but each arm still gets its intervals
        intervals = {name: arm_intervals(counts[name], resamples=rules.bootstrap_resamples, seed=rules.seed,
                                         confidence=confidence) for name in done}
    metrics = {name: _arm_metrics(raw[name], len(counts[name]), intervals[name]) for name in done}
    for name, runs in groups.items():
        if len(runs) > 1 and name in metrics:
            metrics[name]["runs"] = {run: arms[run].fair.validation.get("f1") for run in runs if arms[run] is not None}
    goal = {name: _goal(m, rules) for name, m in metrics.items()}
    common = dict(baseline=base, metrics=metrics, goal=goal, confidence=confidence)

    pending = [name for name, r in arms.items() if r is None]
    if pending:
        reasons = [f"{name} has not reached its milestone yet" + (f": {waiting[name]}." if waiting.get(name) else ".")
                   for name in pending]
        reasons += [_describe_arm(name, metrics[name], confidence) for name in done]
        first = pending[0]
        headline = f"waiting for {first}" + (f": {waiting[first]}" if waiting.get(first) else "")
        if len(pending) > 1:
            headline += f" (and {len(pending) - 1} more)"
        return Verdict(WAITING, headline, reasons=tuple(reasons), waiting={k: waiting.get(k, "") for k in pending},
                       **common)

    problems = [p for c in challengers
                for p in mismatch_reasons(base, done[base], c, done[c], any_step=stage == "final-inner")]
    if problems:
        reasons = [f"Cannot compare: {p}." for p in problems]
        return Verdict(MISMATCH, "cannot compare: " + problems[0], reasons=tuple(reasons), **common)

    comparisons: dict[str, dict[str, Any]] = {}
    for c in challengers:
        stats = difference_stats(counts[base], totals[base], counts[c], totals[c], confidence=confidence)
        f1 = stats["f1"]
        if f1["low"] > 0 and f1["diff"] >= rules.close_margin - _EPS:
            outcome = "better"
        elif f1["high"] < 0 and -f1["diff"] >= rules.close_margin - _EPS:
            outcome = "worse"
        else:
            outcome = "close"
        needed = None
        if outcome == "close":
            needed = samples_needed(f1["diff"], counts[base], counts[c], rules.close_margin, confidence=confidence)
        comparisons[c] = {"vs": base, "outcome": outcome, "samples_needed": needed, "n": len(counts[base]),
                          "resamples": rules.bootstrap_resamples, "seed": rules.seed, "confidence": confidence,
                          **stats}
    verdict = _conclude(base, challengers, comparisons, metrics, goal, rules, common, ended=stage == "final-inner")
    return _with_replicates(_fair_positions(verdict, raw, rules), groups, metrics)


def _comparison_sentence(c: str, base: str, comp: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    f1 = comp["f1"]
    return (f"{c} scores F1 {pct(metrics[c]['f1']['value'])} against {base}'s {pct(metrics[base]['f1']['value'])}: "
            f"{points(f1['diff'])} ({level(comp['confidence'])} interval {f1['low'] * 100:+.1f} to {f1['high'] * 100:+.1f}; "
            f"{c} ahead in {f1['p_b_better']:.0%} of {comp['resamples']:,} resamples).")


def _close_sentence(c: str, base: str, comp: Mapping[str, Any], rules: Rules) -> str:
    f1 = comp["f1"]
    why = []
    if f1["low"] <= 0 <= f1["high"]:
        why.append("its interval includes zero, so it may be noise")
    if abs(f1["diff"]) < rules.close_margin - _EPS:
        why.append(f"it is under the {rules.close_margin * 100:.1f}-point margin")
    text = f"{c} and {base} are too close to call: " + " and ".join(why or ["the difference is not clear"]) + "."
    needed, n = comp.get("samples_needed"), comp["n"]
    if needed is not None and needed > n:
        text += f" About {needed:,} samples (you have {n:,}) would tell a difference this size apart from noise."
    elif needed is None and f1["diff"] != 0:
        text += " More samples would not settle it: a difference this small does not count either way."
    return text


def _conclude(base: str, challengers: list[str], comparisons: dict[str, dict[str, Any]],
              metrics: dict[str, Any], goal: dict[str, Any], rules: Rules, common: dict[str, Any], *,
              ended: bool = False) -> Verdict:
    """Scenario, reasons and actions from the comparisons; `ended`: the final look, every arm has finished."""
    reasons = [_comparison_sentence(c, base, comparisons[c], metrics) for c in challengers]
    better = sorted((c for c in challengers if comparisons[c]["outcome"] == "better"),
                    key=lambda c: -comparisons[c]["f1"]["diff"])
    worse = [c for c in challengers if comparisons[c]["outcome"] == "worse"]
    close = [c for c in challengers if comparisons[c]["outcome"] == "close"]

    def meets_targets(arm: str) -> bool:
        m = metrics[arm]
        return m["f1"]["value"] >= rules.target_f1 - _EPS and m["recall"]["value"] >= rules.target_recall - _EPS

    def targets_sentence(arm: str) -> str:
        m = metrics[arm]
        f1_ok = "meets" if m["f1"]["value"] >= rules.target_f1 - _EPS else "misses"
        r_ok = "meets" if m["recall"]["value"] >= rules.target_recall - _EPS else "misses"
        return (f"{arm} has F1 {pct(m['f1']['value'])} ({f1_ok} the {pct(rules.target_f1)} target) and recall "
                f"{pct(m['recall']['value'])} ({r_ok} the {pct(rules.target_recall)} target).")

    qualified = [c for c in better if meets_targets(c)]
    winner = leader = None
    if qualified:
        scenario, winner = A, qualified[0]
        diff = comparisons[winner]["f1"]["diff"]
        reasons.append(f"{winner} is clearly better than {base} ({points(diff)} F1) and meets the targets. "
                       + targets_sentence(winner))
        if len(better) > 1:
            reasons.append("Of the arms significantly better than the baseline, " + winner
                           + " is the best that meets the targets.")
        actions = [Action(STOP, a) for a in [base, *challengers] if a != winner]
        actions.append(Action(EXTEND, winner, rules.extend_epochs))
        headline = (f"A: {winner} is clearly better ({points(diff)} F1) - stop "
                    f"{', '.join(a.arm for a in actions if a.kind == STOP)}, extend {winner} by "
                    f"{rules.extend_epochs} epoch{'s' if rules.extend_epochs != 1 else ''}")
    elif worse and len(worse) == len(challengers):
        scenario, winner = C, base
        reasons.append(f"{base} (the baseline) is better than " + ", ".join(worse) + f": stop {'them' if len(worse) > 1 else 'it'} "
                       f"and let {base} finish.")
        actions = [Action(STOP, c) for c in worse] + [Action(CONTINUE, base)]
        headline = f"C: {base} is better - stop {', '.join(worse)}, let {base} finish"
    else:
        scenario = B
        if better:
            leader = better[0]
            diff = comparisons[leader]["f1"]["diff"]
            then = (f" Extend {leader} to train on if it is worth more steps." if ended
                    else f" Let {base} finish and compare again; extend {leader} if it is still ahead.")
            reasons.append(f"{leader} is significantly better than {base} ({points(diff)} F1) but misses the targets, "
                           f"so it is not yet worth stopping {base}. " + targets_sentence(leader) + then)
            headline = f"B: {leader} is better ({points(diff)} F1) but misses the targets - both continue"
        else:
            lead = close[0]
            reasons += [_close_sentence(c, base, comparisons[c], rules) for c in close]
            if not ended:  # at the final look every arm has finished: there is nothing left to wait for
                reasons.append(f"Let {base} finish its schedule and compare again.")
            headline = (f"B: too close to call ({lead} {points(comparisons[lead]['f1']['diff'])} F1) - "
                        f"let {base} finish, compare again")
        if worse:
            reasons.append(f"{', '.join(worse)} {'is' if len(worse) == 1 else 'are'} significantly worse than {base}: stop.")
        actions = [Action(STOP, c) for c in worse]
        actions += [Action(CONTINUE, a) for a in [base, *challengers] if a not in worse]
    reasons.append(_goal_reason(goal, metrics, rules))
    return Verdict(scenario, headline, winner=winner, leader=leader, reasons=tuple(reasons), actions=tuple(actions),
                   comparisons=comparisons, **common)


def run_groups(arms: Mapping[str, Any], replicate_of: Mapping[str, str]) -> dict[str, list[str]]:
    """Each arm with its replicates (in the arms' order); replicates of unknown arms stand alone."""
    groups = {name: [name] for name in arms if replicate_of.get(name) not in arms}
    for name in arms:
        primary = replicate_of.get(name)
        if primary in groups:
            groups[primary].append(name)
    return groups


def pooled_runs(groups: Mapping[str, list[str]], counts: Mapping[str, Any], totals: Mapping[str, Any], *,
                seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each group's per-sample counts pooled over its runs, and resampled totals that pick one of its runs
    at random for each resample (runs, then samples: the shared sample resampling is kept, so the
    comparison stays paired). A group of one run keeps its own."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    pooled_counts, mixed = {}, {}
    for name, runs in groups.items():
        if len(runs) == 1:
            pooled_counts[name], mixed[name] = counts[name], totals[name]
            continue
        pooled_counts[name] = sum(np.asarray(as_counts(counts[r]), dtype=np.int64) for r in runs)
        stacked = np.stack([totals[r] for r in runs])  # (runs, resamples, 3)
        pick = rng.integers(0, len(runs), size=stacked.shape[1])
        mixed[name] = stacked[pick, np.arange(stacked.shape[1])]
    return pooled_counts, mixed


def _with_replicates(verdict: Verdict, groups: Mapping[str, list[str]], metrics: Mapping[str, Any]) -> Verdict:
    """Say what the intervals cover; a stopped arm's replicates stop with it."""
    repeated = {name: runs for name, runs in groups.items() if len(runs) > 1}
    if not repeated:
        return verdict
    spread = "; ".join(f"{name} over {len(runs)} runs (F1 " + ", ".join(
        pct(f) for f in metrics.get(name, {}).get("runs", {}).values() if isinstance(f, (int, float))) + ")"
        for name, runs in repeated.items())
    covers = (f"The intervals include the run-to-run noise of training: {spread}; each resample picks one run of "
              "each arm, then resamples the test samples.")
    reasons = tuple(covers if r == SAMPLE_ONLY else r for r in verdict.reasons)
    actions = list(verdict.actions)
    for action in verdict.actions:
        if action.kind == STOP:
            actions += [Action(STOP, run) for run in groups.get(action.arm, [])[1:]]
    return replace(verdict, reasons=reasons, actions=tuple(actions))


def _position(name: str, result: ArmResult) -> str:
    s = result.schedule
    if result.cooled is not None:
        return f"{name} cooled down from LR {s.get('lr_fraction', 0):.0%} of its peak"
    if s.get("decay_done", 0) >= 1 or (result.lr_fraction or 0) <= 0.02:
        return f"{name} at the end of its decay"
    return f"{name} at LR {result.lr_fraction:.0%} of its peak ({s.get('decay_done', 0):.0%} of its decay done)"


def _fair_positions(verdict: Verdict, raw: Mapping[str, ArmResult], rules: Rules) -> Verdict:
    """Say where in their LR schedules the arms were compared, and never recommend stopping an arm on a
    comparison that favours the other for being further along its decay.

    Finished-or-cooled results (lr_fraction 0 after a probe) compare fairly. Without a probe, an arm
    mid-schedule is behind an arm at the end of its decay by what its own decay would still give it
    (measured: several F1 points on a real model), so a stop of the arm with the higher LR is dropped and
    the scenario falls back to B, with the reason in words.
    """
    reasons = list(verdict.reasons[:-1]) if verdict.reasons else []
    goal_reason = verdict.reasons[-1:] if verdict.reasons else ()
    cooled = [n for n, r in raw.items() if r.cooled is not None]
    for name in cooled:
        r, m = raw[name], verdict.metrics.get(name, {})
        probe = r.cooled.validation.get("probe") or {}
        raw_f1 = r.validation.get("f1")
        reasons.append(f"{name} was validated mid-schedule (LR {r.lr_fraction or 0:.0%} of its peak); cooled down over "
                       f"{probe.get('steps', '?')} steps with the LR falling to 0, it scores F1 {pct(m['f1']['value'])}"
                       + (f" (raw {pct(raw_f1)})" if isinstance(raw_f1, (int, float)) else "")
                       + ". The verdict compares finished or cooled scores.")
    effective = {n: (0.0 if r.cooled is not None else r.lr_fraction) for n, r in raw.items()}
    known = {n: f for n, f in effective.items() if f is not None}
    if len(known) < len(raw) or max(known.values()) - min(known.values()) <= POSITION_GAP:
        return replace(verdict, reasons=(*reasons, SAMPLE_ONLY, *goal_reason))
    where = "; ".join(_position(n, raw[n]) for n in raw)
    reasons.append(f"The arms were compared at different points of their LR schedules ({where}): a score taken "
                   "mid-schedule understates what that arm will reach once its LR decays, so this comparison "
                   "favours the arm further along its decay.")
    kept, dropped = [], []
    for action in verdict.actions:
        beaten_by = verdict.winner if verdict.winner and verdict.winner != action.arm else None
        if action.kind == STOP and beaten_by is not None and known[action.arm] > known[beaten_by] + POSITION_GAP:
            dropped.append(action.arm)
        else:
            kept.append(action)
    if not dropped:
        return replace(verdict, reasons=(*reasons, SAMPLE_ONLY, *goal_reason))
    names = ", ".join(dropped)
    reasons.append(f"So gputwin does not recommend stopping {names} on it: let {names} finish (or turn on the cooldown "
                   "probe, milestone.cooldown_steps) and compare again.")
    kept = [a if a.kind != EXTEND else Action(CONTINUE, a.arm) for a in kept] + [Action(CONTINUE, n) for n in dropped]
    headline = (f"B: uncertain - {verdict.winner} leads, but {names} {'was' if len(dropped) == 1 else 'were'} compared "
                f"mid-schedule; let {names} finish, compare again")
    return replace(verdict, scenario=B, headline=headline, leader=verdict.winner, winner=None,
                   actions=tuple(kept), reasons=(*reasons, SAMPLE_ONLY, *goal_reason))


def account_for_ended(verdict: Verdict, ended: Mapping[str, str], *, extend_epochs: int = 1) -> Verdict:
    """Drop actions that an arm's state makes moot, and say what to do instead.

    `ended` maps arms whose trainer has ended to their status ("finished", "stopped", ...). Stopping an
    arm that already ended does nothing. "Continue" on an arm that finished its schedule cannot happen
    without more epochs: at the milestone, while another arm still trains towards its own end, it becomes
    an extension (a new LR cycle) so that the arms are compared again after comparable training (on the
    seed profiles with a real model, the 1-epoch arm extended by one epoch ended 2.6 F1 points above the
    2-epoch arm); otherwise the reason says how to get more epochs.
    """
    kept: list[Action] = []
    notes: list[str] = []
    training = {a.arm for a in verdict.actions if a.arm not in ended and a.kind != STOP}
    for action in verdict.actions:
        status = ended.get(action.arm)
        if status is None or action.kind == EXTEND:
            kept.append(action)
        elif action.kind == STOP:
            notes.append(f"{action.arm} has already ended ({status}); nothing to stop.")
        elif status == "finished" and verdict.stage == "milestone" and training:
            kept.append(Action(EXTEND, action.arm, extend_epochs))
            notes.append(f"{action.arm} has finished its schedule while {', '.join(sorted(training))} "
                         f"{'trains' if len(training) == 1 else 'train'} on: extend it by {extend_epochs} "
                         f"epoch{'s' if extend_epochs != 1 else ''} (a new LR cycle) so both train on and are "
                         "compared again at their ends.")
        elif status == "finished":  # continue, but there is nothing left to continue
            notes.append(f"{action.arm} has finished its schedule; extend it to train on and compare again "
                         f"(key e, or `gputwin extend {action.arm}`).")
        else:
            notes.append(f"{action.arm} is {status}; resume it to train on and compare again "
                         f"(key R, or `gputwin resume {action.arm}`).")
    if not notes:
        return verdict
    headline = verdict.headline.split(" - ")[0]  # the headline names the actions: only those still to do
    if kept:
        headline += " - " + ", ".join(a.describe() for a in kept)
    return replace(verdict, headline=headline, actions=tuple(kept), reasons=(*verdict.reasons, *notes))
