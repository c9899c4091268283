"""The import layering of gputwin (.importlinter, docs/architecture.md): faces on control on reading on the
pure core, the trainer side (torch) beside the faces, no cycles. A new import that points the wrong way, even
one inside a function, fails here with the chain of imports that breaks the rule."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_module_has_a_layer() -> None:
    config = (REPO / ".importlinter").read_text()
    package = REPO / "src" / "gputwin"
    modules = {f.stem for f in package.glob("*.py") if f.stem != "__init__"}
    modules |= {d.name for d in package.iterdir() if (d / "__init__.py").is_file()}
    unplaced = sorted(m for m in modules if f"gputwin.{m}\n" not in config and f"gputwin.{m} " not in config)
    assert not unplaced, f"modules without a place in .importlinter: {unplaced} (see docs/architecture.md)"


def test_imports_follow_the_layers() -> None:
    pytest.importorskip("importlinter")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    lint = Path(sys.executable).with_name("lint-imports")
    command = [str(lint)] if lint.is_file() else [sys.executable, "-m", "importlinter.cli"]
    done = subprocess.run([*command, "--no-cache"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
