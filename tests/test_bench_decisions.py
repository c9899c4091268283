"""bench/decisions.py at toy sizes on the CPU: the whole path (run to the end, follow the verdict) works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_decisions_smoke_runs_to_the_end_both_ways(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "decisions.py"), "smoke", "--work", str(tmp_path),
                           "--limit", "240"], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "decisions_smoke.json").read_text())
    assert set(result["all_finish"]) == {"demo-conservative", "demo-aggressive"}
    assert result["all_finish"]["demo-conservative"]["step"] == 2 * result["all_finish"]["demo-aggressive"]["step"]
    assert result["milestone_verdict"]["scenario"] in ("A", "B", "C")
    assert result["followed"]["kept_arm"] in result["all_finish"] and "best arm when every arm finishes" in done.stdout
    assert set(result["raw_rule_followed"]["arms"]) == set(result["all_finish"])
    assert result["milestone_scores"]["demo-conservative"]["cooled_f1"] is not None  # mid-schedule: probed
