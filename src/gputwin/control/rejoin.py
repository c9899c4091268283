"""Going back to an experiment that is still running instead of starting a second one beside it.

`gputwin demo` typed again while a demo trains, or `gputwin run` of an experiment whose arms are
alive, should bring the user back to what runs: two more trainers on the same cores would slow both
runs down and leave the first one unwatched. This module finds such an experiment and says, in words
for the terminal, what was found; the CLI's handlers (gputwin.faces.commands) decide what to open.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.paths import ExperimentPaths
from ..core.profiles import Experiment, flatten_dict
from .supervise import arm_alive

DEMO_NAME = re.compile(r"demo-\d{8}-\d{6}(-\d+)?")  # launcher.demo_experiment's names
IGNORED_KEYS = ("source",)  # where a profile was read from: the same file may be named another way


@dataclass(frozen=True)
class Running:
    """An experiment with live arms, and how to say so."""

    exp: ExperimentPaths
    alive: tuple[str, ...]  # arm names whose trainers are alive
    others: tuple[str, ...] = ()  # other running experiments of the same kind (demos), newest first

    def note(self, new_hint: str) -> str:
        """The message shown on attaching: what is running and how to start another one instead."""
        text = (f"Attached to {self.exp.name}, which is already running (arms alive: {', '.join(self.alive)}); "
                f"nothing new was started. {new_hint}")
        if self.others:
            text += f" Also running: {', '.join(self.others)}."
        return text


def live_arms(exp: ExperimentPaths) -> tuple[str, ...]:
    """Names of the arms whose trainer process is alive (pid and start time both match)."""
    return tuple(a.name for a in exp.arms() if arm_alive(a))


def running_demo(root: Path) -> Running | None:
    """The newest demo experiment under `root` with a live arm, or None."""
    if not root.is_dir():
        return None
    found = []
    for folder in sorted(root.iterdir(), key=lambda p: p.name, reverse=True):  # names are time stamps
        if not DEMO_NAME.fullmatch(folder.name) or not (folder / "experiment.json").is_file():
            continue
        alive = live_arms(ExperimentPaths(folder))
        if alive:
            found.append(Running(ExperimentPaths(folder), alive))
    if not found:
        return None
    return Running(found[0].exp, found[0].alive, tuple(r.exp.name for r in found[1:]))


def running_experiment(exp: ExperimentPaths) -> Running | None:
    """`exp` itself when any of its arms is alive."""
    if not exp.experiment_json.is_file():
        return None
    alive = live_arms(exp)
    return Running(exp, alive) if alive else None


def _comparable(data: Any) -> Any:
    """A profile or experiment as plain JSON values (tuples as lists), without where it was read from."""
    plain = json.loads(json.dumps(data))
    if isinstance(plain, dict):
        return {k: _comparable(v) for k, v in plain.items() if k not in IGNORED_KEYS}
    if isinstance(plain, list):
        return [_comparable(v) for v in plain]
    return plain


def differences(experiment: Experiment, exp: ExperimentPaths) -> list[str]:
    """Dotted keys where `experiment` (as given now) differs from what `exp` runs; [] when they agree."""
    try:
        running = json.loads(exp.experiment_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{exp.experiment_json}: cannot be read ({exc})",
                        f"`gputwin attach {exp.name}` shows the running experiment") from None
    given = _comparable(experiment.to_dict())
    running = _comparable(running)
    out: list[str] = []
    if given.get("arm_names") != running.get("arm_names"):
        return [f"arms: {', '.join(given.get('arm_names') or [])} given, "
                f"{', '.join(running.get('arm_names') or [])} running"]
    for key in sorted(set(flatten_dict(given.get("rules") or {})) | set(flatten_dict(running.get("rules") or {}))):
        if flatten_dict(given.get("rules") or {}).get(key) != flatten_dict(running.get("rules") or {}).get(key):
            out.append(f"rules.{key}")
    for mine, theirs in zip(given.get("arms") or [], running.get("arms") or []):
        a, b = flatten_dict(mine), flatten_dict(theirs)
        out += [f"{mine.get('name')}: {key}" for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
    return out


def attach_or_refuse(experiment: Experiment, running: Running) -> None:
    """Attaching to a running experiment is right only when the profiles given are the ones it runs."""
    changed = differences(experiment, running.exp)
    if changed:
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise UserError(
            f"experiment {running.exp.name} is running (arms alive: {', '.join(running.alive)}) with other "
            f"settings than the files given: {shown}",
            f"watch it with `gputwin attach {running.exp.name}`, or start these profiles beside it with --new "
            "(or --name NEW_NAME)")


def fresh_name(root: Path, name: str) -> str:
    """`name`, or `name-2`, `name-3`, ... : the first one no experiment folder under `root` has."""
    candidate, n = name, 2
    while (root / candidate).exists():
        candidate, n = f"{name}-{n}", n + 1
    return candidate
