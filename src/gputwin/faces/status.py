"""`gputwin status [NAME] [--json]`: a one-shot summary of an experiment, for cron, scripts and SSH.

Per arm: status, the hyperparameters its pane shows (resolved: the values that train), step/total,
milestone progress, ETA to the milestone and to the end (clock time and duration), loss (raw and
smoothed), tokens/s, the last validation's P/R/F1, and why it crashed; then the verdict headline
when there is one. ``--json`` prints the same summary as one JSON object.

Exit status: 0, or 3 when an arm crashed or failed (so `gputwin status || alert` works from cron);
2 for a user error such as an unknown experiment name.

It reads only files (no torch, no UI), so it answers in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

from ..core import eta as eta_mod
from ..core.errors import EXIT_ARM_CRASHED
from .formatting import shown_hparams
from ..core.paths import resolve_experiment
from ..core.state import CRASHED, ENDED, STALLED, ArmState, ExperimentState
from ..core.verdict import pct
from ..reading.watcher import ExperimentWatcher

EXIT_OK = 0
STDERR_LINES_SHOWN = 5


def _eta_dict(value: eta_mod.Eta | None) -> dict[str, Any] | None:
    if value is None:
        return None
    return {"seconds": round(value.seconds, 1), "clock": value.clock, "human": value.human}


def arm_summary(arm: ArmState, now: float, baseline: str | None = None,
                differing: list[str] | None = None) -> dict[str, Any]:
    """One arm as plain data (the JSON output, and what the text is printed from)."""
    last = arm.last_validation
    milestone_eta = None
    if arm.milestone_step and arm.step < arm.milestone_step:
        milestone_eta = eta_mod.eta(arm, arm.milestone_step, now)
    return {
        "name": arm.name,
        "baseline": arm.name == baseline,
        "status": arm.status,
        "hparams": {label: value for label, value, _ in shown_hparams(arm.hparams, differing or [])},
        "device": arm.device,
        "node": arm.node,
        "queue": None if arm.queue_place is None else {"place": arm.queue_place, "of": arm.queue_length},
        "pid": arm.pid,
        "shares_process_with": list(arm.shares_process_with) if not arm.ended else [],
        "step": arm.step,
        "total_steps": arm.total_steps,
        "progress": arm.progress,
        "epoch": arm.epoch,
        "milestone_step": arm.milestone_step,
        "milestone_progress": arm.milestone_progress,
        "eta_milestone": _eta_dict(milestone_eta),
        "eta_end": _eta_dict(None if arm.ended else eta_mod.eta(arm, arm.total_steps, now)),
        "loss": arm.loss,
        "loss_smoothed": arm.smoothed_loss,
        "lr": arm.lr,
        "tokens_per_s": arm.tokens_per_s,
        "mean_step_s": arm.mean_step_s,
        "last_step_t": arm.last_step_t,
        "last_validation": None if last is None else {
            "step": last.step, "precision": last.precision, "recall": last.recall, "f1": last.f1,
            "sample_size": last.sample_size, "path": last.path, "t": last.t, "schedule": last.schedule,
            "cooled": _probe_dict(arm.probe_at(last.step)),
        },
        "validations": len(arm.validations),
        "last_checkpoint": None if arm.last_checkpoint is None else arm.last_checkpoint.step,
        "failure": None if arm.failure is None else {
            "error": arm.failure.error, "message": arm.failure.message, "hint": arm.failure.hint,
        },
        "exit_code": arm.exit_code,
        "stderr_tail": arm.stderr_tail if arm.status == CRASHED else [],
        "bad_lines": arm.bad_line_count,
        "first_bad_lines": [{"line": n, "reason": r} for n, r in arm.bad_lines[:5]],
    }


def _position(schedule: Any) -> str:
    """'  (LR 50% of peak, decay 50% done)': where in its schedule the score was taken."""
    if not isinstance(schedule, dict) or not isinstance(schedule.get("lr_fraction"), (int, float)):
        return ""
    return f"  (LR {schedule['lr_fraction']:.0%} of peak, decay {schedule.get('decay_done', 0):.0%} done)"


def _probe_dict(point: Any) -> dict[str, Any] | None:
    if point is None:
        return None
    return {"steps": point.steps, "lr_from": point.lr_from, "precision": point.precision, "recall": point.recall,
            "f1": point.f1, "seconds": point.seconds, "failed": point.failed}


def reference_summary(reference: Any) -> dict[str, Any] | None:
    """The experiment's reference (validated before the arms started) as plain data."""
    if reference is None:
        return None
    v = reference.validation or {}
    return {"name": reference.name, "model": reference.model, "path": reference.path, "problem": reference.problem,
            **{key: v.get(key) for key in ("precision", "recall", "f1", "n")}}


