"""Typing `gputwin demo` or `gputwin run` again while the experiment trains attaches to it (and says so)
instead of starting a second copy; --new starts another beside it. Stand-in trainers (sleepers) keep the
arms alive; the commands run as a user types them."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest

from gputwin.faces import cli
from gputwin.control import launcher, rejoin
from gputwin.core.paths import ExperimentPaths
from gputwin.core.profiles import Experiment, load_any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny  # noqa: E402
from test_launcher import SLEEPER, end_arm, experiment, profile  # noqa: E402

GPUTWIN = str(Path(sys.executable).with_name("gputwin"))


def start_sleepers_as(experiment: Experiment, logs: Path) -> ExperimentPaths:
    return launcher.start_experiment(experiment, root=logs, commands={a.name: SLEEPER for a in experiment.arms})


def write_profiles(tmp_path: Path, lr: str = "5e-3", folder: str = "") -> list[str]:
    """Two CPU arm profiles as a user writes them. Their model folder is empty: a trainer started from them
    ends at once."""
    train, test = tiny.write_data(tmp_path / "data")
    (tmp_path / "model").mkdir(exist_ok=True)
    files = []
    for name in ("a", "b"):
        path = tmp_path / folder / f"{name}.toml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"""name = "{name}"
[model]
base = "{tmp_path / 'model'}"
task = "tag"
[train]
learning_rate = {lr if name == 'b' else '1e-3'}
threads = 1
[data]
train = "{train}"
test = "{test}"
[milestone]
step = 3
""")
        files.append(str(path))
    return files


PROGRESS = r"^\d\d:\d\d:\d\d  "  # a --headless progress line: the monitor's loop runs (Ctrl-C detaches from here on)


def read_until(stream: IO[str], pattern: str, limit_s: float = 60.0) -> str:
    """Lines of a child's output up to the first that matches the regular expression `pattern`."""
    seen = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
    raise AssertionError(f"{pattern!r} not printed; got:\n{''.join(seen)}")


def gputwin(*argv: str, logs: Path, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([GPUTWIN, *argv], env={**os.environ, "GPUTWIN_LOGS": str(logs)}, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def detach(child: subprocess.Popen[str]) -> tuple[int, str]:
    """Ctrl-C, as a user detaches from --headless; the rest of its output."""
    child.send_signal(signal.SIGINT)
    rest, _ = child.communicate(timeout=30)
    return child.returncode, rest


# ---------------------------------------------------------------- finding what runs


def test_the_newest_live_demo_is_found_and_others_are_named(tmp_path: Path, logs: Path) -> None:
    older = start_sleepers_as(experiment(tmp_path, "demo-20260105-093015"), logs)
    newer = start_sleepers_as(experiment(tmp_path, "demo-20260105-101500"), logs)
    start_sleepers_as(experiment(tmp_path, "demo-like-but-not-a-demo"), logs)
    found = rejoin.running_demo(logs)
    assert found is not None and found.exp.root == newer.root
    assert found.alive == ("a", "b") and found.others == (older.name,)
    note = found.note("`gputwin demo --new` starts another demo beside it.")
    assert note.startswith("Attached to demo-20260105-101500, which is already running (arms alive: a, b)")
    assert "gputwin demo --new" in note and "Also running: demo-20260105-093015." in note
    for arm in newer.arms():
        end_arm(arm)
    assert rejoin.running_demo(logs).exp.root == older.root  # an ended demo is not attached to
    for arm in older.arms():
        end_arm(arm)
    assert rejoin.running_demo(logs) is None
    assert rejoin.running_demo(tmp_path / "no-logs-yet") is None


def test_profiles_given_again_are_compared_with_what_runs(tmp_path: Path, logs: Path) -> None:
    running = start_sleepers_as(experiment(tmp_path), logs)
    assert rejoin.differences(experiment(tmp_path), running) == []
    moved = dataclasses.replace(experiment(tmp_path).arms[0], source="/elsewhere/a.toml")  # same settings
    assert rejoin.differences(Experiment("exp", (moved, profile("b", tmp_path)), experiment(tmp_path).rules),
                              running) == []
    faster = experiment(tmp_path, "exp", profile("a", tmp_path), profile("b", tmp_path, learning_rate=9e-3))
    assert rejoin.differences(faster, running) == ["b: train.learning_rate"]
    with pytest.raises(Exception, match="is running .* with other settings than the files given: b: train.learning_rate"):
        rejoin.attach_or_refuse(faster, rejoin.running_experiment(running))


def test_fresh_names_count_up_past_the_folders_there(tmp_path: Path) -> None:
    assert rejoin.fresh_name(tmp_path, "exp") == "exp"
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp-2").mkdir()
    assert rejoin.fresh_name(tmp_path, "exp") == "exp-3"


# ---------------------------------------------------------------- the commands


def test_demo_again_attaches_to_the_running_demo_and_says_so(tmp_path: Path, logs: Path) -> None:
    demo = launcher.demo_experiment(root=logs)
    demo = dataclasses.replace(demo, reference=None, arms=tuple(dataclasses.replace(a, data=dataclasses.replace(
        a.data, synth_if_missing=False)) for a in demo.arms))  # the sleepers need no data (nor a reference)
    running = start_sleepers_as(demo, logs)
    child = gputwin("demo", "--headless", logs=logs, cwd=tmp_path)
    out = read_until(child.stdout, PROGRESS)  # type: ignore[arg-type]
    assert f"Attached to {running.name}, which is already running (arms alive: demo-conservative, " \
           "demo-aggressive); nothing new was started." in out
    assert "`gputwin demo --new` starts another demo beside it." in out
    assert "Started" not in out
    code, rest = detach(child)
    assert code == 130 and "Detached. Training continues" in rest
    assert sorted(p.name for p in logs.iterdir() if p.name.startswith("demo-")) == [running.name]


def test_run_again_attaches_when_the_profiles_are_the_same_and_refuses_other_settings(
        tmp_path: Path, logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = write_profiles(tmp_path)
    running = start_sleepers_as(load_any(files, name="ab"), logs)
    child = gputwin("run", *files, "--name", "ab", "--headless", logs=logs, cwd=tmp_path)
    out = read_until(child.stdout, PROGRESS)  # type: ignore[arg-type]
    assert "Attached to ab, which is already running (arms alive: a, b); nothing new was started." in out
    assert f"`gputwin run {files[0]} {files[1]} --new` starts these profiles again beside it." in out
    assert detach(child)[0] == 130

    changed = write_profiles(tmp_path, lr="9e-3", folder="changed")
    assert cli.main(["run", *changed, "--name", "ab", "--headless"]) == 2
    err = capsys.readouterr().err
    assert "experiment ab is running (arms alive: a, b) with other settings than the files given: " \
           "b: train.learning_rate" in err
    assert "hint:" in err and "--new" in err and f"gputwin attach {running.name}" in err


def test_run_new_starts_the_profiles_again_under_a_fresh_name(tmp_path: Path, logs: Path) -> None:
    files = write_profiles(tmp_path)
    start_sleepers_as(load_any(files, name="ab"), logs)
    child = gputwin("run", *files, "--name", "ab", "--new", "--headless", logs=logs, cwd=tmp_path)
    out = read_until(child.stdout, PROGRESS)  # type: ignore[arg-type]
    assert "Started a on CPU" in out and "Started b on CPU" in out and str(logs / "ab-2" / "a") in out
    assert "Attached" not in out
    detach(child)
    assert (logs / "ab-2" / "experiment.json").is_file()
