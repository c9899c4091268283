"""bench/seed_e2e.py at toy sizes on the CPU: the whole benchmark path (prepare, launch the seed experiment,
wait for the verdict, collect the figures) runs and reports both arms. Correctness only, no timing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
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
        assert 0 < arm["predict_seconds"] <= arm["validation_seconds"]
        assert 0 < arm["decoded_tokens_per_row"] <= arm["decode_room_tokens"]
        phases = arm["validation_phases"]
        assert {"prompts_s", "merge_s", "setup_s", "prefill_s", "decode_s", "answers_s", "decoder_kept"} == set(phases)
        assert 0 < sum(v for k, v in phases.items() if k.endswith("_s")) <= arm["predict_seconds"] + 0.01
        assert phases["decoder_kept"] == 0 and arm["validation_batches"] == 1  # the milestone's: the process's first
        kinds = [e["kind"] for e in arm["timeline"]]
        assert kinds[0] == "started" and "milestone" in kinds and "validation" in kinds
        assert [e["t"] for e in arm["timeline"]] == sorted(e["t"] for e in arm["timeline"])
        assert arm["checkpoint_seconds"]["count"] == kinds.count("checkpoint") >= 1
        assert arm["checkpoint_seconds"]["total"] > 0 and arm["step_seconds_median"] > 0
        if arm["probe"] is not None:  # the fast engine's graphs meanwhile (none captured on a CPU)
            assert arm["probe"]["graphs"] == {"captures": 0, "capture_seconds": 0.0, "eager_steps": 0}
            # the probe's validation decodes with the milestone validation's decoder
            assert arm["probe"]["validation_phases"]["decoder_kept"] == 1
    verdict = json.loads((tmp_path / "logs-smoke" / "pii-seed" / "verdict.json").read_text())
    assert verdict and "launch to verdict" in done.stdout


@pytest.mark.slow
def test_the_seed_benchmark_with_a_warm_server_starts_both_trainers_as_its_forks(tmp_path: Path) -> None:
    cache = tempfile.mkdtemp(prefix="gw-")  # short: a socket's path holds 108 bytes
    env = dict(os.environ, XDG_CACHE_HOME=cache)
    try:
        done = subprocess.run([sys.executable, str(REPO / "bench" / "seed_e2e.py"), "smoke", "--warm", "--work",
                               str(tmp_path)], capture_output=True, text=True, timeout=400, env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        result = json.loads((tmp_path / "result-smoke-warm.json").read_text())
        assert result["warm"] and result["launch_to_verdict_seconds"] > 0
        assert [arm["startup_seconds"]["process"] for arm in result["arms"].values()] == ["warm fork"] * 2
    finally:
        for lock in Path(cache).glob("gputwin/warm/*.lock"):
            os.kill(int(lock.read_text()), signal.SIGTERM)
        shutil.rmtree(cache, ignore_errors=True)


@pytest.mark.slow
def test_a_seed_benchmark_cut_short_stops_its_detached_arms(tmp_path: Path) -> None:
    """SIGTERM (`timeout`) while the arms train: the bench stops them, or they would train on beside the next run."""
    bench = subprocess.Popen([sys.executable, str(REPO / "bench" / "seed_e2e.py"), "smoke", "--work", str(tmp_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    events = tmp_path / "logs-smoke" / "pii-seed" / "conservative" / "events.jsonl"
    try:
        deadline = time.time() + 300
        while not (events.exists() and '"kind":"step"' in events.read_text()) and time.time() < deadline:
            time.sleep(0.2)
        bench.send_signal(signal.SIGTERM)
        bench.send_signal(signal.SIGTERM)  # as `timeout` and a caller may both send one
        assert bench.wait(timeout=180) == 143
    finally:
        bench.kill()
    last = json.loads(events.read_text().splitlines()[-1])
    assert last["kind"] == "stopped" and last["by"] == "cli", last  # 32 steps planned: stopped, not finished
