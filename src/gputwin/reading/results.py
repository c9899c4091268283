"""Reading an experiment's results: each arm's milestone validation (and its cooldown probe's) from
``<arm>/validation/``, the final comparison once every arm has finished, and the verdict drawn from them.

    milestone_result(root, arm, now, step) -> (ArmResult | None, why not)
    collect(state, now) -> (results, waiting)      every arm's milestone result, and who is awaited and why
    final_results(state, now) -> results | None    each arm's end-of-schedule result, once all have finished
    decide_experiment(state, now) -> (verdict, results, waiting)
    verdict_for_state(state, now) -> Verdict | None

The watcher recomputes the verdict through here; the report renders what ``decide_experiment`` returns.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..core import state as st
from ..core.eta import eta as arm_eta
from ..core.metrics import as_counts
from ..core.paths import ExperimentPaths
from ..core.profiles import Rules
from ..core.reference import decide
from ..core.verdict import ArmResult, Verdict, account_for_ended


def _waiting_text(arm: st.ArmState, milestone: int | None, now: float) -> str:
    """Why an arm has no milestone result yet, with its ETA when it is on its way."""
    if arm.events_seen == 0:
        return "not started yet (no events)"
    where = f"before its milestone (step {milestone})" if milestone else "without a milestone"
    if arm.status == st.CRASHED:
        why = arm.failure.message if arm.failure else "no reason recorded"
        return f"crashed at step {arm.step} {where}: {why}; `gputwin resume {arm.name}` restarts it"
    if arm.status == st.STOPPED:
        return f"stopped at step {arm.step} {where}; `gputwin resume {arm.name}` continues it"
    if arm.status == st.FINISHED:
        return f"finished at step {arm.step} without a validation at step {milestone}"
    if milestone is None:
        return f"at step {arm.step}; no milestone known yet"
    if arm.step >= milestone:
        return f"at its milestone (step {milestone}); validation not written yet"
    eta = arm_eta(arm, milestone, now)
    return f"step {arm.step}/{milestone}, " + (f"ETA {eta.clock} (in {eta.human})" if eta else "ETA not known yet")


def milestone_result(root: Path, arm: st.ArmState, now: float,
                     step: int | None = None) -> tuple[ArmResult | None, str]:
    """The arm's milestone validation (or the one at `step`), with its cooldown probe's validation when
    one ran, or None and why not (the text the verdict shows while waiting). An arm without a known
    milestone (e.g. an HF Trainer run) is judged by its last validation.
    """
    step = step if step is not None else arm.milestone_step
    if step is None and arm.validations:
        step = arm.validations[-1].step
    if step is None:
        return None, _waiting_text(arm, None, now)
    arm_paths = ExperimentPaths(root).arm(arm.name)
    path = arm_paths.validation_file(step)
    point = arm.validation_at(step)
    if not path.is_file() and point is not None and point.path and Path(point.path).is_file():
        path = Path(point.path)  # written outside the arm folder
    if not path.is_file():
        return None, _waiting_text(arm, step, now)
    data, problem = _read_validation(path)
    if data is None:
        return None, problem
    epoch = step / arm.steps_per_epoch if arm.steps_per_epoch else None
    result = ArmResult(step=step, validation=data, epoch=epoch, path=str(path))
    planned = data.get("schedule", {}).get("probe_steps") if isinstance(data.get("schedule"), dict) else None
    probe_path = arm_paths.probe_file(step)
    if probe_path.is_file():
        cooled, problem = _read_validation(probe_path)
        if cooled is None:
            return None, problem
        return replace(result, cooled=ArmResult(step=step, validation=cooled, epoch=epoch, path=str(probe_path))), ""
    probe = arm.probe_at(step)
    if isinstance(planned, int) and planned > 0 and probe is None and not arm.ended:
        return None, f"cooling down: a probe of {planned} steps scores it as if its schedule ended at step {step}"
    return result, ""


def _read_validation(path: Path) -> tuple[dict[str, Any] | None, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("per_sample"), list):
            raise ValueError("no per_sample list; see docs/validation.md")
        if len(as_counts(data["per_sample"])) == 0:
            raise ValueError("no samples were scored")
    except (OSError, ValueError, TypeError) as exc:
        return None, f"validation file {path} cannot be used ({exc})"
    return data, ""


def _rules(state: st.ExperimentState) -> Rules:
    if state.rules is not None:
        return state.rules
    return Rules(baseline=state.baseline or next(iter(state.arms)))  # experiment.json unreadable: defaults


def collect(state: st.ExperimentState, now: float) -> tuple[dict[str, ArmResult | None], dict[str, str]]:
    """Each arm's milestone result (None while there is none) and, for those, why it is still awaited."""
    results: dict[str, ArmResult | None] = {}
    waiting: dict[str, str] = {}
    for name, arm in state.arms.items():
        results[name], why = milestone_result(state.root, arm, now)
        if why:
            waiting[name] = why
    return results, waiting


def final_results(state: st.ExperimentState, now: float) -> dict[str, ArmResult] | None:
    """Each arm's validation at the end of its schedule, once every arm has finished and at least one of
    them trained on past its milestone (the seed's "let it finish and compare again"); else None."""
    arms = state.arms.values()
    if not arms or any(a.status != st.FINISHED or a.milestone_step is None for a in arms):
        return None
    if all(a.step == a.milestone_step for a in arms):
        return None  # the milestone verdict already compares the arms' last adapters
    results = {}
    for arm in arms:
        point = arm.validation_at(arm.step)
        if point is None:
            return None
        result, _ = milestone_result(state.root, arm, now, step=arm.step)
        if result is None:
            return None
        results[arm.name] = result
    return results


def decide_experiment(state: st.ExperimentState, now: float) -> tuple[Verdict | None, dict[str, ArmResult | None], dict[str, str]]:
    """The verdict (None with fewer than two arms), the results it compared, and who it waits for."""
    final = final_results(state, now)
    if final is not None:
        results, waiting = dict(final), {}
        verdict = decide(final, _rules(state), stage="final", replicate_of=state.replicate_of,
                         reference=state.reference)
    else:
        results, waiting = collect(state, now)
        if len(state.arms) < 2:
            return None, results, waiting
        verdict = decide(results, _rules(state), waiting=waiting, replicate_of=state.replicate_of,
                         reference=state.reference)
    ended = {name: arm.status for name, arm in state.arms.items() if arm.status in st.ENDED}
    return account_for_ended(verdict, ended, extend_epochs=_rules(state).extend_epochs), results, waiting


def verdict_for_state(state: st.ExperimentState, *, now: float | None = None) -> Verdict | None:
    """The verdict for a live ExperimentState; None with fewer than two arms."""
    return decide_experiment(state, time.time() if now is None else now)[0]
