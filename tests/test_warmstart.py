"""Warm starts: a server that has done a trainer's imports forks the supervisor, which forks the trainer
(gputwin.control.warmstart, gputwin.train.warm). Real processes: the server, a tiny arm trained to its end, and
a trainer killed with -9 whose supervisor still records the signal."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from gputwin.control import launcher, supervise, warmstart
from gputwin.core import events as ev
from gputwin.core.paths import ArmPaths
from test_launcher import wait_for


def test_the_setting_reads_off_or_minutes() -> None:
    assert warmstart.idle_seconds({}) == warmstart.DEFAULT_IDLE_MINUTES * 60
    assert warmstart.idle_seconds({"GPUTWIN_WARM": "off"}) is None
    assert warmstart.idle_seconds({"GPUTWIN_WARM": "0"}) is None
    assert warmstart.idle_seconds({"GPUTWIN_WARM": "1.5"}) == 90
    assert warmstart.idle_seconds({"GPUTWIN_WARM": "soon"}) is None  # unreadable: no warm starts, no crash


def test_a_server_serves_only_launches_whose_imports_come_out_the_same() -> None:
    env = {"HOME": "/home/u", "HF_HOME": "/data/hf", "PATH": "/bin"}
    same = warmstart.key(env)
    assert warmstart.key({**env, "CUDA_VISIBLE_DEVICES": "1", "GPUTWIN_THREADS": "2", "TERM": "xterm"}) == same
    assert warmstart.key({**env, "HF_HOME": "/other/hf"}) != same  # read when transformers is imported
    assert warmstart.key({**env, "PYTHONPATH": "src"}) == warmstart.key({**env, "PYTHONPATH": os.path.abspath("src")})


def test_a_server_serves_only_launches_whose_forks_would_come_out_the_same() -> None:
    """A fork inherits the server's umask, CPUs, limits and batch job: a launch that differs gets its own server."""
    env = {"HOME": "/home/u"}
    same = warmstart.key(env)
    assert warmstart.key({**env, "SLURM_JOB_ID": "17"}) != same  # another job's cgroup: never shared
    old = os.umask(0o077)
    try:
        assert warmstart.key(env) != same
    finally:
        os.umask(old)
    cpus = os.sched_getaffinity(0)
    if len(cpus) > 1:
        os.sched_setaffinity(0, {min(cpus)})
        try:
            assert warmstart.key(env) != same
        finally:
            os.sched_setaffinity(0, cpus)
    assert warmstart.key(env) == same


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux's setpriv")
def test_a_server_that_may_not_leave_idle_scheduling_still_serves(tmp_path: Path) -> None:
    """Most users, and root in most containers, may go idle but not come back (no CAP_SYS_NICE, RLIMIT_NICE 0).
    Such a server imports at the usual priority: it once went idle, failed to come back and died after its
    imports, so warm starts never happened there."""
    folder = Path(tempfile.mkdtemp(prefix="gw-"))
    folder.chmod(0o700)
    socket_path = folder / "k.sock"
    src = str(Path(__file__).resolve().parents[1] / "src")
    server = subprocess.Popen(["setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice", sys.executable, "-m",
                               "gputwin.train.warm", str(socket_path), "--idle", "30"],
                              env={**os.environ, "PYTHONPATH": src}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              preexec_fn=lambda: __import__("resource").setrlimit(__import__("resource").RLIMIT_NICE,
                                                                                  (0, 0)))
    try:
        wait_for(lambda: socket_path.exists() or server.poll() is not None, "the server to listen", limit_s=240)
        assert server.poll() is None and socket_path.exists(), server.stderr.read().decode()[-2000:]  # type: ignore
        probe = subprocess.run(["setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice", sys.executable, "-c",
                                "from gputwin.train.warm import _may_leave_idle; print(_may_leave_idle())"],
                               env={**os.environ, "PYTHONPATH": src}, capture_output=True, text=True, timeout=60,
                               preexec_fn=lambda: __import__("resource").setrlimit(
                                   __import__("resource").RLIMIT_NICE, (0, 0)))
        assert probe.stdout.strip() == "False", probe.stderr
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)


