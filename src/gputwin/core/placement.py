"""Which arms share a process: co-training groups (the experiment's [placement] table, docs/profiles.md).

Arms that load the same frozen base on the same device in the same dtype can train in one process with
one copy of the base and one pass of it per step for all of them (gputwin.train.cotrain). Pure: profiles
in, lists of arm names out.
"""

from __future__ import annotations

from typing import Any, Collection, Sequence

from .profiles import COTRAIN_DEFAULT, COTRAIN_MODES, Profile

__all__ = ["COTRAIN_DEFAULT", "COTRAIN_MODES", "cotrain_groups", "share_key"]


def share_key(profile: Profile) -> tuple[Any, ...] | None:
    """What arms must have in common to share one model; None for an arm that cannot be co-trained
    (a tag model, whose head is trained per arm, or a continued adapter)."""
    if profile.model.task != "generate" or profile.model.init_adapter:
        return None
    dtype = profile.model.dtype
    if dtype == "auto":
        dtype = "fp32" if profile.device is None else "bf16"
    return (profile.model.base, profile.device, dtype, profile.model.trust_remote_code)


def cotrain_groups(arms: Sequence[Profile], mode: str, *, alone: Collection[str] = ()) -> list[list[str]]:
    """The arms' names by process, in the arms' order: "off" one process per arm; "on" one per set of arms
    with the same share_key; "auto" the same for GPU arms only (on a CPU the arms already split the cores,
    and one process gains nothing) that do not ask for compiled layers (train.compile = "on": the co-training
    step is not compiled). Arms in `alone` keep a process of their own."""
    groups: dict[Any, list[str]] = {}
    for profile in arms:
        key = share_key(profile)
        if (mode == "off" or key is None or profile.name in alone
                or (mode == "auto" and (profile.device is None or profile.train.compile == "on"))):
            key = ("alone", profile.name)
        groups.setdefault(key, []).append(profile.name)
    return list(groups.values())
