"""Start arms detached from the terminal, and control them afterwards.

`start_experiment` writes the experiment folder and spawns one supervised trainer per arm, or one per
group of arms co-trained on one base model (gputwin.core.placement, supervise.supervise_group); the request functions turn `gputwin stop/extend/validate-now/resume` into
control files or respawns after checking the arm is in a state where that makes sense. The
CLI's handlers for these (`gputwin run`, `attach`, `demo`, `stop`, ...) are in gputwin.faces.commands.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from . import requests as control
from .bytecode import child_env
from ..core import paths
from ..core.errors import UserError
from ..core.paths import ArmPaths, ExperimentPaths, make_private_dir, resolve_experiment, write_atomic
from ..core.placement import cotrain_groups
from .preflight import check_arms_can_start, check_plans, check_reference
from ..core.profiles import Experiment, Profile, load_experiment, load_resolved, with_replicates
from ..core.lifecycle import CRASHED, FAILED, FINISHED, LIFE_ENDED as ENDED, NOT_STARTED, RUNNING, STOPPED
from .supervise import (arm_alive, arm_lock, SpawnError, Supervisor, arm_status, ending, start_group_supervisor,
                        start_supervisor, supervisor_active, wait_for_trainer)

__all__ = [
    "start_experiment", "spawn_arm", "arm_alive", "arm_status", "request_stop", "request_extend",
    "request_validate", "resume_arm", "apply_actions", "read_actions", "actions_applied_by",
    "changing_actions", "apply_verdict_once",
    "resolve_experiment", "resolve_arm", "demo_profile", "demo_experiment",
    "RUNNING", "FINISHED", "STOPPED", "FAILED", "CRASHED", "NOT_STARTED", "ENDED",
]

SUPERVISOR_WAIT_S = 30.0  # how long resume waits for an ending arm's supervisor to record the exit
ACTIONS_FILE = "actions.jsonl"
AUTO = "auto"  # `by` of actions applied because rules.on_verdict = "apply"
CHANGING_ACTIONS = frozenset({"stop", "extend"})
CALLBACK_SOURCE = "hf-trainer:"  # callback.SOURCE_PREFIX: arms run by a user's own HF Trainer script
DEMO_DATA_DIR = ".demo-data"  # under the logs root: shared by every demo run, never an experiment name

Say = Callable[[str], None]


def _quiet(_message: str) -> None:
    """Default for `say`: library calls print nothing."""


def _read_profile(arm: ArmPaths) -> Profile:
    return load_resolved(arm.profile_json)


def _cpu_threads(profile: Profile, cpu_arms: int) -> int | None:
    """A fair share of the cores for a CPU arm (GPU arms leave threading to torch)."""
    if profile.device is not None:
        return None
    if profile.train.threads:
        return profile.train.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, cpu_arms))


# ---------------------------------------------------------------- starting


def _arm_env(profile: Profile, threads: int | None) -> dict[str, str]:
    env = child_env(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = "" if profile.device is None else str(profile.device)
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # GPU indices as nvidia-smi and NVML number them
    env["PYTHONUNBUFFERED"] = "1"  # stdout.log stays live
    if threads is not None:
        env["GPUTWIN_THREADS"] = str(threads)
    return env


def spawn_arm(arm: ArmPaths, profile: Profile, *, threads: int | None,
              command: Sequence[str] | None = None) -> int:
    """Start the arm's trainer detached (through its supervisor); returns the trainer's pid.

    `command` replaces `python -m gputwin.train ARM_DIR` (tests use a trivial child).
    """
    return _trainer_pid(arm, start_supervisor(arm, _arm_env(profile, threads), command))


def _trainer_pid(arm: ArmPaths, supervisor: Supervisor) -> int:
    try:
        return wait_for_trainer(arm, supervisor)
    except SpawnError as exc:
        raise UserError(str(exc), f"fix what {arm.stderr} reports, then `gputwin resume {arm.name}`") from None


@contextmanager
def launch_lock(exp: ExperimentPaths) -> Iterator[None]:
    """Held while arms of `exp` are checked and spawned, so two launchers never start the same arm."""
    make_private_dir(exp.root)
    fd = os.open(exp.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"experiment {exp.name}: another gputwin command is starting its arms right now",
                            "wait a moment, then `gputwin status " + exp.name + "`") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _refuse_rerun(exp: ExperimentPaths) -> None:
    alive = [a.name for a in exp.arms() if arm_alive(a)]
    if alive:
        raise UserError(f"experiment {exp.name} is running (arms alive: {', '.join(alive)}) in {exp.root}",
                        f"watch it with `gputwin attach {exp.name}`, stop arms with `gputwin stop ARM -x {exp.name}`, "
                        "or start the profiles again beside it with --name NEW_NAME")
    if exp.experiment_json.exists():
        raise UserError(f"experiment {exp.name} already ran (all its arms have ended) in {exp.root}",
                        "run it again under a new name: add --name NEW_NAME; or continue it with "
                        f"`gputwin resume ARM -x {exp.name}` / `gputwin extend ARM -x {exp.name}`")


def _write_arm_files(arm: ArmPaths, profile: Profile) -> None:
    make_private_dir(arm.root)
    source = Path(profile.source) if profile.source else None
    if source is not None and source.is_file():
        shutil.copyfile(source, arm.profile_toml)
        os.chmod(arm.profile_toml, 0o600)
    write_atomic(arm.profile_json, json.dumps(profile.to_dict(), indent=2) + "\n")


def _ensure_data(profiles: Sequence[Profile], say: Say) -> None:
    """Make missing synthetic data once per distinct file pair, before any arm starts."""
    done: set[tuple[str, str]] = set()
    for p in profiles:
        pair = (p.data.train, p.data.test)
        if not p.data.synth_if_missing or pair in done:
            continue
        done.add(pair)
        if Path(p.data.train).is_file() and Path(p.data.test).is_file():
            continue
        from ..core.data import ensure_synth

        say(f"Making synthetic data: {p.data.train} ({p.data.synth_train} samples), "
            f"{p.data.test} ({p.data.synth_test} samples)")
        ensure_synth(Path(p.data.train), Path(p.data.test), train=p.data.synth_train, test=p.data.synth_test,
                     seed=p.data.synth_seed, locales=p.data.synth_locales)


def start_experiment(experiment: Experiment, *, root: Path | None = None, say: Say = _quiet,
                     commands: dict[str, Sequence[str]] | None = None) -> ExperimentPaths:
    """Create logs/<name>/ and spawn one detached trainer per arm.

    Refuses while arms of the experiment are alive, and refuses an experiment that already ran
    (a new --name runs the same profiles again). Arms run by the real trainer are checked first (GPU
    index, datasets, milestone), so a mistake there changes nothing on disk. `commands` maps arm names to a
    replacement for the trainer command (tests).
    """
    try:
        exp = paths.experiment(experiment.name, root)
    except ValueError as exc:
        raise UserError(str(exc), "pass --name NAME") from None
    experiment = with_replicates(experiment)
    on_ray = experiment.placement.backend == "ray"
    runnable = [p for p in experiment.arms if p.name not in (commands or {})]
    if on_ray:  # GPU indices are the cluster's business: only what every node would fail on is checked here
        from . import ray_backend

        check_plans(runnable)
        ray_backend.check_cluster(experiment, say)
    else:
        check_arms_can_start(runnable)
    check_reference(experiment)
    with launch_lock(exp):
        _refuse_rerun(exp)
        _ensure_data(experiment.arms, say)
        if experiment.reference is not None:  # validated (or found in the cache) before any arm starts
            from .reference_run import ensure_reference

            ensure_reference(experiment, exp.root, say)
        for profile in experiment.arms:
            _write_arm_files(exp.arm(profile.name), profile)
        write_atomic(exp.experiment_json, json.dumps(experiment.to_dict(), indent=2) + "\n")
        if on_ray:
            ray_backend.start_arms(exp, experiment, say, commands)
            return exp
        # One process per arm, or per group of arms co-trained on one base model ([placement] cotrain)
        by_name = {profile.name: profile for profile in experiment.arms}
        processes = [[by_name[name] for name in group] for group in
                     cotrain_groups(experiment.arms, experiment.placement.cotrain, alone=set(commands or {}))]
        cpu_processes = sum(1 for group in processes if group[0].device is None)
        # Every supervisor starts before the launcher waits for any: the arms' trainers start side by side.
        supervisors = [_start_process(exp, group, _cpu_threads(group[0], cpu_processes), commands)
                       for group in processes]
        failure: UserError | None = None
        for group, supervisor in zip(processes, supervisors):
            for profile in group:
                arm = exp.arm(profile.name)
                try:
                    pid = _trainer_pid(arm, supervisor)
                except UserError as exc:
                    failure = failure or exc
                    continue
                where = "CPU" if profile.device is None else f"GPU {profile.device}"
                shared = [p.name for p in group if p is not profile]
                together = f", co-trained with {', '.join(shared)} in one process" if shared else ""
                say(f"Started {profile.name} on {where} (pid {pid}{together}); log: {arm.root}")
        if failure is not None:
            raise failure
    return exp


def _start_process(exp: ExperimentPaths, group: Sequence[Profile], threads: int | None,
                   commands: dict[str, Sequence[str]] | None) -> Supervisor:
    """The supervisor of one arm, or of a co-trained group of arms (one trainer process for them all)."""
    first = group[0]
    if len(group) == 1:
        return start_supervisor(exp.arm(first.name), _arm_env(first, threads), (commands or {}).get(first.name))
    return start_group_supervisor([exp.arm(p.name) for p in group], _arm_env(first, threads))


def _respawnable_profile(arm: ArmPaths) -> Profile:
    profile = _read_profile(arm)
    if profile.source.startswith(CALLBACK_SOURCE):
        raise UserError(f"arm {arm.name} ran in your own script ({profile.source.removeprefix(CALLBACK_SOURCE)}); "
                        "gputwin cannot restart it",
                        "run the script again with trainer.train(resume_from_checkpoint=True)")
    return profile


def _respawn(exp: ExperimentPaths, arm: ArmPaths, command: Sequence[str] | None = None) -> int:
    profile = _respawnable_profile(arm)
    from . import ray_backend

    if ray_backend.is_ray_arm(arm):
        return ray_backend.respawn(arm)
    others = sum(1 for a in exp.arms() if a.name != arm.name and arm_alive(a)
                 and _read_profile(a).device is None)
    return spawn_arm(arm, profile, threads=_cpu_threads(profile, others + 1), command=command)


def _clear_stale_stops(arm: ArmPaths) -> None:
    """A stop request left over from the arm's last life must not stop the new one at once."""
    for path, request in control.pending(arm.control):
        if isinstance(request, control.Request) and request.action == control.STOP:
            control.consume(path)


