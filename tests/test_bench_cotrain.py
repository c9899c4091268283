"""bench/cotrain.py at toy sizes on the CPU: every placement runs (two worker processes each for the
separate ones) and, without dropout, each co-trained arm's loss curve is its separate curve. No timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_cotrain_benchmark_runs_every_placement_and_the_curves_agree(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "cotrain.py"), "--smoke", "--dropout", "0",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "cotrain.json").read_text())
    results = {r["variant"]: r for r in record["results"]}
    assert set(results) == {"separate-fast", "separate-plain", "cotrained-fast", "cotrained-plain", "alone-fast",
                            "streams-fast"}
    assert set(results["alone-fast"]["arms"]) == {"conservative"}  # one arm with the device to itself
    assert all(r["tokens_per_s"] > 0 for r in results.values())
    for variant in ("separate-fast", "separate-plain", "cotrained-plain", "alone-fast", "streams-fast"):
        gaps = results[variant]["curve_gap_to_cotrained"]
        assert set(gaps) == ({"conservative"} if variant == "alone-fast" else {"conservative", "aggressive"})
        for gap in gaps.values():
            assert gap["steps"] == 8 and gap["max_rel_gap_raw"] < 1e-4, (variant, gap)
    assert "co-trained against separate processes" in done.stdout


@pytest.mark.slow
def test_the_operation_count_runs_and_the_multi_lora_layers_cost_fewer_operations_than_masked_ones(tmp_path: Path) -> None:
    """`bench/cotrain.py ops --smoke`: the three steps run and are counted; the co-trained step with the
    multi-LoRA layers dispatches fewer operations than with the masked ones, and more than one arm alone."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / "cotrain.py"), "ops", "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r["step"]: r["ops"] for r in json.loads((tmp_path / "cotrain-ops.json").read_text())["rows"]}
    alone, multi, masked = (rows[k] for k in ("one arm alone (fast engine)", "co-trained, multi-LoRA layers",
                                              "co-trained, masked layers"))
    assert alone < multi < masked
