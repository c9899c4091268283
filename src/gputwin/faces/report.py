"""The comparison report: ``comparison.md`` (for people: `less`, a code-hosting site) and
``verdict.json`` (for scripts), written from an experiment folder's files only.

    verdict_for_experiment(source) -> Verdict | None   the verdict from files or from a live ExperimentState
    write_report(exp_dir) -> (comparison.md, verdict.json)      the SVG figures it links go beside them
    cmd_report(args)                                  `gputwin report [NAME]`

The arms' state comes from the same fold the UI uses (watcher.ExperimentWatcher); each arm's
milestone result from ``<arm>/validation/step-NNNNNN.json`` (gputwin.reading.results).
"""

from __future__ import annotations

import json
import math
import time
import unicodedata
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core import state as st
from ..core.errors import UserError
from ..core.eta import human_duration
from ..core.metrics import METRICS, disagreements
from ..core.paths import ExperimentPaths, write_atomic
from ..reading.results import decide_experiment, verdict_for_state
from ..core.verdict import EXTEND, STOP, ArmResult, Verdict, level, pct

DISAGREEMENTS_SHOWN = 10
CONTEXT_CHARS = 30


# ---------------------------------------------------------------- the experiment's state and verdict


def load_state(exp: ExperimentPaths, now: float) -> st.ExperimentState:
    """Every arm's events folded once, as the UI and `gputwin status` see them."""
    from ..reading.watcher import ExperimentWatcher

    watcher = ExperimentWatcher(exp, clock=lambda: now)
    watcher.poll()
    return watcher.state


def verdict_for_experiment(source: st.ExperimentState | ExperimentPaths | Path | str, *,
                           now: float | None = None) -> Verdict | None:
    """The verdict for an experiment folder (or a live ExperimentState); None with fewer than two arms."""
    now = time.time() if now is None else now
    state = source if isinstance(source, st.ExperimentState) else load_state(_experiment_paths(source), now)
    return verdict_for_state(state, now=now)


def _experiment_paths(source: ExperimentPaths | Path | str) -> ExperimentPaths:
    exp = source if isinstance(source, ExperimentPaths) else ExperimentPaths(Path(source).resolve())
    if not exp.experiment_json.is_file():
        raise UserError(f"{exp.root}: no experiment.json here",
                        "name an experiment folder (logs/<name>) written by `gputwin run` or `gputwin demo`")
    return exp


# ---------------------------------------------------------------- markdown helpers