def test_no_server_means_a_cold_start(tmp_path: Path) -> None:
    cache = tempfile.mkdtemp(prefix="gw-")  # short: a socket's path holds 108 bytes
    env = {"XDG_CACHE_HOME": cache, "GPUTWIN_WARM": "5"}
    try:
        assert warmstart.request(["arm"], env, stdout=tmp_path / "o", stderr=tmp_path / "e") is None
        stale = warmstart.socket_path(env)
        assert stale is not None
        stale.parent.mkdir(parents=True)
        stale.touch()  # a socket file left by a server that was killed
        assert warmstart.request(["arm"], env, stdout=tmp_path / "o", stderr=tmp_path / "e") is None
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def test_a_cache_folder_that_cannot_be_written_means_no_warm_starts_and_no_error(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    env = {"XDG_CACHE_HOME": str(blocked), "GPUTWIN_WARM": "5"}
    warmstart.keep_warm(env)  # no exception: the launch goes on, cold
    assert warmstart.request(["arm"], env, stdout=tmp_path / "o", stderr=tmp_path / "e") is None


def test_a_socket_path_too_long_for_the_system_means_no_warm_starts() -> None:
    assert warmstart.socket_path({"XDG_CACHE_HOME": "/" + "x" * 120}) is None
    assert warmstart.request(["arm"], {"XDG_CACHE_HOME": "/" + "x" * 120}, stdout=Path("o"), stderr=Path("e")) is None


@pytest.fixture
def warm(monkeypatch: pytest.MonkeyPatch, logs: Path, world: Any) -> Iterator[dict[str, str]]:
    """A warm server for this environment, serving; ended afterwards. (A short cache path: a socket's path
    holds at most 108 bytes, and pytest's temporary folders are long.)"""
    cache = tempfile.mkdtemp(prefix="gw-")
    monkeypatch.setenv("XDG_CACHE_HOME", cache)
    monkeypatch.setenv("GPUTWIN_WARM", "3")
    env = launcher._arm_env(world.profile(), threads=1)
    warmstart.keep_warm(env)
    socket_path = warmstart.socket_path(env)
    assert socket_path is not None
    wait_for(socket_path.exists, "the server to finish its imports and listen", limit_s=240)
    yield env
    pid = int(Path(f"{socket_path}.lock").read_text())
    os.kill(pid, signal.SIGTERM)
    shutil.rmtree(cache, ignore_errors=True)


def lineage(pid: int) -> list[str]:
    """The command lines of a process's parent and grandparent."""
    parent = psutil.Process(pid).parent()
    assert parent is not None
    grand = parent.parent()
    return [" ".join(parent.cmdline()), " ".join(grand.cmdline()) if grand else ""]


@pytest.mark.slow
def test_a_warm_started_arm_trains_to_its_end_and_its_kill_9_is_still_recorded(
        warm: dict[str, str], logs: Path, world: Any) -> None:
    from tiny import make_arm

    profile = world.profile(name="warm")
    arm = ArmPaths(Path(make_arm(logs / "x", profile)))
    pid = launcher.spawn_arm(arm, profile, threads=1)
    parent, grand = lineage(pid)
    assert "gputwin.train.warm" in grand  # the supervisor is the server's fork, the trainer the supervisor's
    assert "gputwin.train.warm" in parent
    if sys.platform == "linux":  # the forks keep the server's command line; their names tell them apart
        # the fork names itself first thing, which a loaded machine may not have run yet when the pid is known
        wait_for(lambda: psutil.Process(pid).name() != "gputwin-superv", "the trainer's fork to name itself", limit_s=10)
        assert psutil.Process(pid).name() == "gputwin-train"
        assert psutil.Process(pid).parent().name() == "gputwin-superv"  # type: ignore[union-attr]
    wait_for(lambda: supervise.read_exit(arm) is not None, "the warm-started arm to end", limit_s=240)
    assert supervise.read_exit(arm) == 0
    logged = ev.read_events(arm.events).events
    assert logged[0].kind == ev.STARTED and logged[-1].kind == ev.FINISHED and any(e.kind == ev.STEP for e in logged)
    assert logged[0].data["startup_seconds"]["process"] == "warm fork"

    long = world.profile(name="killed", epochs=50)
    killed = ArmPaths(Path(make_arm(logs / "x", long)))
    pid = launcher.spawn_arm(killed, long, threads=1)
    wait_for(lambda: any(e.kind == ev.STEP for e in ev.read_events(killed.events).events), "a first step", limit_s=240)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: supervise.read_exit(killed) is not None, "the supervisor to record the kill")
    assert supervise.read_exit(killed) == -signal.SIGKILL
    assert launcher.arm_status(killed) == "crashed"


