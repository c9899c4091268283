"""Watching an experiment folder: the one object the UI, headless mode, `gputwin status` and the report read through.

    ExperimentWatcher(exp, clock).poll() -> set of changed arm names; ``.state`` is the ExperimentState
    read_tail(path, lines)                 the last lines of a file that may be growing (stderr.log)

A log it has not read yet starts from the fold saved beside it (gputwin.reading.foldcache) when that still matches
the file, so attaching to a million-event run reads only the tail; after folding a long log from the top it
saves one itself. Beyond the event fold it knows what the log alone cannot say: a trainer that died without
a final event is "crashed" (pid file + create time, exit status, the tail of stderr.log: gputwin.reading.liveness),
and one that has not logged a step for max(60 s, 10 x its mean step time) is "stalled". The verdict is
recomputed (gputwin.reading.results) when a validation arrives or an arm's status changes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from . import foldcache
from ..core import lifecycle
from . import liveness
from ..core import state as st
from ..core.paths import ArmPaths, ExperimentPaths
from ..core.profiles import Experiment, differing_flat, flatten_dict
from .reference_file import load_reference
from .results import verdict_for_state
from .tailer import Tailer, fold_new

STDERR_TAIL_BYTES = 8192
STDERR_TAIL_LINES = 20
SAVE_FOLD_AFTER_BYTES = 8 << 20  # a reader that folded this much from the top saves the fold beside the log


def _with_profile(saved: st.ArmState, name: str, hparams: dict[str, Any]) -> st.ArmState:
    """A saved fold as the watcher's arm state: its name and profile, and the GPU index the profile
    names, which a ``started`` event takes from the profile when it gives one (see state._on_started)."""
    saved.name, saved.hparams = name, hparams
    physical = hparams.get("device")
    if saved.started_t is not None and isinstance(physical, int) and not isinstance(physical, bool):
        saved.gpu_index = physical
    return saved


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_tail(path: Path, lines: int = STDERR_TAIL_LINES, max_bytes: int = STDERR_TAIL_BYTES) -> list[str]:
    """The last `lines` lines of a text file that may be growing; [] when it is not there."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes and text:
        text = text[1:]  # the first line is probably cut
    return text[-lines:]


