"""Fault injection for tests of the failure paths: GPUTWIN_INJECT_FAULT=KIND@STEP.

  nan@3       poison a trainable weight before step 3, so its loss is NaN (the real detection path runs)
  oom@3       raise torch.OutOfMemoryError at step 3 (what a CUDA OOM looks like to the loop)
  sigterm@3   send SIGTERM to this process right after step 3 (a stop at an exact step)
  hang@3      never start step 3: say so on stderr, then sleep until killed (a stalled arm; a kill mid-step)
  killsave@3  SIGKILL this process inside the checkpoint write of step 3: its weights are in the
              temporary folder, its manifest is not, nothing is renamed yet (a crash mid-checkpoint)
  fullsave@3  fail the checkpoint write of step 3 with ENOSPC at the same point (a full disk)
  fulllog@3   fail the write of step 3's event with ENOSPC (a full disk under the event log)

Unset, or anything else, injects nothing: the hook costs one comparison a step.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch

ENV_VAR = "GPUTWIN_INJECT_FAULT"
KINDS = ("nan", "oom", "sigterm", "hang", "killsave", "fullsave", "fulllog")
HANG_MESSAGE = "gputwin: injected hang before step"  # what hang@N prints, so a test knows it is hanging


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


def _disk_full(what: str, step: int) -> OSError:
    return OSError(errno.ENOSPC, f"No space left on device (injected by {ENV_VAR} at step {step})", what)


def before_step(fault: Fault | None, step: int, model: Any) -> None:
    """Called before update number `step` is computed."""
    if fault is None or fault.step != step:
        return
    if fault.kind == "nan":
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    elif fault.kind == "oom":
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {ENV_VAR} at step {step})")
    elif fault.kind == "hang":
        print(f"{HANG_MESSAGE} {step}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


def before_step_event(fault: Fault | None, step: int, log: str) -> None:
    """Called just before the event of update `step` is appended to the log at `log`."""
    if fault is not None and fault.kind == "fulllog" and fault.step == step:
        raise _disk_full(log, step)


def after_step(fault: Fault | None, step: int) -> None:
    """Called once update number `step` is done and reported."""
    if fault is not None and fault.kind == "sigterm" and fault.step == step:
        os.kill(os.getpid(), signal.SIGTERM)


def inside_checkpoint(fault: Fault | None, step: int, folder: str) -> None:
    """Called while the checkpoint of `step` is half written in its temporary `folder` (no manifest yet)."""
    if fault is None or fault.step != step:
        return
    if fault.kind == "killsave":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.kind == "fullsave":
        raise _disk_full(folder, step)
