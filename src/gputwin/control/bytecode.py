"""Bytecode for the processes gputwin starts, also where Python is told not to write it next to the sources.

A trainer imports torch, transformers and peft: thousands of modules. Containers often set
PYTHONDONTWRITEBYTECODE=1 and install packages without their .pyc files; then every trainer compiles all
of those modules from source before its first step: 14.9 s for the trainer's imports against 5.2 s from
a cache on a 2-core machine (bench/RESULTS.md). What that setting is for is keeping __pycache__ folders
out of the source trees, so gputwin's child processes keep that and still get a cache: their bytecode
goes to a folder of gputwin's own (PYTHONPYCACHEPREFIX), never beside the sources.

    child_env(env)        env for a child Python: as given, or with the cache folder and writes allowed
    ships_bytecode()      do the installed packages have their .pyc files beside the sources?

Only where they do not: with a prefix set, Python reads bytecode from that folder alone, so an install
that has its .pyc files would compile everything once more. The folder must be this user's alone (mode 700,
made so if new): what is in it runs in every trainer. A PYTHONPYCACHEPREFIX the user set is kept as
it is; GPUTWIN_PYCACHE=off leaves the environment alone, and GPUTWIN_PYCACHE=DIR names the folder
(default $XDG_CACHE_HOME/gputwin/pycache, else ~/.cache/gputwin/pycache).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, Mapping

OFF = ("off", "0", "no", "false")


def cache_folder(env: Mapping[str, str]) -> Path:
    chosen = env.get("GPUTWIN_PYCACHE", "")
    if chosen and chosen.lower() not in OFF:
        return Path(chosen).expanduser()
    root = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(root) / "gputwin" / "pycache"


def ships_bytecode(package: str = "transformers", module: str = "modeling_utils") -> bool:
    """Whether one large module a trainer imports has its .pyc beside it (found without importing it)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return True  # nothing to compile: leave the environment alone
    if spec is None or not spec.origin:
        return True
    cached = Path(spec.origin).parent / "__pycache__" / f"{module}.{sys.implementation.cache_tag}.pyc"
    return cached.exists()


def child_env(env: Mapping[str, str], ships: Callable[[], bool] = ships_bytecode) -> dict[str, str]:
    """`env` for a child Python process, with a bytecode cache where env forbids writing beside the sources
    and the installed packages came without bytecode."""
    out = dict(env)
    if (not env.get("PYTHONDONTWRITEBYTECODE") or env.get("PYTHONPYCACHEPREFIX")
            or env.get("GPUTWIN_PYCACHE", "").lower() in OFF or ships()):
        return out
    folder = cache_folder(env)
    if not _private(folder):  # bytecode there is what the trainers run: nobody else may write it
        return out
    out.pop("PYTHONDONTWRITEBYTECODE")
    out["PYTHONPYCACHEPREFIX"] = str(folder)
    return out


def _private(folder: Path) -> bool:
    """The folder, made if need be, is this user's and only this user's (mode 700); one that is not, or cannot
    be made, is not used."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
    except OSError:
        return False
    return info.st_uid == os.getuid() and not info.st_mode & 0o077