@pytest.mark.slow
def test_a_launch_that_gave_up_on_a_stalled_server_is_not_started_twice(warm: dict[str, str], tmp_path: Path) -> None:
    """The launch waits a while for the server's answer, then starts the arm itself; the server, once it runs
    again, forks for that request, but its fork gets no answer and ends without starting the arm."""
    socket_path = warmstart.socket_path(warm)
    assert socket_path is not None
    server = int(Path(f"{socket_path}.lock").read_text())
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    os.kill(server, signal.SIGSTOP)
    try:
        assert warmstart.request(["nowhere"], warm, stdout=out, stderr=err, timeout=0.5) is None
    finally:
        os.kill(server, signal.SIGCONT)
    time.sleep(1.5)  # the server reads the request and forks; the fork waits for the answer that never comes
    assert not out.exists() and not err.exists()  # it never became a supervisor
    served = warmstart.request(["nowhere"], warm, stdout=out, stderr=err)
    assert served is not None  # the server still serves; this fork becomes a supervisor (of nothing here)
    wait_for(lambda: err.exists(), "the supervisor's log")


def test_a_launch_talks_only_to_a_server_folder_of_its_own(tmp_path: Path) -> None:
    cache = tempfile.mkdtemp(prefix="gw-")
    env = {"XDG_CACHE_HOME": cache, "GPUTWIN_WARM": "5"}
    try:
        path = warmstart.socket_path(env)
        assert path is not None
        path.parent.mkdir(parents=True)
        path.parent.chmod(0o755)  # as another user could have made it, in a shared cache folder
        import socket as sockets

        with sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM) as listener:
            listener.bind(str(path))
            listener.listen(1)
            assert warmstart.request(["arm"], env, stdout=tmp_path / "o", stderr=tmp_path / "e", timeout=0.5) is None
            listener.settimeout(0.1)
            with pytest.raises(OSError):
                listener.accept()  # nothing was sent to it
    finally:
        shutil.rmtree(cache, ignore_errors=True)