# ---------------------------------------------------------------- control requests


def resolve_arm(exp: ExperimentPaths, name: str) -> ArmPaths:
    arms = exp.arms()
    for arm in arms:
        if arm.name == name:
            return arm
    listed = ", ".join(a.name for a in arms) or "(none)"
    raise UserError(f"experiment {exp.name} has no arm {name!r}; its arms: {listed}",
                    f"`gputwin status {exp.name}` lists them with their state")


def _running_or_refuse(arm: ArmPaths, what: str) -> None:
    status = arm_status(arm)
    ended_as = ending(arm) if status == RUNNING else None
    if ended_as is not None:
        raise UserError(f"cannot {what} arm {arm.name}: it has {ended_as} and is exiting",
                        f"`gputwin status` shows it; `gputwin extend {arm.name}` or `resume` continue it afterwards")
    if status != RUNNING:
        hint = {FINISHED: f"it finished; `gputwin extend {arm.name}` trains it further",
                STOPPED: f"`gputwin resume {arm.name}` restarts it from its last checkpoint",
                CRASHED: f"`gputwin resume {arm.name}` restarts it from its last checkpoint; see {arm.stderr}",
                FAILED: f"see the failed event in {arm.events} and {arm.stderr}, then `gputwin resume {arm.name}`",
                NOT_STARTED: "start it with `gputwin run`"}[status]
        raise UserError(f"cannot {what} arm {arm.name}: it is {status}, not running", hint)


