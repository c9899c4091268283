"""bench/cotrain_quality.py at toy sizes on the CPU: the seed's arms and a replicate of each run to their
milestones apart and then co-trained in one process, and each arm's figures match across the two runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_cotrained_arms_reach_the_separate_milestones_and_curves(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "cotrain_quality.py"), "smoke", "--work",
                           str(tmp_path), "--replicates", "1", "--limit", "240"],
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "cotrain_quality_smoke.json").read_text())
    names = {"conservative", "conservative-seed43", "aggressive", "aggressive-seed43"}
    apart, together = result["runs"]["off"]["arms"], result["runs"]["on"]["arms"]
    assert set(apart) == set(together) == names
    assert all(a["shares_process_with"] == [] for a in apart.values())
    assert all(set(a["shares_process_with"]) == names - {n} for n, a in together.items())
    for row in result["comparison"]["rows"]:  # fp32 on the CPU, no dropout noise across placements
        assert row["steps_compared"] == 8 and row["max_rel_gap_ema"] < 1e-5, row
        assert row["separate_f1"] is not None and row["cotrained_f1"] is not None
    assert set(result["comparison"]["arms"]) == {"conservative", "aggressive"}
    assert all(a["seeds"] == 2 for a in result["comparison"]["arms"].values())
    assert "run-to-run noise" in done.stdout