@pytest.mark.slow
def test_gputwin_check_leaves_a_server_that_the_run_after_it_forks_from(
        monkeypatch: pytest.MonkeyPatch, logs: Path, world: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`gputwin check` comes before `gputwin run`: it starts the server then, so the first launch starts warm."""
    from gputwin.faces.cli import main
    from tiny import make_arm

    cache = tempfile.mkdtemp(prefix="gw-")
    monkeypatch.setenv("XDG_CACHE_HOME", cache)
    monkeypatch.setenv("GPUTWIN_WARM", "3")
    # as a shell has it: torch sets this one on itself once imported (as the check's imports do, and this
    # process's did); the server must match the environment the check began with, as the run's is
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    seed = str(Path(__file__).resolve().parents[1] / "profiles" / "seed.toml")
    env = launcher._arm_env(world.profile(), threads=1)
    socket_path = warmstart.socket_path(env)
    assert socket_path is not None and not socket_path.exists()
    check = [sys.executable, "-m", "gputwin.faces.cli", "check", seed]
    try:  # as a user runs it: its own process (whose imports add to its environment; the server must not see them)
        done = subprocess.run(check, capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "200"})
        assert done.returncode == 0, done.stderr
        assert "a server is doing a trainer's imports in the background" in done.stdout
        wait_for(socket_path.exists, "the server to finish its imports and listen", limit_s=240)
        assert main(["check", seed]) == 0
        assert "a server for this environment is ready (or starting)" in capsys.readouterr().out

        profile = world.profile(name="after-check")
        arm = ArmPaths(Path(make_arm(logs / "x", profile)))
        pid = launcher.spawn_arm(arm, profile, threads=1)
        assert "gputwin.train.warm" in lineage(pid)[1]  # the first launch after the check: a warm fork
        wait_for(lambda: supervise.read_exit(arm) is not None, "the arm to end", limit_s=240)
        assert supervise.read_exit(arm) == 0
        assert ev.read_events(arm.events).events[0].data["startup_seconds"]["process"] == "warm fork"
    finally:
        lock = Path(f"{socket_path}.lock")
        if lock.exists() and lock.read_text().strip():
            os.kill(int(lock.read_text()), signal.SIGTERM)
        shutil.rmtree(cache, ignore_errors=True)

    monkeypatch.setenv("GPUTWIN_WARM", "off")
    assert main(["check", seed]) == 0
    assert "warm starts" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_server_stays_while_a_watched_arm_runs_and_goes_after(tmp_path: Path) -> None:
    """An extend at the end of a long run starts warm: the server's idle time counts from when its arms ended."""
    folder = Path(tempfile.mkdtemp(prefix="gw-"))
    folder.chmod(0o700)
    socket_path = folder / "k.sock"
    arm = subprocess.Popen(["sleep", "120"])  # an arm's supervisor, started cold by the launch
    Path(f"{socket_path}.watch").write_text(f"{arm.pid}\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    server = subprocess.Popen([sys.executable, "-m", "gputwin.train.warm", str(socket_path), "--idle", "1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(socket_path.exists, "the server to finish its imports and listen", limit_s=240)
        time.sleep(4)  # four idle times, and the watched arm runs
        assert server.poll() is None
        arm.kill()
        arm.wait()
        server.wait(timeout=30)  # its idle time now counts: it goes
        assert not socket_path.exists() and not Path(f"{socket_path}.watch").exists()
    finally:
        for proc in (arm, server):
            if proc.poll() is None:
                proc.kill()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_watched_supervisor_that_ended_counts_as_gone_before_its_launcher_waits(tmp_path: Path) -> None:
    """A launcher that keeps running (the UI) waits for its ended supervisors only at its next launch: such a
    zombie, or a pid now another process's, must not keep the server up."""
    from gputwin.control.warmstart import _watch
    from gputwin.train.warm import _watched

    socket_path = tmp_path / "k.sock"
    running = subprocess.Popen(["sleep", "60"])
    ended = subprocess.Popen(["true"])
    try:
        wait_for(lambda: psutil.Process(ended.pid).status() == psutil.STATUS_ZOMBIE, "the zombie")
        _watch(socket_path, running.pid)
        Path(f"{socket_path}.watch").write_text(Path(f"{socket_path}.watch").read_text() + f"{ended.pid}\n"
                                                f"{os.getpid()} 12345.0\n")  # a start time not this process's
        assert _watched(socket_path) == {running.pid}
        running.kill()
        running.wait()
        assert _watched(socket_path) == set() and not Path(f"{socket_path}.watch").exists()
    finally:
        running.kill()
        ended.wait()


def test_the_server_builds_what_every_model_load_would_build_again() -> None:
    conversion = pytest.importorskip("transformers.conversion_mapping")
    if not hasattr(conversion, "get_checkpoint_conversion_mapping"):
        pytest.skip("this transformers builds no conversion table")
    from gputwin.train import warm as server

    conversion._checkpoint_conversion_mapping_cache = None
    server.prepare_loading()
    assert conversion._checkpoint_conversion_mapping_cache  # forks inherit it: their loads find it built
