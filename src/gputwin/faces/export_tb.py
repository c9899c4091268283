"""`gputwin export --tensorboard DIR [NAME]`: every arm of an experiment as a TensorBoard run, so gputwin
runs sit next to a user's other runs (``tensorboard --logdir DIR``).

    run_scalars(events) -> RunScalars         pure: an arm's scalar series from its event log
    export_tensorboard(exp, out_dir) -> list[Exported]
    cmd_export(args)

One run per arm, ``DIR/<experiment>/<arm>/``, with these tags (wall times are the log's):

    train/loss, train/lr, train/grad_norm, train/tokens_per_s    each step event
    validation/precision, validation/recall, validation/f1       each validation (fractions 0..1)
    validation_by_type/<TYPE>/precision, .../recall, .../f1       when the validation has per-type scores

and the arm's resolved profile as hyperparameters (TensorBoard's HPARAMS tab). Steps that a resumed arm
trained again after going back to a checkpoint are written once, as the arm's loss curve shows them.
Writing needs tensorboardX (the ``tensorboard`` extra), imported only here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..core import events as ev
from ..core.errors import UserError
from ..core.paths import ArmPaths, ExperimentPaths
from ..core.state import event_number

STEP_FIELDS = ("loss", "lr", "grad_norm", "tokens_per_s")
METRICS = ("precision", "recall", "f1")
SUFFIX = ".gputwin"  # ends the event files this command writes, so a new export replaces exactly those
INSTALL_HINT = "pip install 'gputwin[tensorboard]' (or: pip install tensorboardX)"


@dataclass(frozen=True)
class Validation:
    """One validation as exported: scores are fractions; ``per_type`` maps TYPE -> {precision, recall, f1}."""

    step: int
    t: float
    scores: dict[str, float]
    per_type: dict[str, dict[str, float]] | None
    path: str | None


@dataclass
class RunScalars:
    """An arm's scalars: one row per step kept, (step, wall time, {field: value}), and validations by step."""

    steps: list[tuple[int, float, dict[str, float]]] = field(default_factory=list)
    validations: dict[int, Validation] = field(default_factory=dict)

    def series(self, name: str) -> list[tuple[int, float, float]]:
        """(step, value, wall time) of one step field, where it was logged."""
        return [(step, values[name], t) for step, t, values in self.steps if name in values]


def _scores(source: Mapping[str, Any]) -> dict[str, float]:
    return {m: v for m in METRICS if (v := event_number(source.get(m))) is not None}


def _per_type(value: Any) -> dict[str, dict[str, float]] | None:
    if not isinstance(value, Mapping) or not value:
        return None
    return {str(t): _scores(m) for t, m in value.items() if isinstance(m, Mapping)}


def _rewind(scalars: RunScalars, step: int) -> None:
    """A restart from the checkpoint at ``step`` logs the later steps again: keep only the new ones."""
    while scalars.steps and scalars.steps[-1][0] > step:
        scalars.steps.pop()


def run_scalars(events: Iterable[ev.Event]) -> RunScalars:
    """The arm's scalars from its events (the same restarts as gputwin.core.state's fold: a later ``started``
    goes back to its ``step``, or 0; a ``resumed`` to its ``step``). A step validated twice keeps the later."""
    scalars, started = RunScalars(), False
    for event in events:
        if event.kind == ev.STEP:
            step = event.get("step")
            if not isinstance(step, int) or isinstance(step, bool):
                continue
            values = {name: v for name in STEP_FIELDS if (v := event_number(event.get(name))) is not None}
            scalars.steps.append((step, event.t, values))
        elif event.kind == ev.STARTED:
            if started:
                _rewind(scalars, int(event_number(event.get("step")) or 0))
            started = True
        elif event.kind == ev.RESUMED and event_number(event.get("step")) is not None:
            _rewind(scalars, int(event_number(event.get("step")) or 0))
        elif event.kind == ev.VALIDATION and event_number(event.get("step")) is not None:
            step, path = int(event_number(event.get("step")) or 0), event.get("path")
            scalars.validations[step] = Validation(step, event.t, _scores(event.data), _per_type(event.get("per_type")),
                                                   path if isinstance(path, str) else None)
    return scalars


# ---------------------------------------------------------------- files


def _per_type_from_file(arm: ArmPaths, v: Validation) -> dict[str, dict[str, float]] | None:
    """Per-type scores from the validation file, for events that do not carry them (e.g. older logs)."""
    candidates = [arm.validation_file(v.step)]
    if v.path:
        path = Path(v.path)
        candidates.append(path if path.is_absolute() else arm.root / path)
    for path in candidates:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("step", v.step) == v.step:
            return _per_type(data.get("per_type"))
    return None


