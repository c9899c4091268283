"""Run a Triton kernel test's check on the CPU under Triton's interpreter (numpy): the kernels' maths without a GPU.

In a process of its own, since the interpreter must be on before Triton loads. Skips where Triton is not installed
(it comes with torch's CUDA builds) and on a GPU, where the kernels themselves are tested."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent


def run_interpreted(module: str, check: str, setup: str = "") -> None:
    """Call tests/<module>.py's check() under the interpreter, after `setup` (Python run first)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed here (it comes with torch's CUDA builds)")
    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernels themselves are tested (the GPU test)")
    code = (f"import sys; sys.path[:0] = {[str(TESTS), str(TESTS.parent / 'src')]!r}\n{setup}\n"
            f"import {module}; {module}.{check}(); print('checked')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0 and "checked" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
