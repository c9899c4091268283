"""Where things live on disk. One experiment is one folder; one arm is one sub-folder.

logs/.cache/tokenized/     tokenised training data, shared by every experiment (gputwin.train.tokcache)
logs/<experiment>/
    experiment.json        resolved experiment (arms, rules) written by `gputwin run`
    run.lock               held while a launcher is starting arms
    comparison.md, verdict.json
    comparison-loss.svg, comparison-scores.svg   the figures comparison.md links (gputwin.faces.figures)
    actions.jsonl          verdict actions taken (by a key, a CLI command or automatically)
    <arm>/
        profile.toml       the user's profile as given (snapshot)
        profile.json       the resolved profile the trainer reads
        events.jsonl       the event log (docs/events.md)
        stdout.log, stderr.log
        pid                "<pid> <start time>" of the trainer process
        supervisor         pid of the supervisor that waits for the trainer (supervise.py)
        supervise.lock     held while the arm's trainer is being started or restarted
        exit               exit status written by the supervisor when the trainer ends
        control/           requests to the trainer (atomic files, see control.py)
        checkpoints/step-000200/ ...
        validation/step-000200.json
        validation/step-000200-cooled.json   the cooldown probe's validation, when one ran
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_HINT = "use letters, digits, '.', '_' or '-' (at most 64, starting with a letter or digit)"


def valid_name(name: str) -> bool:
    """Arm and experiment names become folder names: no path tricks allowed."""
    return bool(NAME_RE.match(name)) and name not in {".", ".."}


def logs_root() -> Path:
    """GPUTWIN_LOGS overrides the default ./logs (tests point it at a temporary folder)."""
    return Path(os.environ.get("GPUTWIN_LOGS", "logs")).resolve()


def make_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def read_own_file(path: Path, max_bytes: int | None = None) -> bytes | None:
    """A cache file's bytes when it is a regular file (no symlink) of this user that nobody else may write,
    and not over max_bytes; else None (a cache never trusts a file someone else could have put there)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if (not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022
                or (max_bytes is not None and info.st_size > max_bytes)):
            return None
        return fh.read()


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` so that readers polling it see the old content or the new, never half: a unique
    temporary file beside it (mode 0600) renamed over it, so two processes writing at once leave one whole file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@dataclass(frozen=True)
class ArmPaths:
    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def profile_toml(self) -> Path:
        return self.root / "profile.toml"

    @property
    def profile_json(self) -> Path:
        return self.root / "profile.json"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def stdout(self) -> Path:
        return self.root / "stdout.log"

    @property
    def stderr(self) -> Path:
        return self.root / "stderr.log"

    @property
    def pid(self) -> Path:
        return self.root / "pid"

    @property
    def exit(self) -> Path:
        return self.root / "exit"

    @property
    def control(self) -> Path:
        return self.root / "control"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def validation(self) -> Path:
        return self.root / "validation"

    def validation_file(self, step: int) -> Path:
        return self.validation / f"step-{step:06d}.json"

    def probe_file(self, step: int) -> Path:
        """The cooldown probe's validation: the arm at `step`, cooled down (see gputwin.train.probe)."""
        return self.validation / f"step-{step:06d}-cooled.json"


@dataclass(frozen=True)
class ExperimentPaths:
    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def experiment_json(self) -> Path:
        return self.root / "experiment.json"

    @property
    def lock(self) -> Path:
        return self.root / "run.lock"

    @property
    def comparison(self) -> Path:
        return self.root / "comparison.md"

    @property
    def verdict(self) -> Path:
        return self.root / "verdict.json"

    def arm(self, name: str) -> ArmPaths:
        if not valid_name(name):
            raise ValueError(f"invalid arm name {name!r}: {NAME_HINT}")
        return ArmPaths(self.root / name)

    def arms(self) -> list[ArmPaths]:
        """Arm folders in a stable order (the experiment file's order when known)."""
        import json

        try:
            names = json.loads(self.experiment_json.read_text())["arm_names"]
            return [self.arm(n) for n in names if (self.root / n).is_dir()]
        except (OSError, ValueError, KeyError, TypeError):
            return sorted(
                (ArmPaths(p) for p in self.root.iterdir() if p.is_dir() and (p / "profile.json").exists()),
                key=lambda a: a.name,
            )


def experiment(name: str, root: Path | None = None) -> ExperimentPaths:
    if not valid_name(name):
        raise ValueError(f"invalid experiment name {name!r}: {NAME_HINT}")
    return ExperimentPaths((root or logs_root()) / name)


def latest_experiment(root: Path | None = None) -> ExperimentPaths | None:
    """The experiment whose files changed last: what `gputwin` with no arguments attaches to."""
    root = root or logs_root()
    if not root.is_dir():
        return None
    candidates = [p for p in root.iterdir() if (p / "experiment.json").exists()]
    if not candidates:
        return None

    def last_change(p: Path) -> float:
        times = [p.stat().st_mtime]
        for arm in p.iterdir():
            events = arm / "events.jsonl"
            if events.exists():
                times.append(events.stat().st_mtime)
        return max(times)

    return ExperimentPaths(max(candidates, key=last_change))


def resolve_experiment(name: str | None, root: Path | None = None) -> ExperimentPaths:
    """The named experiment, or the most recent one; UserError naming what exists otherwise."""
    root = root or logs_root()
    if name is None:
        latest = latest_experiment(root)
        if latest is None:
            raise UserError(f"no experiment found under {root}",
                            "start one with `gputwin demo` or `gputwin run profiles/seed.toml` "
                            "(GPUTWIN_LOGS names another logs folder)")
        return latest
    candidate = Path(name)
    if (candidate / "experiment.json").is_file():  # a folder path works too
        return ExperimentPaths(candidate.resolve())
    if candidate.is_dir() and not valid_name(name):
        raise UserError(f"{candidate}: not an experiment folder (it holds no experiment.json)",
                        f"name an experiment under {root}, or a folder that `gputwin run` made")
    try:
        exp = experiment(name, root)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not exp.experiment_json.is_file():
        known = sorted(p.name for p in root.iterdir() if (p / "experiment.json").is_file()) if root.is_dir() else []
        raise UserError(f"no experiment {name!r} under {root}",
                        f"experiments there: {', '.join(known)}" if known else "start one with `gputwin run` or `gputwin demo`")
    return exp