def _hparams(arm: ArmPaths, experiment: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """The arm's resolved profile, flattened, as TensorBoard takes hyperparameters (scalars and text)."""
    from ..core.profiles import flatten_dict

    try:
        profile = json.loads(arm.profile_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        arms = experiment.get("arms", [])
        profile = next((a for a in arms if isinstance(a, dict) and a.get("name") == arm.name), None)
    if not isinstance(profile, dict):
        return {}
    out: dict[str, bool | int | float | str] = {}
    for key, value in sorted(flatten_dict(profile).items()):
        if key in ("name", "source"):
            continue
        if isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
            out[key] = value
        elif isinstance(value, tuple):
            out[key] = ", ".join(map(str, value))  # target_modules: "q_proj, v_proj"
        else:
            out[key] = "none" if value is None else str(value)
    return out


@dataclass(frozen=True)
class Exported:
    """What one arm's run holds, for the command's summary."""

    arm: str
    run_dir: Path | None  # None: the arm had no events and was skipped
    steps: int = 0
    validations: int = 0
    bad_lines: int = 0


def _write_run(run_dir: Path, scalars: RunScalars, hparams: Mapping[str, Any]) -> None:
    """One event file; each step's scalars go in one summary (4x fewer records than a call per scalar,
    and about 5x faster to write: a long run's export takes seconds, not minutes)."""
    try:
        from tensorboardX import SummaryWriter
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.summary import hparams as hparams_summaries
    except ImportError:
        raise UserError("gputwin export --tensorboard needs the tensorboardX package, which is not installed",
                        INSTALL_HINT) from None
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob(f"events.out.tfevents.*{SUFFIX}"):
        old.unlink()  # an earlier export of this arm: the new one replaces it
    def summary(values: Iterable[tuple[str, float]]) -> Any:
        return Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values])

    writer = SummaryWriter(logdir=str(run_dir), filename_suffix=SUFFIX, max_queue=1000, flush_secs=3600)
    events = writer.file_writer
    try:
        for step, t, values in scalars.steps:
            if values:
                events.add_summary(summary((f"train/{name}", v) for name, v in values.items()), step, t)
        for v in sorted(scalars.validations.values(), key=lambda v: v.step):
            tags = [(f"validation/{metric}", value) for metric, value in v.scores.items()]
            tags += [(f"validation_by_type/{etype}/{metric}", value)
                     for etype, scores in (v.per_type or {}).items() for metric, value in scores.items()]
            events.add_summary(summary(tags), v.step, v.t)
        if hparams:
            # The session's start and end only: with no experiment summary of its own, TensorBoard's HPARAMS
            # tab gathers hyperparameters and metrics (the scalar tags) from every run under --logdir,
            # the user's own runs included.
            _, start, end = hparams_summaries(dict(hparams), {})
            events.add_summary(start)
            events.add_summary(end)
    finally:
        writer.close()


def export_tensorboard(exp: ExperimentPaths, out_dir: Path) -> list[Exported]:
    """Write one run per arm under ``out_dir/<experiment>/``; arms with no events yet are skipped."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder", "give a folder for the TensorBoard runs, e.g. runs/")
    try:
        experiment = json.loads(exp.experiment_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        experiment = {}
    done = []
    for arm in exp.arms():
        read = ev.read_events(arm.events)
        if not read.events:
            done.append(Exported(arm.name, None, bad_lines=len(read.bad_lines)))
            continue
        scalars = run_scalars(read.events)
        for step, v in list(scalars.validations.items()):
            if v.per_type is None:
                scalars.validations[step] = Validation(v.step, v.t, v.scores, _per_type_from_file(arm, v), v.path)
        run_dir = out_dir / exp.name / arm.name
        _write_run(run_dir, scalars, _hparams(arm, experiment if isinstance(experiment, dict) else {}))
        done.append(Exported(arm.name, run_dir, len(scalars.steps), len(scalars.validations), len(read.bad_lines)))
    return done


def cmd_export(args: Any) -> int:
    """`gputwin export --tensorboard DIR [NAME]`: write the runs and say where they are."""
    from ..core.paths import resolve_experiment

    exp = resolve_experiment(getattr(args, "name", None))
    out_dir = Path(args.tensorboard).expanduser().resolve()
    for item in export_tensorboard(exp, out_dir):
        skipped = f" ({item.bad_lines} unreadable lines skipped)" if item.bad_lines else ""
        if item.run_dir is None:
            print(f"{item.arm}: no events yet; not exported{skipped}")
        else:
            print(f"wrote {item.run_dir}: {item.steps} steps, {item.validations} "
                  f"validation{'s' if item.validations != 1 else ''}{skipped}")
    print(f"view: tensorboard --logdir {out_dir}")
    return 0
