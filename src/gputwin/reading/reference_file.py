"""An experiment's reference validation on disk: where its result lives, the `gputwin validate` command that
makes it, and reading it back for the verdict.

    REFERENCE_DIR / RESULT_FILE                    <experiment>/_reference/validation.json
    inputs_for(experiment) -> ValidationInputs     what the reference is validated with (the baseline's sample)
    load_reference(exp_root, experiment)           the ReferenceResult the verdict compares with, or why not
    read_result(path)                              a result file's dict, or None

Running the validation (and its cache) is gputwin.control.reference_run's job; readers (the watcher, `gputwin check`)
only need this module.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.metrics import as_counts
from ..core.profiles import Experiment, Profile, ReferenceSpec
from ..core.reference import ReferenceResult

REFERENCE_DIR = "_reference"  # under the experiment folder; no arm can be called that (names start alnum)
RESULT_FILE = "validation.json"


@dataclass(frozen=True)
class ValidationInputs:
    """What `gputwin validate` is given: the reference, and the baseline arm's sample, decoder and device."""

    model: str
    base: str | None
    task: str | None
    test_data: str
    sample_size: int
    seed: int
    max_length: int
    decoder: str
    device: int | None  # GPU index; None = CPU

    def arguments(self, json_out: Path | str) -> list[str]:
        """The `gputwin validate` arguments (after the program name)."""
        args = ["validate", "--model", self.model, "--test-data", self.test_data,
                "--sample-size", str(self.sample_size), "--seed", str(self.seed),
                "--max-length", str(self.max_length), "--decoder", self.decoder,
                "--device", "cpu" if self.device is None else f"cuda:{self.device}", "--json", str(json_out)]
        if self.base:
            args += ["--base", self.base]
        if self.task:
            args += ["--task", self.task]
        return args

    def command(self, json_out: Path | str) -> str:
        """The same as a line to paste into a shell."""
        return shlex.join(["gputwin", *self.arguments(json_out)])


def inputs_for(experiment: Experiment) -> ValidationInputs:
    """The reference is validated exactly as the baseline arm is: same test file, sample, seed, max_length and
    decoder (the arms must agree on these anyway, or the verdict refuses to compare them)."""
    spec = experiment.reference
    if spec is None:
        raise ValueError(f"experiment {experiment.name} names no reference")
    baseline = _baseline(experiment)
    return ValidationInputs(model=spec.model, base=spec.base, task=spec.task, test_data=baseline.data.test,
                            sample_size=baseline.milestone.sample_size, seed=baseline.milestone.sample_seed,
                            max_length=baseline.train.max_length,
                            decoder="plain" if baseline.train.engine == "plain" else "fast", device=spec.device)


def _baseline(experiment: Experiment) -> Profile:
    for arm in experiment.arms:
        if arm.name == experiment.rules.baseline:
            return arm
    return experiment.arms[0]


def read_result(path: Path) -> dict[str, Any] | None:
    """A validation result with its per-sample rows, or None when missing or not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("per_sample"), list) else None


def load_reference(exp_root: Path, experiment: Experiment) -> ReferenceResult | None:
    """What the verdict compares with: the experiment's reference validation, or why it cannot be used."""
    spec: ReferenceSpec | None = experiment.reference
    if spec is None:
        return None
    path = exp_root / REFERENCE_DIR / RESULT_FILE
    if not path.is_file():
        return ReferenceResult(spec.name, None, path=str(path), model=spec.model,
                               problem=f"its validation file {path} is missing; make it with "
                                       f"`{inputs_for(experiment).command(path)}`")
    result = read_result(path)
    why = "no per_sample list" if result is None else _unusable_counts(result["per_sample"])
    if why:
        return ReferenceResult(spec.name, None, path=str(path), model=spec.model,
                               problem=f"its validation file {path} cannot be used ({why})")
    return ReferenceResult(spec.name, result, path=str(path), model=spec.model)


def _unusable_counts(rows: Any) -> str | None:
    try:
        counts = as_counts(rows)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return "no samples were scored" if len(counts) == 0 else None
