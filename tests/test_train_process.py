"""`python -m gputwin.train ARM_DIR` as the launcher runs it: a process stopped by a signal or a control file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gputwin.control import requests as control
from gputwin.core import events
from gputwin.train import faults
from tiny import World, make_arm

pytestmark = pytest.mark.slow


def start(arm: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != faults.ENV_VAR}
    env.update(CUDA_VISIBLE_DEVICES="", GPUTWIN_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "gputwin.train", str(arm)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_step(arm: Path, proc: subprocess.Popen[str], step: int) -> None:
    """Block until the trainer has reported `step` (or has ended, which the caller's asserts then catch)."""
    while proc.poll() is None:
        got = [e for e in events.read_events(arm / "events.jsonl").events if e.kind == events.STEP]
        if got and got[-1]["step"] >= step:
            return
        time.sleep(0.05)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


@pytest.mark.parametrize("how", ["sigterm", "control"])
def test_a_running_trainer_stops_after_its_step_with_a_checkpoint(world: World, tmp_path: Path, how: str) -> None:
    arm = make_arm(tmp_path, world.profile("tag", epochs=100, checkpoint_every=1000))  # 600 steps: far from done
    proc = start(arm)
    wait_for_step(arm, proc, 2)
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        control.write_request(arm / "control", control.STOP, by="cli")
    code, err = finish(proc)
    assert code == 0, err
    evs = events.read_events(arm / "events.jsonl").events
    stopped = evs[-1]
    assert stopped.kind == events.STOPPED, err
    assert stopped["by"] == ("signal" if how == "sigterm" else "cli")
    assert stopped["reason"] == ("SIGTERM" if how == "sigterm" else "requested")
    last_step = [e for e in evs if e.kind == events.STEP][-1]["step"]
    assert 2 <= stopped["step"] == last_step < 600
    assert Path(stopped["checkpoint"]).name == f"step-{last_step:06d}"
    assert (Path(stopped["checkpoint"]) / "checkpoint.json").is_file()


def test_an_unreadable_profile_fails_as_a_user_error(world: World, tmp_path: Path) -> None:
    arm = make_arm(tmp_path, world.profile("tag"))
    (arm / "profile.json").write_text('{"name": "arm"}')  # readable JSON, not a profile
    code, err = finish(start(arm))
    assert code == 2 and "profile.json" in err and "Traceback" not in err
    failed = events.read_events(arm / "events.jsonl").events[-1]
    assert failed.kind == events.FAILED and "profile.json" in failed["message"] and failed["hint"]


def test_an_internal_error_is_reported_then_raised_with_its_traceback(world: World, tmp_path: Path) -> None:
    profile = world.profile("tag")
    broken = profile.to_dict()
    broken["train"]["batch_size"] = 0  # profile.json is trusted input: nothing re-checks it
    arm = make_arm(tmp_path, type(profile).from_dict(broken))
    code, err = finish(start(arm))
    assert code == 1 and "Traceback" in err and "ZeroDivisionError" in err
    failed = events.read_events(arm / "events.jsonl").events[-1]
    assert failed.kind == events.FAILED and failed["error"] == "ZeroDivisionError" and "traceback" in failed["hint"]


def test_the_process_start_it_reports_imports_from_lies_between_spawn_and_exit() -> None:
    """`imports` in the started event is the process's age when the trainer's code begins: the start that age
    implies must fall inside the window the parent saw (psutil's create_time alone is up to 1 s early)."""
    code = "import time; from gputwin.train.__main__ import process_age; print(repr(time.time() - process_age()))"
    before = time.time()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    after = time.time()
    assert done.returncode == 0, done.stderr[-2000:]
    began = float(done.stdout.strip().splitlines()[-1])
    assert before - 0.02 <= began <= after  # 0.02: the start is known to a clock tick (10 ms)


def test_a_trainer_with_gputwin_cprofile_writes_its_profile_and_runs_at_a_short_gil_interval(
        world: World, tmp_path: Path) -> None:
    """GPUTWIN_CPROFILE=FOLDER: the trainer's Python profile lands there, also when it fails; and the trainer lets a
    thread waiting for the GIL have it within SWITCH_INTERVAL_S instead of Python's 5 ms."""
    import pstats

    from gputwin.train import __main__ as entry

    arm = make_arm(tmp_path, world.profile("tag"))
    (arm / "profile.json").write_text('{"name": "arm"}')  # fails fast, as a user error
    folder = tmp_path / "prof"
    code = ("import sys, os; from gputwin.train.__main__ import main; code = main(sys.argv[1:]); "
            "print(sys.getswitchinterval()); sys.exit(code)")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", GPUTWIN_CPROFILE=str(folder))
    done = subprocess.run([sys.executable, "-c", code, str(arm)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) == pytest.approx(entry.SWITCH_INTERVAL_S)
    (profile,) = folder.glob("trainer-*.prof")
    functions = {name for _, _, name in pstats.Stats(str(profile)).stats}  # type: ignore[attr-defined]
    assert "train" in functions and "read_profile" in functions
