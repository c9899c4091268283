"""Fixtures shared by the test files that start real trainers."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Iterator

import pytest

from gputwin.control import supervise

# No warm-start servers (gputwin.control.warmstart) outliving the tests; tests/test_warmstart.py turns them on.
os.environ["GPUTWIN_WARM"] = "off"
from gputwin.core.paths import ArmPaths


@pytest.fixture
def logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """GPUTWIN_LOGS in a temporary folder; every trainer of this test still alive at the end is killed."""
    root = tmp_path / "logs"
    monkeypatch.setenv("GPUTWIN_LOGS", str(root))
    yield root
    for pid_file in root.glob("*/*/pid"):
        recorded = supervise.read_pid(ArmPaths(pid_file.parent))
        if recorded and supervise.process_alive(*recorded):
            os.kill(recorded[0], signal.SIGKILL)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny model and its data (tests/tiny.py's World), built once per module; a module may define its own."""
    from tiny import World

    return World(tmp_path_factory.mktemp("world"))


@pytest.fixture
def no_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    """No fault injected through the environment (gputwin.train.faults), whatever the shell running the tests set."""
    from gputwin.train import faults

    monkeypatch.delenv(faults.ENV_VAR, raising=False)
