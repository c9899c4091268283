"""The figures a user plans with, derived from profiles without training anything:
samples, steps per epoch, total steps and milestone step.

LoRA trainable parameters need the model's structure (torch, on the meta device): gputwin.train.modelshape.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

from .profiles import Profile, ProfileError

SYNTH_LABELS = 19  # O and B-/I- for each of the synthetic corpus's 9 entity types


@dataclass(frozen=True)
class Plan:
    samples: int
    steps_per_epoch: int
    total_steps: int
    milestone_step: int
    trainable_params: int | None
    base_params: int | None
    samples_note: str = ""


def steps_for(samples: int, batch_size: int, epochs: float) -> tuple[int, int]:
    """(steps per epoch, total steps); the last partial batch of an epoch is a step too."""
    per_epoch = max(1, math.ceil(samples / batch_size))
    return per_epoch, max(1, math.ceil(per_epoch * epochs))


def milestone_step(profile: Profile, steps_per_epoch: int) -> int:
    if profile.milestone.step is not None:
        return profile.milestone.step
    return max(1, round((profile.milestone.epoch or 1.0) * steps_per_epoch))


def count_samples(profile: Profile) -> tuple[int, str]:
    """Valid training samples; for data made on first use, the size it will be made with."""
    path = Path(profile.data.train)
    if not path.is_file():
        if profile.data.synth_if_missing:
            return profile.data.synth_train, "synthetic, made on first run"
        raise ProfileError(profile.source, "data.train", f"data file {path} does not exist",
                           "make one with `gputwin data synth --out DIR` or set synth_if_missing = true")
    info = path.stat()
    samples, bad, _ = _count_valid(str(path.resolve()), info.st_mtime_ns, info.st_size)
    return samples, f"{bad} bad lines skipped" if bad else ""


def entity_types(profile: Profile) -> tuple[str, ...] | None:
    """The training set's entity types, sorted; None for data made on first run."""
    path = Path(profile.data.train)
    if not path.is_file():
        return None
    info = path.stat()
    return _count_valid(str(path.resolve()), info.st_mtime_ns, info.st_size)[2]


def head_labels(profile: Profile) -> int:
    """Labels of a tag arm's classifier head as the trainer builds it: B- and I- per entity type of the
    training set, and O (for data made on first run, the synthetic corpus's 9 types: 19)."""
    types = entity_types(profile)
    return SYNTH_LABELS if types is None else 1 + 2 * len(types)


@functools.lru_cache(maxsize=16)
def _count_valid(path: str, mtime_ns: int, size: int) -> tuple[int, int, tuple[str, ...]]:
    """Valid samples, bad lines and entity types of a data file, read once per version of it (arms share a file)."""
    from .data import load_dataset

    dataset = load_dataset(Path(path))
    return len(dataset.samples), len(dataset.bad_lines), tuple(dataset.entity_types)


def check_adapter_head(profile: Profile) -> None:
    """A tag arm continuing an adapter trains the adapter's classifier head, one row per label it was saved
    with; a training set with other entity types would not fit it, or would fit it with rows that meant
    other labels. Refused before anything starts (data made on first run is checked by the trainer's load)."""
    if profile.model.task != "tag" or not profile.model.init_adapter:
        return
    from .adapter_shape import AdapterError, label_types, read_adapter
    from .encoding import bio_label_names

    try:
        adapter = read_adapter(profile.model.init_adapter)
    except AdapterError:
        return  # the profile was read without its files; the trainer's load reports it
    types = entity_types(profile)
    if adapter.label_names is None or types is None or list(adapter.label_names) == bio_label_names(types):
        return
    same = label_types(adapter.label_names) == list(types)
    raise ProfileError(profile.source, "data.train",
                       f"{profile.data.train} has the entity types {', '.join(types) or 'none'}, but the init "
                       f"adapter's head was trained for {', '.join(label_types(adapter.label_names))} "
                       f"({adapter.meta_file}{'; its rows are in another order' if same else ''})",
                       "train on data with the adapter's entity types, or start a new adapter (remove "
                       "model.init_adapter)")


def plan_profile(profile: Profile) -> Plan:
    """Steps and milestone of an arm, from its profile and data alone (no model: trainable_params is None;
    gputwin.train.modelshape.plan_with_params adds them)."""
    samples, note = count_samples(profile)
    per_epoch, total = steps_for(samples, profile.train.batch_size, profile.train.epochs)
    check_adapter_head(profile)
    milestone = milestone_step(profile, per_epoch)
    if milestone > total:
        key = "milestone.step" if profile.milestone.step is not None else "milestone.epoch"
        raise ProfileError(profile.source, key,
                           f"milestone at step {milestone} comes after the last step ({total} = "
                           f"{profile.train.epochs:g} epochs x {per_epoch} steps)",
                           "move the milestone earlier or train more epochs")
    return Plan(samples, per_epoch, total, milestone, None, None, note)
