"""A child process that must not outlive the process that started it (Linux's parent-death signal).

    die_with_parent(parent=None)    in the child: SIGKILL when the parent dies; with `parent` (its pid, read
                                    before the fork), exit at once when it has died already

Used by the ray backend's trainers (called before exec) and the trainer's start-up work done in a fork
(gputwin.train.forked). Elsewhere than Linux the child simply outlives its parent.
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        return
    if parent is not None and os.getppid() != parent:  # it died before the signal was asked for
        os._exit(1)