def _cell(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _width(text: str) -> int:
    """Terminal columns: CJK characters take two, so tables stay aligned in `less`."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> list[str]:
    """A plain markdown table, padded so it also reads well as text. ``align``: 'l' or 'r' per column."""
    cells = [[_cell(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    align = (align or "l" + "r" * (len(header) - 1)).ljust(len(header), "r")
    widths = [max(3, *(_width(r[i]) for r in cells)) for i in range(len(header))]

    def line(row: list[str]) -> str:
        padded = [c + " " * (w - _width(c)) if a == "l" else " " * (w - _width(c)) + c
                  for c, w, a in zip(row, widths, align)]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + ":" if a == "r" else "-" * w for w, a in zip(widths, align)) + " |"
    return [line(cells[0]), rule, *(line(r) for r in cells[1:])]


def _num(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _interval(m: Mapping[str, float]) -> str:
    return f"{pct(m['value'])} [{m['low'] * 100:.1f}, {m['high'] * 100:.1f}]"


def _diff(m: Mapping[str, float]) -> str:
    return f"{m['diff'] * 100:+.1f} pts [{m['low'] * 100:+.1f}, {m['high'] * 100:+.1f}]"


# ---------------------------------------------------------------- sections


def _verdict_section(verdict: Verdict | None, exp_name: str, actions_taken: list[dict[str, Any]]) -> list[str]:
    out = ["## Verdict", ""]
    if verdict is None:
        return out + ["Only one arm: nothing to compare.", ""]
    out += [f"**{verdict.headline}**", "", *(f"- {r}" for r in verdict.reasons), "", "### Recommended actions", ""]
    for action in verdict.actions:
        command = {STOP: f"gputwin stop {action.arm} -x {exp_name}",
                   EXTEND: f"gputwin extend {action.arm} --epochs {action.epochs} -x {exp_name}"}.get(action.kind)
        out.append(f"- {action.describe()}" + (f": `{command}`" if command else ""))
    if not verdict.actions:
        out.append("None yet.")
    out += ["", "### Actions taken", ""]
    if actions_taken:
        out += table(["time", "action", "arm", "epochs", "by"],
                     [[_when(a.get("t")), a.get("action"), a.get("arm"), a.get("epochs") or "", a.get("by")]
                      for a in actions_taken], "lllrl")
    else:
        out.append("None recorded.")
    return out + [""]


def _arms_section(state: st.ExperimentState, results: Mapping[str, ArmResult | None]) -> list[str]:
    rows = []
    for name, arm in state.arms.items():
        wall = None
        if arm.started_t is not None and arm.last_t is not None:
            wall = human_duration(arm.last_t - arm.started_t) + ("" if arm.ended else " (running)")
        result = results.get(name)
        rows.append([name, "baseline" if name == state.baseline else "challenger", arm.status, arm.device or "-",
                     f"{arm.step}/{arm.total_steps or '?'}", arm.milestone_step or "-",
                     result.step if result else "not yet", wall or "-"])
    return ["## Arms", "", *table(["arm", "role", "status", "device", "step", "milestone step", "validated at step",
                                   "wall time"], rows, "llllrrrr"), ""]


def _hyperparameters_section(state: st.ExperimentState) -> list[str]:
    out = ["## Differing hyperparameters", ""]
    if not state.differing_keys:
        return out + ["The arms' profiles do not differ.", ""]
    rows = [[key, *(arm.hparams.get(key, "-") for arm in state.arms.values())] for key in state.differing_keys]
    return out + table(["key", *state.arms], rows, "l" * (len(state.arms) + 1)) + [""]


def _metrics_section(verdict: Verdict, base: str) -> list[str]:
    m, comparisons = dict(verdict.metrics), dict(verdict.comparisons)
    if not m:
        return []
    goal = dict(verdict.goal)
    reference = verdict.reference or {}
    if reference.get("metrics"):  # the reference's column beside the arms', and each arm's difference from it
        ref = f"{reference['name']} (reference)"
        m[ref], goal[ref] = reference["metrics"], reference["goal"]
        comparisons.update({f"{arm} - {reference['name']}": c for arm, c in reference["comparisons"].items()})
    labels = [label if " - " in label else f"{label} - {base}" for label in comparisons]
    blank = [""] * len(comparisons)
    rows = [[label, *(_interval(m[a][key]) for a in m), *(_diff(c[key]) for c in comparisons.values())]
            for key, label in (("precision", "precision"), ("recall", "recall"), ("f1", "F1"))]
    rows.append(["macro F1", *("-" if m[a].get("macro_f1") is None else pct(m[a]["macro_f1"]) for a in m), *blank])
    rows.append(["tp / fp / fn", *(f"{m[a]['tp']} / {m[a]['fp']} / {m[a]['fn']}" for a in m), *blank])
    rows.append(["LR at score", *(_position_cell(m[a]) for a in m), *blank])
    if any(m[a].get("cooled") for a in m):
        rows.append(["raw F1 (before cooling)", *(pct(m[a]["raw"]["f1"]) if m[a].get("cooled") else "-" for a in m),
                     *blank])
        rows.append(["cooldown probe", *(f"{m[a]['cooled']['steps']} steps, {m[a]['cooled'].get('seconds') or 0:.1f} s"
                                         if m[a].get("cooled") else "-" for a in m), *blank])
    rows.append(["meets final goal", *("yes" if goal[a]["met"] else
                                       "no (" + ", ".join(k for k in METRICS if not goal[a][k]) + ")"
                                       for a in m), *blank])
    n = next(iter(m.values()))["n"]
    header = ["metric", *m, *labels]
    versus = (f" The differences from {reference['name']} (the reference) have "
              f"{level(next(iter(reference['comparisons'].values()))['confidence'])} intervals, one comparison "
              "per arm." if reference.get("comparisons") else "")
    out = ["## Milestone metrics", "",
           f"Entity-level scores on {n} held-out samples; [low, high] is the {level(verdict.confidence)} paired "
           "bootstrap interval, pts are percentage points." + versus, "",
           *table(header, rows, "l" + "r" * (len(header) - 1)), ""]
    out += [f"{c} beats {base} on F1 in {comp['f1']['p_b_better']:.1%} of {comp['resamples']:,} resamples."
            for c, comp in verdict.comparisons.items()]
    for arm, comp in (reference.get("comparisons") or {}).items():
        out.append(f"{arm} {comp['describe']}: ahead on F1 in "
                   f"{comp['f1']['p_b_better']:.1%} of {comp['resamples']:,} resamples "
                   f"({level(comp['confidence'])} interval).")
    return out + [""]


def _position_cell(m: Mapping[str, Any]) -> str:
    schedule = m.get("schedule") or {}
    fraction = schedule.get("lr_fraction")
    if not isinstance(fraction, (int, float)):
        return "-"
    if m.get("cooled"):
        return f"cooled from {fraction:.0%} of peak"
    return "end of decay" if fraction <= 0.02 or schedule.get("decay_done", 0) >= 1 else f"{fraction:.0%} of peak"


def _reference_section(verdict: Verdict | None, reference: Any) -> list[str]:
    """Which model the arms were held against, how it was validated, and the targets taken from it."""
    if reference is None:
        return []
    out = ["## Reference", "", f"**{reference.name}**: `{reference.model}`, the model in production, validated once "
           "before the arms started on the same seeded sample, with the same validator and decoder."]
    ran = (reference.validation or {}).get("reference", {}).get("command")
    if ran:
        out += ["", f"Validated with `{ran}`."]
    if not reference.usable():
        out += ["", f"It has no usable validation: {reference.problem}."]
    targets = (verdict.reference or {}).get("targets") if verdict is not None else None
    for key, t in (targets or {}).items():
        sign = "+" if t["offset"] >= 0 else "-"
        out.append(f"- {key} = reference {sign} {abs(t['offset']) * 100:.1f} points: {pct(t['reference'])} -> "
                   f"{pct(t['value'])}")
    return out + [""]


def _per_type_section(results: Mapping[str, ArmResult | None], base: str, reference: Any = None) -> list[str]:
    done = {name: r.validation.get("per_type", {}) for name, r in results.items() if r is not None}
    if done and reference is not None and reference.usable():
        done[f"{reference.name} (reference)"] = reference.validation.get("per_type", {})
    if not done:
        return []
    types = sorted({t for per_type in done.values() for t in per_type})
    reference = done.get(base) or next(iter(done.values()))
    rows = []
    for etype in types:
        row: list[Any] = [etype, reference.get(etype, {}).get("support", 0)]
        for per_type in done.values():
            m = per_type.get(etype)
            row.append("-" if m is None else f"{pct(m['f1'])} ({m['precision'] * 100:.0f} / {m['recall'] * 100:.0f})")
        rows.append(row)
    return ["## Per entity type", "", "F1 (precision / recall), support = gold entities of the type.", "",
            *table(["type", "support", *(f"{a} F1 (P / R)" for a in done)], rows, "l" + "r" * (len(done) + 1)), ""]


def _training_section(state: st.ExperimentState) -> list[str]:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else value if isinstance(value, str) else format(value, spec)

    arms = state.arms.values()
    rows = [
        ["steps done / planned", *(f"{a.step}/{a.total_steps or '?'}" for a in arms)],
        ["loss, first", *(fmt(a.first_loss, ".4f") for a in arms)],
        ["loss, last", *(fmt(a.last_loss, ".4f") for a in arms)],
        ["loss, min", *(fmt(None if a.min_loss is None else f"{a.min_loss:.4f} (step {a.min_loss_step})", "")
                        for a in arms)],
        ["loss, smoothed last (EMA 0.9)", *(fmt(a.smoothed_loss, ".4f") for a in arms)],
        ["throughput, mean tokens/s", *(fmt(a.speed_sum / a.speed_count if a.speed_count else None, ",.0f")
                                        for a in arms)],
        ["mean step time, s", *(fmt(a.mean_step_s, ".3f") for a in arms)],
        ["wall time", *("-" if a.started_t is None or a.last_t is None else human_duration(a.last_t - a.started_t)
                        for a in arms)],
        ["restarts", *(str(a.restarts) for a in arms)],
    ]
    return ["## Training", "", *table(["", *state.arms], rows), ""]


def _context(text: str, value: str) -> str:
    at = text.find(value)
    if at < 0:
        return text[: 2 * CONTEXT_CHARS] + ("…" if len(text) > 2 * CONTEXT_CHARS else "")
    start, end = max(0, at - CONTEXT_CHARS), min(len(text), at + len(value) + CONTEXT_CHARS)
    return ("…" if start else "") + text[start:at] + f"**{value}**" + text[at + len(value):end] + ("…" if end < len(text) else "")


def _disagreements_section(results: Mapping[str, ArmResult | None], base: str) -> list[str]:
    if results.get(base) is None:
        return []
    out = ["## Disagreements", "",
           "Entities one arm found and the other missed, from the examples stored in the validation files "
           "(the samples with the most errors).", ""]
    base_v = results[base].validation  # type: ignore[union-attr]
    for c, result in results.items():
        if c == base or result is None:
            continue
        for finder, finder_v, misser, misser_v in ((c, result.validation, base, base_v), (base, base_v, c, result.validation)):
            found = disagreements(finder_v, misser_v)
            out += [f"### Found by {finder}, missed by {misser} ({len(found)})", ""]
            if found:
                out += table(["sample", "type", "value", "context"],
                             [[d["index"], d["type"], d["value"], _context(d["text"], d["value"])]
                              for d in found[:DISAGREEMENTS_SHOWN]], "rlll")
                if len(found) > DISAGREEMENTS_SHOWN:
                    out.append(f"\n... and {len(found) - DISAGREEMENTS_SHOWN} more.")
            else:
                out.append("None among the stored examples.")
            out.append("")
    return out


# ---------------------------------------------------------------- the report


def _actions_taken(state: st.ExperimentState) -> list[dict[str, Any]]:
    from ..control.launcher import read_actions

    return sorted(read_actions(ExperimentPaths(state.root)), key=lambda a: a.get("t") or 0.0)


def render(state: st.ExperimentState, verdict: Verdict | None, results: Mapping[str, ArmResult | None],
           waiting: Mapping[str, str], now: float, figures: Sequence[str] = ()) -> str:
    """comparison.md from the folded state, the verdict and the milestone results (``figures``: the
    section that links the pictures, from gputwin.faces.figures)."""
    base = verdict.baseline if verdict else state.baseline or ""
    out = [f"# gputwin comparison: {state.name}", "",
           f"Experiment folder `{state.root}`, baseline **{base}**, written {_when(now)}.", ""]
    out += _verdict_section(verdict, state.name, _actions_taken(state))
    if waiting:
        out += ["## Not yet at the milestone", "", *(f"- **{name}**: {why}." for name, why in waiting.items()), ""]
    out += _arms_section(state, results)
    out += _hyperparameters_section(state)
    out += _reference_section(verdict, state.reference)
    if verdict is not None:
        out += _metrics_section(verdict, base)
    out += _per_type_section(results, base, state.reference)
    out += list(figures)
    out += _training_section(state)
    out += _disagreements_section(results, base)
    problems = list(state.problems) + [f"{n}: line {line}: {why}" for n, a in state.arms.items() for line, why in a.bad_lines]
    if problems:
        out += ["## Problems reading the files", "", *(f"- {p}" for p in problems), ""]
    return "\n".join(out).rstrip() + "\n"


def _write(exp: ExperimentPaths, now: float) -> tuple[Path, Path, Verdict | None]:
    from .figures import write_figures

    state = load_state(exp, now)
    verdict, results, waiting = decide_experiment(state, now)
    summary = {"experiment": state.name, "written_at": now,
               "validation_files": {name: r.path for name, r in results.items() if r is not None},
               **(verdict.to_dict() if verdict else {"scenario": None, "headline": "only one arm: nothing to compare"})}
    # the decision first: whoever waits on verdict.json does not wait for the pictures too
    write_atomic(exp.verdict, json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    figures = write_figures(exp.root, state, results, verdict)
    write_atomic(exp.comparison, render(state, verdict, results, waiting, now, figures))
    return exp.comparison, exp.verdict, verdict


def write_report(exp_dir: Path | str, *, now: float | None = None) -> tuple[Path, Path]:
    """Write comparison.md and verdict.json into the experiment folder; returns their paths."""
    comparison, verdict_json, _ = _write(_experiment_paths(exp_dir), time.time() if now is None else now)
    return comparison, verdict_json


def cmd_report(args: Any) -> int:
    """`gputwin report [NAME]`: write the report, print where it is and the verdict headline."""
    from ..core.paths import resolve_experiment

    comparison, verdict_json, verdict = _write(resolve_experiment(getattr(args, "name", None)), time.time())
    print(f"wrote {comparison}\nwrote {verdict_json}")
    print(f"verdict: {verdict.headline if verdict else 'only one arm: nothing to compare'}")
    return 0