def summarize(state: ExperimentState, now: float) -> dict[str, Any]:
    verdict = state.verdict
    return {
        "experiment": state.name,
        "folder": str(state.root),
        "baseline": state.baseline,
        "now": now,
        "arms": [arm_summary(a, now, state.baseline, state.differing_keys) for a in state.arms.values()],
        "reference": reference_summary(getattr(state, "reference", None)),
        "verdict": None if verdict is None else verdict.to_dict(),
        "problems": list(state.problems),
    }


# ---------------------------------------------------------------- text


def _pct(x: float | None) -> str:
    return "-" if x is None else pct(x)


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _eta_text(e: dict[str, Any] | None) -> str:
    return "ETA -" if e is None else f"ETA {e['clock']} ({e['human']})"


def arm_lines(a: dict[str, Any], now: float) -> list[str]:
    head = f"{a['name']}{' [baseline]' if a['baseline'] else ''}  {a['status'].upper()}"
    if a["queue"]:
        head += f" {a['queue']['place']}" + (f"/{a['queue']['of']}" if a["queue"]["of"] else "")
    if a["device"]:
        head += f"  {a['device']}"
    if a["node"]:
        head += f" on node {a['node']}"
    if a["pid"]:
        head += f"  pid {a['pid']}"
    if a.get("shares_process_with"):
        head += f"  co-trained with {', '.join(a['shares_process_with'])} (one process)"
    total = a["total_steps"] if a["total_steps"] is not None else "?"
    progress = f" ({_pct(a['progress'])})" if a["progress"] is not None else ""
    speed = f"  {a['mean_step_s']:.2f} s/step" if a["mean_step_s"] else ""
    tokens = f"  {a['tokens_per_s']:,.0f} tokens/s" if a["tokens_per_s"] else ""
    lines = [head]
    if a["hparams"]:
        lines.append("  " + "  ".join(f"{label} {value}" for label, value in a["hparams"].items()))
    lines.append(f"  step {a['step']}/{total}{progress}  epoch {_num(a['epoch'], '.2f')}{speed}{tokens}")
    if a["milestone_step"]:
        ms = a["milestone_step"]
        if a["step"] < ms:
            when = "not reached" if a["status"] in ENDED else _eta_text(a["eta_milestone"])
            lines.append(f"  milestone {ms}: {_pct(a['milestone_progress'])}  {when}")
        else:
            validated = a["last_validation"] is not None and a["last_validation"]["step"] >= ms
            lines.append(f"  milestone {ms}: reached, {'validated' if validated else 'not validated yet'}")
    if a["status"] not in ENDED:
        lines.append(f"  end {total}: {_eta_text(a['eta_end'])}")
    if a["status"] == STALLED and a["last_step_t"] is not None:
        quiet = eta_mod.human_duration(now - a["last_step_t"])
        lines.append(f"  stalled: no step for {quiet} (last at {eta_mod.clock_time(a['last_step_t'], now)}); "
                     "see the arm's stdout.log and stderr.log")
    lines.append(f"  loss {_num(a['loss'], '.4f')} (smoothed {_num(a['loss_smoothed'], '.4f')})"
                 f"  lr {_num(a['lr'], '.2e')}")
    v = a["last_validation"]
    if v is not None:
        size = f" on {v['sample_size']} samples" if v["sample_size"] else ""
        lines.append(f"  validation at step {v['step']}{size}: precision {_pct(v['precision'])}  "
                     f"recall {_pct(v['recall'])}  F1 {_pct(v['f1'])}{_position(v.get('schedule'))}")
        cooled = v.get("cooled")
        if cooled is not None and cooled["failed"]:
            lines.append(f"  cooldown probe ({cooled['steps']} steps) gave no score: {cooled['failed']}")
        elif cooled is not None:
            lines.append(f"  cooled down ({cooled['steps']} steps, LR {_num(cooled['lr_from'], '.2e')} -> 0, "
                         f"{_num(cooled['seconds'], '.1f')} s): precision {_pct(cooled['precision'])}  "
                         f"recall {_pct(cooled['recall'])}  F1 {_pct(cooled['f1'])}")
    failure = a["failure"]
    if failure is not None:
        lines.append(f"  crashed: {failure['error']}: {failure['message']}")
        if failure["hint"]:
            lines.append(f"  hint: {failure['hint']}")
    if a["exit_code"] not in (None, 0):
        lines.append(f"  exit status {a['exit_code']}")
    if a["stderr_tail"]:
        lines.append("  stderr.log, last lines:")
        lines += [f"    | {line}" for line in a["stderr_tail"][-STDERR_LINES_SHOWN:]]
    if a["bad_lines"]:
        first = a["first_bad_lines"][0]
        lines.append(f"  {a['bad_lines']} unreadable event line(s); first: line {first['line']}: {first['reason']}")
    return lines


