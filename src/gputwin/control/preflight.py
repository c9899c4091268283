"""What `gputwin run` refuses before it writes anything: mistakes a trainer would only fail on later.

    check_arms_can_start(profiles)   check_devices + check_plans; raises a UserError naming the file and key
    check_reference(experiment)      the [reference] folder is there and holds a model or an adapter

A GPU index the machine does not have, a dataset without one usable line and a milestone after the
last step would each leave an experiment folder with failed arms behind; refused here, they change
nothing on disk. Arms whose data is made on first run (synth_if_missing) are checked by its size.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from ..core.profiles import Experiment, Profile, ProfileError, reference_folder_problem


def check_arms_can_start(profiles: Sequence[Profile]) -> None:
    """Everything below, for the arms the real trainer will run."""
    check_devices(profiles)
    check_plans(profiles)


def _line_of_device(source: str) -> int | None:
    """Line of the top-level `device = ...` in a profile file, for the message (None when not found)."""
    try:
        lines = Path(source).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for number, line in enumerate(lines, start=1):
        if line.lstrip().startswith("["):
            return None  # past the top-level keys
        if re.match(r"^\s*device\s*=", line):
            return number
    return None


def check_devices(profiles: Sequence[Profile]) -> None:
    """A GPU index this machine does not have is refused here, naming the profile and its `device` key.

    GPU indices are NVML's (the order nvidia-smi shows); a machine without an NVIDIA driver has none.
    """
    wanted = [p for p in profiles if p.device is not None]
    if not wanted:
        return
    from ..reading.gpu import Nvml

    nvml = Nvml()
    try:
        count = nvml.device_count()
    finally:
        nvml.shutdown()
    for profile in wanted:
        if profile.device < count:  # type: ignore[operator]
            continue
        if count == 0:
            why = nvml.reason or "NVML found none"
            problem = f"GPU {profile.device} requested, but this machine has no usable NVIDIA GPU ({why})"
            hint = 'set device = "cpu" to train on the CPU, or run it on the machine with the GPUs'
        else:
            problem = f"GPU {profile.device} requested, but this machine has {count} GPU(s): 0 to {count - 1}"
            hint = f'use an index from 0 to {count - 1} (as nvidia-smi numbers them) or device = "cpu"'
        raise ProfileError(profile.source or profile.name, "device", problem, hint, _line_of_device(profile.source))


def check_plans(profiles: Sequence[Profile]) -> None:
    """What a trainer would fail on minutes later, refused now: a data file without one usable line
    (the message lists its bad lines), a milestone after the last step (the arm would never validate)."""
    from ..core.data import load_dataset
    from ..core.plan import plan_profile

    tests: set[str] = set()
    for profile in profiles:
        plan_profile(profile)  # reads the training data (unless it is made on first run)
        test = profile.data.test
        if test not in tests and (Path(test).is_file() or not profile.data.synth_if_missing):
            tests.add(test)
            load_dataset(test)


def check_reference(experiment: Experiment) -> None:
    """A reference folder that is gone, or holds neither an adapter nor a model, is refused here; whether it
    loads is then settled by validating it, still before any arm starts (gputwin.control.reference_run)."""
    if experiment.reference is None:
        return
    problem = reference_folder_problem(Path(experiment.reference.model))
    if problem:
        raise ProfileError(experiment.source or experiment.name, "reference.model", *problem)