def request_stop(exp: ExperimentPaths, arm: str, *, by: str = "cli") -> str:
    target = resolve_arm(exp, arm)
    _running_or_refuse(target, "stop")
    if any(isinstance(r, control.Request) and r.action == control.STOP for _, r in control.pending(target.control)):
        raise UserError(f"arm {arm} has a stop request waiting already", "it stops after its current step")
    control.write_request(target.control, control.STOP, by=by)
    return f"Stop requested for {arm}: it finishes its current step, saves a checkpoint and exits."


def request_validate(exp: ExperimentPaths, arm: str, *, by: str = "cli") -> str:
    target = resolve_arm(exp, arm)
    _running_or_refuse(target, "validate")
    control.write_request(target.control, control.VALIDATE, by=by)
    return f"Validation requested for {arm}: it validates its current adapter after this step, then trains on."


def request_extend(exp: ExperimentPaths, arm: str, epochs: int, *, by: str = "cli") -> str:
    """Running: a control request. Finished or stopped: the request, then a respawn that resumes from
    the final checkpoint and applies it. An arm that is just ending gets the request only: its
    supervisor sees it when the trainer exits and starts the trainer again."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise UserError(f"--epochs must be a whole number >= 1, got {epochs!r}", "e.g. --epochs 1")
    target = resolve_arm(exp, arm)
    with launch_lock(exp), arm_lock(target):
        status = arm_status(target)
        if status in (CRASHED, FAILED, NOT_STARTED):
            raise UserError(f"cannot extend arm {arm}: it is {status}",
                            f"`gputwin resume {arm}` first (see {target.stderr}), then extend it")
        if status == RUNNING or supervisor_active(target):
            control.write_request(target.control, control.EXTEND, epochs=epochs, by=by)
            return f"Extend requested for {arm}: {epochs} more epoch(s), applied after its current step."
        _respawnable_profile(target)
        _clear_stale_stops(target)
        control.write_request(target.control, control.EXTEND, epochs=epochs, by=by)
        pid = _respawn(exp, target)
    return f"Extending {arm} by {epochs} epoch(s): it was {status}; restarted from its last checkpoint (pid {pid})."


def _wait_for_supervisor(arm: ArmPaths) -> None:
    """An arm whose trainer just ended: let its supervisor record the exit before starting a new life."""
    deadline = time.monotonic() + SUPERVISOR_WAIT_S
    while supervisor_active(arm) and not arm_alive(arm):
        if time.monotonic() > deadline:
            raise UserError(f"arm {arm.name}: its supervisor has not recorded the trainer's end",
                            "try again in a moment; `gputwin status` shows the arm")
        time.sleep(0.05)


def resume_arm(exp: ExperimentPaths, arm: str, *, by: str = "cli") -> str:
    target = resolve_arm(exp, arm)
    with launch_lock(exp):
        _wait_for_supervisor(target)
        with arm_lock(target):
            status = arm_status(target)
            if status == RUNNING:
                raise UserError(f"arm {arm} is already running", f"`gputwin stop {arm}` stops it")
            if status == FINISHED:
                raise UserError(f"arm {arm} finished; there is nothing to resume",
                                f"`gputwin extend {arm} --epochs N` trains it further")
            _clear_stale_stops(target)
            pid = _respawn(exp, target)
    return f"Resumed {arm} (it was {status}) from its last checkpoint: pid {pid}."


# ---------------------------------------------------------------- verdict actions


def _record(exp: ExperimentPaths, action: str, arm: str, epochs: int, by: str) -> None:
    """actions.jsonl: what was done to which arm, by whom; the report lists it."""
    line = json.dumps({"t": time.time(), "action": action, "arm": arm, "epochs": epochs, "by": by}) + "\n"
    fd = os.open(exp.root / ACTIONS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(line)


def read_actions(exp: ExperimentPaths) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        lines = (exp.root / ACTIONS_FILE).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line; the rest still counts
    return out


def apply_actions(exp: ExperimentPaths, verdict: Any, *, by: str) -> list[str]:
    """Carry out a verdict's stop/extend actions; returns one line per action (done or why not).

    Each action taken is appended to <exp>/actions.jsonl. An arm already in the wanted state is
    reported, not treated as an error, so applying twice is harmless.
    """
    messages: list[str] = []
    for action in verdict.actions:
        if action.kind == "continue":
            messages.append(f"{action.arm}: continues as it is.")
            continue
        try:
            if action.kind == "stop":
                message = request_stop(exp, action.arm, by=by)
            elif action.kind == "extend":
                message = request_extend(exp, action.arm, int(action.epochs), by=by)
            else:
                messages.append(f"{action.arm}: unknown action {action.kind!r}, skipped.")
                continue
        except UserError as exc:
            messages.append(f"{action.arm}: {action.kind} not applied: {exc.message}")
            continue
        _record(exp, action.kind, action.arm, int(getattr(action, "epochs", 0) or 0), by)
        messages.append(message)
    return messages


def actions_applied_by(exp: ExperimentPaths, by: str) -> bool:
    return any(entry.get("by") == by for entry in read_actions(exp))


def changing_actions(verdict: Any) -> list[Any]:
    """The verdict's actions that change a run (continue changes nothing)."""
    return [a for a in getattr(verdict, "actions", ()) if a.kind in CHANGING_ACTIONS]