def reference_lines(r: dict[str, Any]) -> list[str]:
    lines = [f"{r['name']} [reference]  {r['model']}"]
    if r["problem"]:
        return lines + [f"  no usable validation: {r['problem']}"]
    return lines + [f"  validation on {r['n']} samples: precision {_pct(r['precision'])}  recall {_pct(r['recall'])}  "
                    f"F1 {_pct(r['f1'])}"]


def versus_lines(reference: dict[str, Any] | None) -> list[str]:
    """Each arm's F1 against the reference, as the verdict's paired bootstrap gives it."""
    if not reference:
        return []
    return [f"  {arm} {c['describe']}: F1 {100 * c['f1']['diff']:+.1f} points "
            f"[{100 * c['f1']['low']:+.1f}, {100 * c['f1']['high']:+.1f}]"
            for arm, c in (reference.get("comparisons") or {}).items()]


def render(summary: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(summary["now"]))
    lines = [f"{summary['experiment']}  ({len(summary['arms'])} arms)  {summary['folder']}  at {when}"]
    lines += [f"warning: {p}" for p in summary["problems"]]
    for arm in summary["arms"]:
        lines.append("")
        lines += arm_lines(arm, summary["now"])
    if summary.get("reference"):
        lines.append("")
        lines += reference_lines(summary["reference"])
    lines.append("")
    verdict = summary["verdict"]
    if verdict is not None:
        lines.append(f"verdict: {verdict['headline']}")
        lines += versus_lines(verdict.get("reference"))
    else:
        waiting = [a["name"] for a in summary["arms"] if not a["validations"]]
        lines.append("verdict: not yet" + (f" (waiting for validation of {', '.join(waiting)})" if waiting else ""))
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace, clock: Callable[[], float] = time.time) -> int:
    """Print the summary; 3 when an arm crashed, else 0."""
    exp = resolve_experiment(getattr(args, "name", None))
    watcher = ExperimentWatcher(exp, clock=clock)
    watcher.poll()
    summary = summarize(watcher.state, clock())
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(render(summary))
    return EXIT_ARM_CRASHED if watcher.state.any_crashed else EXIT_OK
