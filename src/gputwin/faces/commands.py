"""The CLI's handlers for starting, watching and steering arms: `gputwin run`, `attach`, `demo`, `stop`,
`extend`, `validate-now`, `resume` (cli.HANDLERS).

They sit on top of the launcher (which starts and steers trainers) and open the face the user asked for:
the Textual app, or headless progress lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from ..core import paths
from ..core.errors import UserError
from ..control.launcher import (demo_experiment, request_extend, request_stop, request_validate, resolve_arm,
                                resume_arm, start_experiment)
from ..core.paths import ExperimentPaths, resolve_experiment
from ..core.profiles import Experiment, Placement, load_any, with_replicates
from ..control.supervise import arm_alive


def _any_alive(exp: ExperimentPaths) -> bool:
    return any(arm_alive(a) for a in exp.arms())


def _open_ui(exp: ExperimentPaths, note: str | None = None) -> int:
    from .app import make_app

    app = make_app(exp, note=note)
    app.run()
    if app.terminal_gone:
        return 0  # nobody to tell: the arms train on, detached, as after `q`
    if _any_alive(exp):
        first = exp.arms()[0].name if exp.arms() else "ARM"
        print(f"Detached. Training continues: gputwin attach {exp.name} | gputwin status {exp.name} | "
              f"gputwin stop {first}")
    else:
        print(f"All arms of {exp.name} have ended: gputwin status {exp.name} | gputwin report {exp.name}")
    return 0


def _watch(exp: ExperimentPaths, experiment: Experiment, headless: bool, note: str | None = None) -> int:
    if note is not None:
        print(note)  # before the UI, so it is also in the terminal's scrollback after the UI closes
    if headless:
        from .headless import monitor

        return monitor(exp, rules=experiment.rules)
    return _open_ui(exp, note)


def _renamed(experiment: Experiment, name: str | None) -> Experiment:
    if name is not None and not paths.valid_name(name):
        raise UserError(f"--name {name!r} cannot be an experiment name", paths.NAME_HINT)
    if not name or name == experiment.name:
        return experiment
    return dataclasses.replace(experiment, name=name)


def _placed(experiment: Experiment, address: str | None) -> Experiment:
    """--ray ADDRESS: the arms go to that Ray cluster (a shared_path of the experiment file is kept)."""
    if address is None:
        return experiment
    if not address.strip():
        raise UserError("--ray needs the cluster's address", "e.g. --ray 10.0.0.5:6379, or --ray auto on a node of it")
    return dataclasses.replace(experiment, placement=Placement("ray", address.strip(),
                                                               experiment.placement.shared_path))


def _cotrained(experiment: Experiment, cotrain: str | None) -> Experiment:
    """--cotrain MODE: [placement] cotrain over the experiment file's (arms sharing a base model in one process)."""
    if cotrain is None:
        return experiment
    if experiment.placement.backend == "ray" and cotrain != "off":
        raise UserError("--cotrain: co-training runs arms in one process on this machine, not on a Ray cluster",
                        "leave --cotrain out with --ray (or [placement] backend = \"ray\")")
    return dataclasses.replace(experiment, placement=dataclasses.replace(experiment.placement, cotrain=cotrain))


def cmd_run(args: argparse.Namespace) -> int:
    """Start the experiment; when its arms are alive already, attach to it instead (--new: start it under a
    fresh name, beside whatever has the name now)."""
    from ..control import rejoin

    experiment = _renamed(load_any(args.paths, name=args.name), args.name)
    replicates = getattr(args, "replicates", None)
    if replicates is not None and not 0 <= replicates <= 8:
        raise UserError(f"--replicates must be from 0 to 8, got {replicates}", "1 runs every arm once more with the next seed")
    experiment = _placed(with_replicates(experiment, replicates), getattr(args, "ray", None))
    experiment = _cotrained(experiment, getattr(args, "cotrain", None))
    try:
        target = paths.experiment(experiment.name)
    except ValueError as exc:
        raise UserError(str(exc), "pass --name NAME") from None
    running = rejoin.running_experiment(target)
    if getattr(args, "new", False):
        experiment = dataclasses.replace(experiment, name=rejoin.fresh_name(target.root.parent, experiment.name))
    elif running is not None:
        rejoin.attach_or_refuse(experiment, running)
        again = " ".join(["gputwin", "run", *args.paths, "--new"])
        note = running.note(f"`{again}` starts these profiles again beside it.")
        return _watch(running.exp, experiment, args.headless, note)
    exp = start_experiment(experiment, say=print)
    return _watch(exp, experiment, args.headless)


def cmd_attach(args: argparse.Namespace) -> int:
    try:
        exp = resolve_experiment(args.name)
    except UserError as exc:
        if args.name is not None:
            raise
        print(f"gputwin: {exc.message}.\nStart one with `gputwin run EXPERIMENT.toml` (or two profiles), "
              "or try `gputwin demo` for a CPU demo that reaches a verdict in a few minutes.")
        return 1
    return _open_ui(exp)


def _recorded(exp: ExperimentPaths) -> Experiment:
    """The experiment as it was started (its experiment.json)."""
    try:
        return Experiment.from_dict(json.loads(exp.experiment_json.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{exp.experiment_json}: cannot be read ({exc})",
                        f"`gputwin status {exp.name}` shows what its arms do") from None


def cmd_demo(args: argparse.Namespace) -> int:
    """Start the demo; while one still trains, attach to it instead (--new: start another)."""
    from ..control import rejoin

    running = None if getattr(args, "new", False) else rejoin.running_demo(paths.logs_root())
    if running is not None:
        note = running.note("`gputwin demo --new` starts another demo beside it.")
        return _watch(running.exp, _recorded(running.exp), args.headless, note)
    experiment = _placed(demo_experiment(), getattr(args, "ray", None))
    exp = start_experiment(experiment, say=print)
    return _watch(exp, experiment, args.headless)


def _arm_target(args: argparse.Namespace) -> ExperimentPaths:
    return resolve_experiment(getattr(args, "experiment", None))


def cmd_stop(args: argparse.Namespace) -> int:
    print(request_stop(_arm_target(args), args.arm))
    return 0


def cmd_extend(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .planview import arm_plan_text

    exp = _arm_target(args)
    target = resolve_arm(exp, args.arm)
    plan = arm_plan_text(exp.experiment_json, target.events, args.arm, args.epochs)  # before the trainer moves on
    print(request_extend(exp, args.arm, args.epochs))
    if plan is not None:
        Console(highlight=False).print(plan)
    return 0


def cmd_validate_now(args: argparse.Namespace) -> int:
    print(request_validate(_arm_target(args), args.arm))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    print(resume_arm(_arm_target(args), args.arm))
    return 0