class ExperimentWatcher:
    """Keeps an ExperimentState in step with an experiment folder; call ``poll()`` as often as you like."""

    def __init__(self, exp: ExperimentPaths, clock: Callable[[], float] = time.time, *,
                 check_liveness: bool = True) -> None:
        self.paths = exp
        self.clock = clock
        self.check_liveness = check_liveness
        self.state = st.ExperimentState(name=exp.name, root=exp.root)
        self._arm_paths: dict[str, ArmPaths] = {}
        self._tailers: dict[str, Tailer] = {}
        self._experiment_mtime: int | None = None
        self._folder_mtime: int | None = None
        self._profile_mtimes: dict[str, int | None] = {}
        self._stderr_sizes: dict[str, int] = {}
        self._validation_counts: dict[str, tuple[int, str]] = {}

    # ------------------------------------------------------------ experiment and arms

    def _refresh_experiment(self) -> bool:
        """Re-read experiment.json when it changed; adds arms that appeared. True when anything changed."""
        mtime, folder_mtime = _mtime_ns(self.paths.experiment_json), _mtime_ns(self.paths.root)
        changed = False
        if mtime != self._experiment_mtime:
            self._experiment_mtime = mtime
            changed = True
            self.state.problems = []
            if mtime is not None:
                self._load_experiment()
        if folder_mtime is not None and (changed or folder_mtime != self._folder_mtime):
            # A new arm folder changes the experiment folder's mtime: only then look for arms.
            self._folder_mtime = folder_mtime
            for arm in self.paths.arms():
                if arm.name not in self._arm_paths:
                    self._add_arm(arm.name)
                    changed = True
        for name in list(self._arm_paths):
            changed |= self._refresh_profile(name)
        if changed:
            self.state.differing_keys = differing_flat([a.hparams for a in self.state.arms.values()])
        return changed

    def _load_experiment(self) -> None:
        path = self.paths.experiment_json
        try:
            data = _read_json(path)
            experiment = Experiment.from_dict(data)
        except (OSError, ValueError) as exc:
            self.state.problems.append(f"{path}: cannot be read ({exc}); showing the arm folders found")
            return
        except (KeyError, TypeError) as exc:
            # Written by a different gputwin version: keep what can be read.
            self.state.problems.append(f"{path}: unexpected layout ({exc!r}); showing the arm folders found")
            rules = data.get("rules") if isinstance(data, dict) else None
            if isinstance(rules, dict) and isinstance(rules.get("baseline"), str):
                self.state.baseline = rules["baseline"]
            for name in data.get("arm_names", []) if isinstance(data, dict) else []:
                if isinstance(name, str) and name not in self._arm_paths:
                    self._add_arm(name)
            return
        self.state.name = experiment.name
        self.state.rules = experiment.rules
        self.state.baseline = experiment.rules.baseline
        self.state.replicate_of = {a.name: a.replicate_of for a in experiment.arms if a.replicate_of}
        self.state.reference = None
        if experiment.reference is not None:  # validated before the arms started: there with experiment.json
            self.state.reference = load_reference(self.paths.root, experiment)
        for profile in experiment.arms:
            if profile.name not in self._arm_paths:
                self._add_arm(profile.name)
            arm = self.state.arms.get(profile.name)
            if arm is not None and not arm.hparams:
                arm.hparams = flatten_dict(profile.to_dict())

    def _add_arm(self, name: str) -> None:
        try:
            arm_paths = self.paths.arm(name)
        except ValueError as exc:
            self.state.problems.append(str(exc))
            return
        self._arm_paths[name] = arm_paths
        self._tailers[name] = Tailer(arm_paths.events)
        self.state.arms[name] = st.ArmState(name)

    def _refresh_profile(self, name: str) -> bool:
        """The arm's own profile.json (what its trainer reads) wins over the experiment file's copy."""
        path = self._arm_paths[name].profile_json
        mtime = _mtime_ns(path)
        if mtime == self._profile_mtimes.get(name):
            return False
        self._profile_mtimes[name] = mtime
        if mtime is None:
            return False
        try:
            profile = _read_json(path)
        except (OSError, ValueError) as exc:
            self.state.problems.append(f"{path}: cannot be read ({exc})")
            return False
        if isinstance(profile, dict):
            self.state.arms[name].hparams = flatten_dict(profile)
        return True

    # ------------------------------------------------------------ polling

    def poll(self) -> set[str]:
        """Read what is new; returns the names of arms whose state changed."""
        changed: set[str] = set()
        if self._refresh_experiment():
            changed.update(self.state.arms)
        now = self.clock()
        for name, arm_paths in self._arm_paths.items():
            if self._poll_arm(name, arm_paths, now):
                changed.add(name)
        if changed:
            self._refresh_verdict()
        return changed

    def _poll_arm(self, name: str, paths: ArmPaths, now: float) -> bool:
        arm = self.state.arms[name]
        # Liveness first: a trainer writes its final event before it exits, so reading the log
        # after seeing it gone cannot miss that event.
        gone = self.check_liveness and not arm.ended and self._trainer_gone(paths)
        tailer = self._tailers[name]
        changed = tailer.offset == 0 and self._start_from_saved_fold(name, paths, tailer)
        arm = self.state.arms[name]
        # Only a fold of the log alone is saved: nothing read from the top yet, nothing set by liveness.
        from_top = tailer.offset == 0 and arm.events_seen == 0 and arm.status == st.STARTING
        restarts, hparams = tailer.restarts, arm.hparams
        arm, folded = fold_new(tailer, arm, lambda: st.ArmState(name, hparams=hparams))
        changed |= folded
        if tailer.restarts != restarts:
            self.state.arms[name] = arm
            self._stderr_sizes.pop(name, None)
            from_top = True
        if from_top and tailer.offset >= SAVE_FOLD_AFTER_BYTES and (position := tailer.position) is not None:
            foldcache.save(paths.events, arm, position)  # an older gputwin's log attaches fast next time
        if gone and not arm.ended:
            self._mark_crashed(arm, paths, tailer)
            changed = True
        elif arm.status == st.TRAINING and lifecycle.stalled(arm, now):
            arm.status = st.STALLED
            changed = True
        if arm.ended:
            changed |= self._read_exit_info(name, arm, paths)
        return changed

    def _start_from_saved_fold(self, name: str, paths: ArmPaths, tailer: Tailer) -> bool:
        """A log not read yet starts from the fold saved beside it, when that still matches the file."""
        saved = foldcache.load(paths.events)
        if saved is None:
            return False
        tailer.start_at(saved.position)
        self.state.arms[name] = _with_profile(saved.state, name, self.state.arms[name].hparams)
        self._stderr_sizes.pop(name, None)
        return True

    def _trainer_gone(self, paths: ArmPaths) -> bool:
        """True only on evidence: an exit status was recorded, or the recorded process is not running."""
        if paths.exit.exists():
            return True
        recorded = liveness.read_pid(paths)
        return recorded is not None and not liveness.process_alive(*recorded)

    def _mark_crashed(self, arm: st.ArmState, paths: ArmPaths, tailer: Tailer) -> None:
        arm.status = st.CRASHED
        arm.exit_code = liveness.read_exit(paths)
        if tailer.partial:
            arm.add_bad_lines([(tailer.line_no + 1, "incomplete last line: the trainer died while writing it")])
        arm.failure = lifecycle.crash_failure(arm.name, arm.exit_code, paths.stderr, liveness.read_exit_cause(paths))

    def _read_exit_info(self, name: str, arm: st.ArmState, paths: ArmPaths) -> bool:
        """Exit status and stderr tail of an ended arm (the supervisor writes them just after the end)."""
        changed = False
        if arm.exit_code is None:
            code = liveness.read_exit(paths)
            if code is not None:
                arm.exit_code = code
                changed = True
        if arm.status == st.CRASHED:
            try:
                size = paths.stderr.stat().st_size
            except FileNotFoundError:
                size = -1
            if size != self._stderr_sizes.get(name):
                self._stderr_sizes[name] = size
                arm.stderr_tail = read_tail(paths.stderr)
                changed = True
        return changed

    # ------------------------------------------------------------ verdict

    def _refresh_verdict(self) -> None:
        # Recomputed when a validation arrives or an arm's status changes (an ended arm changes the
        # actions; all finished past the milestone turns the verdict into the final comparison).
        key = {n: (len(a.validations), a.status) for n, a in self.state.arms.items()}
        if key == self._validation_counts:
            return
        self._validation_counts = key
        if not self.state.arms or not all(n for n, _ in key.values()):
            self.state.verdict = None
            return
        self.state.verdict = verdict_for_state(self.state, now=self.clock())
