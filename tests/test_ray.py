"""Arms on a Ray cluster (docs/cluster.md): a real local cluster on CPU, started here and torn down here.

The cluster is a head that schedules nothing (0 CPUs) and one worker node with 2 CPUs, so two 1-CPU arms
run side by side and a third waits in the queue; a second worker joins for the node-loss case. Every
node is a set of processes on this machine, but the arms do not know it: their files travel through the
actors, as they would between machines. The file logic of the node side is tested without Ray at the top.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import pytest

from gputwin.faces import cli, status
from gputwin.control import launcher, ray_backend, ray_node
from gputwin.reading import liveness
from gputwin.core import events as ev
from gputwin.core import state as st
from gputwin.core.errors import UserError
from gputwin.core.paths import ArmPaths, ExperimentPaths
from gputwin.core.profiles import Experiment, Placement, Profile, ProfileError, Rules, load_experiment
from gputwin.train import faults
from gputwin.reading.watcher import ExperimentWatcher
from tiny import make_samples, profile_for, tiny_bert, write_data

# ---------------------------------------------------------------- without a cluster


def test_the_node_side_hands_out_appended_bytes_and_new_files_only(tmp_path: Path) -> None:
    root = tmp_path / "work"
    ray_node.write_files(root, {"a/validation/step-000006.json": b"{}", "a/events.jsonl": b'{"x":1}\n'})
    arm = root / "a"
    (arm / "validation" / ".step-000009.json.tmp").write_bytes(b"half")  # being written: not yet
    stamps = ray_node.changed_files(arm, {})
    assert list(stamps) == ["validation/step-000006.json"]
    assert ray_node.changed_files(arm, {k: v for k, v in stamps.items()}) == {}
    assert ray_node.read_from(arm / "events.jsonl", 3, 100) == b'":1}\n'
    assert ray_node.read_from(arm / "missing.log", 0, 100) == b""
    for bad in ("../x", "/etc/passwd", "a/../../x", ".hidden", ""):
        with pytest.raises(ValueError):
            ray_node.safe_relative(bad)


def test_the_node_side_runs_the_trainer_command_and_relocates_the_profile(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ray_node.WORK_ENV, str(tmp_path / "node"))
    profile = {"name": "a", "data": {"train": "/elsewhere/train.jsonl", "test": "/elsewhere/test.jsonl"},
               "train": {"output_dir": "/elsewhere/out"}}
    script = "import sys; print('trained'); open('events.jsonl', 'a').write('{}\\n'); sys.exit(0)"
    runner = ray_node.ArmRunner("exp-1", "a", None, {"a/profile.json": json.dumps(profile).encode(),
                                                     "a/inputs/train.jsonl": b"t\n", "a/control/1-stop.json": b"{}"},
                                {"data.train": "inputs/train.jsonl", "train.output_dir": None}, {},
                                [sys.executable, "-c", script])
    assert runner.proc is not None and runner.proc.wait(30) == 0
    arm = tmp_path / "node" / "exp-1" / "a"
    moved = json.loads((arm / "profile.json").read_text())
    assert moved["data"]["train"] == str(arm / "inputs" / "train.jsonl") and moved["train"]["output_dir"] is None
    pulled = runner.pull({}, {})
    assert pulled["exit"] == 0 and pulled["logs"]["stdout.log"] == b"trained\n"
    assert pulled["logs"]["events.jsonl"] == b"{}\n" and pulled["control"] == ["1-stop.json"]


def test_placement_is_parsed_with_its_file_and_key(tmp_path: Path) -> None:
    profiles = Path(__file__).resolve().parents[1] / "profiles"
    arms = [str(profiles / "demo-conservative.toml"), str(profiles / "demo-aggressive.toml")]

    def experiment_with(extra: str) -> Experiment:
        path = tmp_path / "exp.toml"
        path.write_text(f"name = \"exp\"\narms = {json.dumps(arms)}\n\n{extra}")
        return load_experiment(path, check_files=False)

    assert experiment_with("").placement == Placement()
    placed = experiment_with('[placement]\nbackend = "ray"\naddress = "10.0.0.5:6379"\nshared_path = "/mnt/g"\n')
    assert placed.placement == Placement("ray", "10.0.0.5:6379", "/mnt/g")
    assert Experiment.from_dict(json.loads(json.dumps(placed.to_dict()))).placement == placed.placement
    for extra, key, words in (('[placement]\nbackend = "slurm"\n', "placement.backend", "expected one of local, ray"),
                              ('[placement]\nbackend = "ray"\n', "placement.address", "is required"),
                              ('[placement]\nbackend = "ray"\naddress = "h:1"\nshared_path = "rel"\n',
                               "placement.shared_path", "absolute path"),
                              ('[placement]\nadress = "h:1"\n', "placement.adress", "known keys: address, backend, cotrain, shared_path")):
        with pytest.raises(ProfileError) as caught:
            experiment_with(extra)
        assert key in str(caught.value) and words in str(caught.value), str(caught.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_ray_or_no_cluster_is_refused_before_anything_is_written(logs: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    train, test = write_data(tmp_path / "data")
    arms = tuple(profile_for(tmp_path / "no-model", train, test, task="tag", name=n, milestone_step=6) for n in "ab")
    experiment = Experiment("offline", arms, Rules(baseline="a"),
                            placement=Placement("ray", f"127.0.0.1:{_closed_port()}"))
    with pytest.raises(UserError) as caught:
        launcher.start_experiment(experiment, root=logs)
    assert "cannot be reached" in caught.value.message and "ray start --head" in caught.value.hint
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(UserError) as caught:
        launcher.start_experiment(experiment, root=logs)
    assert "pip install 'gputwin[ray]'" in caught.value.hint
    assert not (logs / "offline").exists()
    assert cli.main(["run", "--ray", "", str(Path(__file__).resolve().parents[1] / "profiles" / "demo.toml")]) == 2


# ---------------------------------------------------------------- a real local cluster

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                    reason="the ray extra is not installed (pip install gputwin[ray])")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A head (no CPUs: it only schedules) and a worker node with 2 CPUs, for the whole module.

    The nodes' processes inherit this environment: where the node side keeps its work folders, and the
    gputwin being tested on the path of their Python."""
    from ray.cluster_utils import Cluster

    folder = tmp_path_factory.mktemp("cluster")
    saved = {k: os.environ.get(k) for k in (ray_node.WORK_ENV, "PYTHONPATH", "RAY_USAGE_STATS_ENABLED")}
    os.environ[ray_node.WORK_ENV] = str(folder / "node-work")
    src = str(Path(ray_node.__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (src, saved["PYTHONPATH"]) if p)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    made = Cluster(initialize_head=True, connect=False,
                   head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        worker = made.add_node(num_cpus=2)
        made.wait_for_nodes()
        yield SimpleNamespace(cluster=made, address=made.address, worker=worker, work=folder / "node-work",
                              folder=folder)
    finally:
        made.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("model")
    train, test = write_data(folder / "data")
    return SimpleNamespace(train=train, test=test, bert=tiny_bert(folder / "bert", make_samples(24)))


@pytest.fixture(autouse=True)
def no_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(faults.ENV_VAR, raising=False)


def arm_profile(model: SimpleNamespace, name: str) -> Profile:
    """6 steps (24 samples, batch 4), a checkpoint every 3, validated at step 6 (the end)."""
    return profile_for(model.bert, model.train, model.test, task="tag", name=name, milestone_step=6)


def on_cluster(name: str, profiles: list[Profile], address: str, shared: Path | None = None) -> Experiment:
    return Experiment(name, tuple(profiles), Rules(baseline=profiles[0].name),
                      placement=Placement("ray", address, None if shared is None else str(shared)))


def wait_for(predicate: Callable[[], bool], what: str, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


def kinds(arm: ArmPaths) -> list[str]:
    return [e.kind for e in ev.read_events(arm.events).events]


def events_of(arm: ArmPaths, kind: str) -> list[ev.Event]:
    return [e for e in ev.read_events(arm.events).events if e.kind == kind]


def ended(arm: ArmPaths) -> bool:
    return liveness.read_exit(arm) is not None


@needs_ray
@pytest.mark.slow
def test_three_cpu_arms_on_two_cpus_queue_run_and_reach_the_verdict(
        cluster: SimpleNamespace, model: SimpleNamespace, logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    said: list[str] = []
    profiles = [arm_profile(model, n) for n in ("a", "b", "c")]
    exp = launcher.start_experiment(on_cluster("trio", profiles, cluster.address), root=logs, say=said.append)
    assert any("Ray cluster at" in s and "2 CPUs" in s for s in said), said
    arms = [exp.arm(n) for n in ("a", "b", "c")]
    wait_for(lambda: all(ended(a) for a in arms), "every arm to end", 150)
    for arm in arms:
        assert liveness.read_exit(arm) == 0, arm.stderr.read_text()[-2000:]
        assert kinds(arm)[-1] == ev.FINISHED and ev.PLACED in kinds(arm)
        assert arm.validation_file(6).is_file()  # the milestone's result came back ...
        assert (arm.root / "adapters").is_dir() and any((arm.root / "adapters").rglob("adapter_config.json"))
        assert not arm.checkpoints.exists()  # ... the checkpoints stayed on the node
        assert not list(arm.control.glob("*.json")) if arm.control.exists() else True
    # Two CPUs for three arms: the one placed last waited for another to finish, first in line at the end.
    last = max(arms, key=lambda a: events_of(a, ev.PLACED)[0].t)
    queued = events_of(last, ev.QUEUED)
    assert queued and queued[-1]["place"] == 1 and queued[-1]["of"] == 1 and queued[0]["asks"]["num_cpus"] == 1
    assert events_of(last, ev.PLACED)[0].t > min(events_of(a, ev.FINISHED)[0].t for a in arms if a is not last)
    watcher = ExperimentWatcher(exp)
    watcher.poll()
    state = watcher.state
    assert all(a.status == st.FINISHED and a.node for a in state.arms.values())
    assert state.verdict is not None and set(state.verdict.metrics) == {"a", "b", "c"} and state.verdict.headline
    # Scored on the node's copy of the test file, but on the same file as far as the verdict can tell.
    assert state.verdict.scenario != "mismatch" and not any("different test files" in r for r in state.verdict.reasons)
    assert json.loads(arms[0].validation_file(6).read_text())["test_data"] == str(model.test)
    assert cli.main(["status", "trio"]) == 0
    out = capsys.readouterr().out
    assert "FINISHED" in out and "on node" in out
    assert cli.main(["report", "trio"]) == 0 and (exp.root / "verdict.json").is_file()

    # The fold of the queued arm while it waited, as the screen showed it.
    arm_state = st.fold("c", ev.read_events(last.events).events[:len(queued)])
    assert arm_state.status == st.QUEUED and arm_state.queue_place == 1


def worker_pid(arm: ArmPaths) -> int:
    return int(ray_backend.read_spec(arm)["node"]["worker_pid"])


@needs_ray
@pytest.mark.slow
def test_a_killed_worker_marks_the_arm_crashed_with_the_cause_and_resume_continues_on_its_node(
        cluster: SimpleNamespace, model: SimpleNamespace, logs: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(faults.ENV_VAR, "hang@5")  # travels to the node: steps 1-4 (a checkpoint at 3), then hangs
    exp = launcher.start_experiment(on_cluster("killed", [arm_profile(model, "a")], cluster.address), root=logs)
    arm = exp.arm("a")
    wait_for(lambda: arm.stderr.exists() and faults.HANG_MESSAGE in arm.stderr.read_text(), "the hang at step 5")
    before = [e["step"] for e in events_of(arm, ev.STEP)]
    assert before == [1, 2, 3, 4]

    os.kill(worker_pid(arm), signal.SIGKILL)  # the Ray worker process that holds the arm's actor
    wait_for(lambda: ended(arm), "the mirror to record the lost worker")
    watcher = ExperimentWatcher(exp)
    watcher.poll()
    a = watcher.state.arms["a"]
    assert a.status == st.CRASHED and a.failure is not None
    assert "the Ray worker process running it on" in a.failure.message and "died" in a.failure.message
    assert cli.main(["status", "killed"]) == status.EXIT_ARM_CRASHED
    assert "Ray worker process" in capsys.readouterr().out

    monkeypatch.delenv(faults.ENV_VAR)
    assert cli.main(["resume", "a", "-x", "killed"]) == 0
    assert "Resumed a (it was crashed)" in capsys.readouterr().out
    wait_for(lambda: ended(arm), "the resumed arm to end")
    assert liveness.read_exit(arm) == 0, arm.stderr.read_text()[-3000:]
    resumed = events_of(arm, ev.RESUMED)
    assert resumed and resumed[-1]["step"] == 3  # from the checkpoint of step 3, kept on the node
    assert [e["step"] for e in events_of(arm, ev.STEP)] == [1, 2, 3, 4, 4, 5, 6]
    placed = events_of(arm, ev.PLACED)
    assert len(placed) == 2 and placed[0]["node_id"] == placed[1]["node_id"]
    watcher.poll()
    assert watcher.state.arms["a"].status == st.FINISHED


@needs_ray
@pytest.mark.slow
def test_a_lost_node_with_a_shared_path_resumes_on_another_node_and_a_second_mirror_takes_over(
        cluster: SimpleNamespace, model: SimpleNamespace, logs: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    second = cluster.cluster.add_node(num_cpus=1)
    cluster.cluster.wait_for_nodes()
    monkeypatch.setenv(faults.ENV_VAR, "hang@5")
    experiment = on_cluster("lost", [arm_profile(model, "a")], cluster.address, cluster.folder / "shared")
    exp = launcher.start_experiment(experiment, root=logs)
    arm = exp.arm("a")
    wait_for(lambda: arm.stderr.exists() and faults.HANG_MESSAGE in arm.stderr.read_text(), "the hang at step 5")

    # The mirror dies (as a launcher or a UI might): the arm goes on; resume puts a new mirror on it.
    mirror = liveness.read_pid(arm)
    assert mirror is not None
    os.kill(mirror[0], signal.SIGKILL)
    wait_for(lambda: not liveness.process_alive(*mirror), "the mirror to be gone")
    assert cli.main(["resume", "a", "-x", "lost"]) == 0
    capsys.readouterr()
    wait_for(lambda: (n := liveness.read_pid(arm)) is not None and n != mirror, "a second mirror")
    assert len(events_of(arm, ev.PLACED)) == 1  # the same life: no second placement

    node_id = ray_backend.read_spec(arm)["node"]["node_id"]
    lost = next(n for n in (cluster.worker, second) if n.node_id == node_id)
    cluster.cluster.remove_node(lost, allow_graceful=False)  # the node is gone, with the arm's worker
    if lost is cluster.worker:
        cluster.worker = second  # the module's next user gets the node that remains
    wait_for(lambda: ended(arm), "the mirror to record the lost node")
    watcher = ExperimentWatcher(exp)
    watcher.poll()
    a = watcher.state.arms["a"]
    assert a.status == st.CRASHED and a.failure is not None
    assert "left the Ray cluster" in a.failure.message, a.failure.message

    monkeypatch.delenv(faults.ENV_VAR)
    assert cli.main(["resume", "a", "-x", "lost"]) == 0
    wait_for(lambda: ended(arm), "the arm resumed on the other node to end")
    assert liveness.read_exit(arm) == 0, arm.stderr.read_text()[-3000:]
    placed = events_of(arm, ev.PLACED)
    assert placed[-1]["node_id"] != node_id
    assert events_of(arm, ev.RESUMED)[-1]["step"] == 3  # the checkpoint on the shared path
    assert (cluster.folder / "shared").is_dir()
