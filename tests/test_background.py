"""Start-up work in a fork of the trainer (gputwin.train.background.in_child): the result comes back through the
pipe; a child that fails, dies or sends what cannot be read leaves the work to the parent, whose errors keep their
message; the child dies with its parent. The trainer's data is tokenised so, and the run is the same."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from gputwin.core import events
from gputwin.core.errors import UserError
from gputwin.train import background, tokcache
from gputwin.train.batching import Example
from gputwin.train.loop import train
from tiny import World, make_arm

REPO = Path(__file__).resolve().parents[1]


def as_text(value: str) -> bytes:
    return value.encode()


def from_text(raw: bytes) -> str:
    return raw.decode()


def test_the_work_runs_in_a_child_and_its_result_comes_back() -> None:
    here = os.getpid()
    result = background.in_child(lambda: f"{os.getpid()} {'x' * 300_000}", "t", send=as_text,
                                 receive=from_text).result(timeout=30)
    pid, filler = result.split()
    assert int(pid) != here and len(filler) == 300_000  # more than a pipe's buffer


@pytest.mark.parametrize("fails", ["raises", "exits", "killed", "unreadable"])
def test_a_child_without_a_result_leaves_the_work_to_the_parent(fails: str) -> None:
    here = os.getpid()

    def work() -> str:
        if os.getpid() != here:
            if fails == "raises":
                raise RuntimeError("only in the child")
            if fails == "exits":
                os._exit(0)  # no result, a clean exit
            if fails == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            return "not what send makes"
        return "the parent's"

    def send(value: str) -> bytes:
        return b"\xff" + value.encode() if fails == "unreadable" else value.encode()

    assert background.in_child(work, "t", send=send, receive=from_text).result(timeout=30) == "the parent's"


def test_what_the_work_raises_is_raised_in_the_parent_with_its_message() -> None:
    def work() -> str:
        raise UserError("data.train: line 3: not JSON", "fix the line")

    future = background.in_child(work, "t", send=as_text, receive=from_text)
    with pytest.raises(UserError, match="line 3: not JSON") as caught:
        future.result(timeout=30)
    assert caught.value.hint == "fix the line"


def test_the_child_dies_with_its_parent(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO / 'src')!r})
        from gputwin.train import background
        background.in_child(lambda: time.sleep(60) or "late", "t", send=str.encode, receive=bytes.decode)
        print("forked", flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "forked"
        children = psutil.Process(parent.pid).children()
        assert len(children) == 1
        parent.kill()
        parent.wait(timeout=10)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [] and len(gone) == 1
    finally:
        parent.kill()


def test_the_wire_carries_each_files_data_and_status_and_refuses_anything_else() -> None:
    first = tokcache.TrainingData([Example([1, 2, 3], [-100, 2, 3], False), Example([4], [4], True)], ["B-X", "O"], 2,
                                  tokcache.WRITTEN, tokcache.TokenizerFacts(0, 1, None, 10))
    second = tokcache.TrainingData([Example([5, 6], [5, 6], False)], None, 0, tokcache.HIT, None)
    raw = tokcache.to_wire([first, second])
    assert tokcache.from_wire(raw) == [first, second]
    wrong_size = raw[:8] + (5).to_bytes(8, "little") + raw[16:]
    for spoilt in (raw[:-1], raw[:len(raw) // 2], wrong_size, raw.replace(b"written", b"nonsense")):
        with pytest.raises(ValueError):
            tokcache.from_wire(spoilt)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("world"), train=24, test=8)


def test_the_trainer_tokenises_its_data_in_a_child_and_the_run_is_the_same(world: World, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    here, seen = os.getpid(), tmp_path / "tokenised-in"
    real = tokcache.load_training_data

    def recorded(*args, **kwargs):  # noqa: ANN002, ANN003 - the real function's arguments
        with open(seen, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(tokcache, "load_training_data", recorded)
    runs = {}
    for name in ("forked", "cached"):  # two experiments under one logs root share the cache
        arm = make_arm(tmp_path / "logs" / name, world.profile("generate", name="arm", epochs=1))
        assert train(arm) == 0
        log = events.read_events(Path(arm) / "events.jsonl").events
        runs[name] = (log[0].data, [e.data["loss"] for e in log if e.kind == "step"])
    pids = [int(line) for line in seen.read_text().split()]
    assert len(pids) == 1 and pids[0] != here  # tokenised once, in a fork; the second start read the cache
    (forked, forked_losses), (cached, cached_losses) = runs["forked"], runs["cached"]
    assert (forked["startup_seconds"]["data_cache"], cached["startup_seconds"]["data_cache"]) == ("written", "hit")
    assert forked["samples"] == cached["samples"] == 24 and forked["tokens_per_epoch"] == cached["tokens_per_epoch"]
    assert forked_losses == cached_losses and len(forked_losses) > 0
