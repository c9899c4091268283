"""bench/startup.py at toy sizes on the CPU: the launcher probe, a cold and a warm launch of one arm to its
first step, the trainer's imports one by one, the tables and the result file. Correctness of the benchmark's
path only, no timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_startup_benchmark_times_a_cold_and_a_warm_launch_at_toy_sizes(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "startup.py"), "smoke", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "startup_smoke.json").read_text())
    launcher = result["launcher"]
    assert launcher["heavy_imports"] == [] and len(launcher["runs_s"]) == 3 and launcher["median_s"] > 0
    assert [(r["launch"], r["data_cache"]) for r in result["launches"]] == [
        ("cold", "written"), ("warm", "hit"), ("first (server starts)", "hit"), ("hot", "hit"), ("after check", "hit")]
    # warm starts on: the first launch starts as fresh Pythons, the hot one as the warm server's forks, and so does
    # the first launch after a `gputwin check`
    assert [r["startup_seconds"]["process"] for r in result["launches"]] == ["fresh"] * 3 + ["warm fork"] * 2
    checked = result["launches"][-1]
    assert 0 < checked["check_s"] <= checked["server_ready_s"]
    for launch in result["launches"]:
        assert launch["device"] == "cpu" and launch["samples"] == 64
        assert 0 < launch["started_line_s"] and 0 < launch["started_s"] < launch["first_step_s"]
        assert {"imports", "transformers", "tokenizer", "data", "data_wait", "model", "lora", "engine", "total"} \
            <= set(launch["startup_seconds"])
    # the warm launch has the tokenizer's ids with its cached data: its tokenizer loads once training runs
    assert [r["startup_seconds"]["tokenizer_load"] for r in result["launches"]] == ["startup"] + ["deferred"] * 4
    imports = result["imports"]
    for order in ("trainer_order", "parts_first"):
        seconds = imports[order]["seconds"]
        assert seconds["torch"] > 0 and seconds["modeling_utils"] is not None and imports[order]["total"] > 0
    assert "torch._dynamo" in imports["parts_first"]["seconds"] and imports["self_by_package"]["torch"] > 0
    code = imports["bytecode"]  # at toy size: the launcher's modules, compiled from source and from the cache
    assert code["as_installed"] > 0 and code["from_source"] > 0 and code["gputwin_cache"] > 0
    assert isinstance(code["ships_bytecode"], bool) and "gputwin's bytecode cache" in done.stdout
    assert "the trainer's imports" in done.stdout
    assert "launcher to the spawn of its arms" in done.stdout and "warm 0" in done.stdout
    assert not list((tmp_path / "logs").glob("probe-*"))  # the probe's experiments are cleared away
