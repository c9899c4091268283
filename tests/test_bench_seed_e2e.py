"""bench/seed_e2e.py at toy sizes on the CPU: the whole benchmark path (prepare, launch the seed experiment,
wait for the verdict, collect the figures) runs and reports both arms. Correctness only, no timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_seed_benchmark_runs_to_a_verdict_at_toy_sizes(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "seed_e2e.py"), "smoke", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "result-smoke.json").read_text())
    assert result["launch_to_verdict_seconds"] > 0 and result["arms_run"] == ["conservative", "aggressive"]
    for arm in result["arms"].values():
        assert arm["engine"] == "fast" and arm["validated_after_launch_s"] >= arm["milestone_after_launch_s"] > 0
        assert {"imports", "data", "model", "engine", "total"} <= set(arm["startup_seconds"])
    verdict = json.loads((tmp_path / "logs-smoke" / "pii-seed" / "verdict.json").read_text())
    assert verdict and "launch to verdict" in done.stdout
