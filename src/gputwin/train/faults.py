"""Fault injection for tests of the failure paths: GPUTWIN_INJECT_FAULT=KIND@STEP.

  nan@3      poison a trainable weight before step 3, so its loss is NaN (the real detection path runs)
  oom@3      raise torch.OutOfMemoryError at step 3 (what a CUDA OOM looks like to the loop)
  sigterm@3  send SIGTERM to this process right after step 3 (a stop at an exact step)

Unset, or anything else, injects nothing: the hook costs one comparison a step.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from dataclasses import dataclass
from typing import Any, Mapping

import torch

ENV_VAR = "GPUTWIN_INJECT_FAULT"
KINDS = ("nan", "oom", "sigterm")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int


def fault_from_env(env: Mapping[str, str] = os.environ) -> Fault | None:
    raw = env.get(ENV_VAR, "").strip()
    if not raw:
        return None
    match = re.fullmatch(r"([a-z]+)@(\d+)", raw)
    if not match or match.group(1) not in KINDS:
        print(f"gputwin: ignoring {ENV_VAR}={raw!r}: expected KIND@STEP with KIND one of {', '.join(KINDS)}",
              file=sys.stderr)
        return None
    return Fault(match.group(1), int(match.group(2)))


def before_step(fault: Fault | None, step: int, model: Any) -> None:
    """Called before update number `step` is computed."""
    if fault is None or fault.step != step:
        return
    if fault.kind == "nan":
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    elif fault.kind == "oom":
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {ENV_VAR} at step {step})")


def after_step(fault: Fault | None, step: int) -> None:
    """Called once update number `step` is done and reported."""
    if fault is not None and fault.kind == "sigterm" and fault.step == step:
        os.kill(os.getpid(), signal.SIGTERM)