def apply_verdict_once(exp: ExperimentPaths, verdict: Any) -> tuple[bool, list[str]]:
    """rules.on_verdict = "apply": carry out the verdict's stop/extend actions, once per experiment.

    The one rule for the terminal UI and `--headless` alike: whoever acts first wins. Once any action is
    recorded in actions.jsonl (a key, a CLI command, an earlier automatic apply by this monitor or another
    one on the same experiment), nothing is applied automatically: a person who acted has decided.
    Returns (applied, one line per action or the line that says why not).
    """
    if not changing_actions(verdict):
        return False, []
    taken = read_actions(exp)
    if taken:
        who = ", ".join(sorted({str(entry.get("by")) for entry in taken}))
        return False, [f"The verdict's actions were already taken (by {who}) and applied before; not repeating them."]
    return True, apply_actions(exp, verdict, by=AUTO)


# ---------------------------------------------------------------- the demo


def demo_profile() -> Path:
    """The demo experiment file: the copy shipped in the package, else the checkout's profiles/."""
    shipped = Path(__file__).resolve().parents[1] / "demo_profiles" / "demo.toml"
    if shipped.is_file():
        return shipped
    checkout = Path(__file__).resolve().parents[3] / "profiles" / "demo.toml"
    if checkout.is_file():
        return checkout
    raise UserError(f"the demo profiles are missing (looked for {shipped} and {checkout})",
                    "reinstall gputwin; the package ships them in gputwin/demo_profiles/")


def demo_experiment(now: datetime | None = None, root: Path | None = None) -> Experiment:
    """The demo under a fresh name, its synthetic data kept under the logs root (shared by demo runs)."""
    experiment = load_experiment(demo_profile())
    root = root or paths.logs_root()
    stamp = (now or datetime.now()).strftime("demo-%Y%m%d-%H%M%S")
    name, n = stamp, 2
    while (root / name).exists():
        name, n = f"{stamp}-{n}", n + 1
    data_dir = root / DEMO_DATA_DIR
    arms = tuple(
        dataclasses.replace(a, data=dataclasses.replace(a.data, train=str(data_dir / "train.jsonl"),
                                                        test=str(data_dir / "test.jsonl")))
        for a in experiment.arms
    )
    return dataclasses.replace(experiment, name=name, arms=arms)
