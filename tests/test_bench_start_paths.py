"""bench/model_load.py and bench/trainer_start.py at toy sizes on the CPU: every path runs and writes its result
file (the data tokenised on a thread and in a fork beside the load; two codes started in turn). Correctness of the
benchmarks' paths only, no timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import World

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("world"), train=24, test=8)


def bench(script: str, *args: str) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_the_model_load_bench_loads_beside_the_data_on_a_thread_and_in_a_fork(world: World, tmp_path: Path) -> None:
    bench("model_load.py", "--model", str(world.qwen), "--device", "cpu", "--rounds", "1", "--data", str(world.train),
          "--tokenizer", str(world.qwen), "--switch-intervals", "0.005,0.0005", "--tag", "smoke",
          "--results", str(tmp_path))
    result = json.loads((tmp_path / "model_load_smoke.json").read_text())
    rows = [(r["variant"], r["switch_interval_s"], r["data_in"]) for r in result["variants"]]
    assert sorted(rows) == sorted((v, s, d) for v in ("gputwin", "device_map") for s in (0.005, 0.0005)
                                  for d in ("thread", "process"))
    for row in result["variants"]:
        assert row["same_as_gputwin"] is True and row["errors"] == []
        assert len(row["load_s"]) == len(row["data_s"]) == 1


def test_the_trainer_start_bench_starts_each_code_in_turn(world: World, tmp_path: Path) -> None:
    bench("trainer_start.py", "--model", str(world.qwen), "--train", str(world.train), "--test", str(world.test),
          "--src", f"again={REPO / 'src'}", "--rounds", "1", "--tag", "smoke", "--results", str(tmp_path))
    result = json.loads((tmp_path / "trainer_start_smoke.json").read_text())
    assert set(result["runs"]) == {"new", "again"}
    for runs in result["runs"].values():
        assert len(runs) == 1 and runs[0]["data_cache"] == "written"  # the cache emptied before each start
        assert runs[0]["started_s"] >= runs[0]["total"] > 0
    assert set(result["medians"]["new"]) >= {"started_s", "model", "data", "total"}
