"""The tokenised-data cache with real tokenizers and data files: a miss writes, the next start hits and gets
the very examples tokenising would give; a damaged, foreign or group-writable file is ignored and written
again; a changed data file, tokenizer file or max_length misses; two processes starting at once leave one
whole file; and a trainer's `started` event says whether its data came from the cache."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gputwin.core import events
from gputwin.core.data import load_dataset
from gputwin.core.encoding import bio_label_names
from gputwin.validate.modeling import load_tokenizer
from gputwin.train import tokcache
from gputwin.train.batching import Example, encode_samples
from gputwin.train.loop import train
from tiny import World, make_arm, make_samples, write_data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("world"), train=40, test=8)


def load(world: World, folder: Path, *, task: str = "generate", max_length: int = 256,
         train_file: Path | None = None, wait_s: float = tokcache.LOCK_WAIT_S) -> tokcache.TrainingData:
    base = world.qwen if task == "generate" else world.bert
    return tokcache.load_training_data(train_file or world.train, load_tokenizer(str(base)), base=str(base),
                                       task=task, max_length=max_length, folder=folder, wait_s=wait_s)


def tokenised(world: World, task: str, max_length: int = 256) -> tuple[list, list[str] | None]:
    """What the trainer gets without any cache: the data file read and every sample encoded."""
    base = world.qwen if task == "generate" else world.bert
    dataset = load_dataset(world.train)
    names = bio_label_names(dataset.entity_types) if task == "tag" else None
    return encode_samples(dataset.samples, load_tokenizer(str(base)), task=task, max_length=max_length,
                          label_names=names), names


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*{tokcache.SUFFIX}"))


@pytest.mark.parametrize("task", ["generate", "tag"])
def test_a_miss_writes_and_the_next_start_hits_with_the_same_examples(world: World, tmp_path: Path, task: str) -> None:
    folder = tmp_path / "logs" / ".cache" / "tokenized"
    first = load(world, folder, task=task)
    second = load(world, folder, task=task)
    expected, names = tokenised(world, task)
    assert (first.cache, second.cache) == (tokcache.WRITTEN, tokcache.HIT)
    assert first.examples == second.examples == expected and len(expected) == 40
    assert first.label_names == second.label_names == names and second.bad_lines == first.bad_lines == 0
    assert len(entries(folder)) == 1 and not list(folder.glob(".*.tmp"))
    assert os.stat(folder).st_mode & 0o777 == 0o700 and os.stat(entries(folder)[0]).st_mode & 0o777 == 0o600


def damage_body(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x55  # a label near the end
    path.write_bytes(bytes(raw))


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def open_to_the_group(path: Path) -> None:
    os.chmod(path, 0o664)


def not_a_cache_file(path: Path) -> None:
    path.write_text("[1, 2, 3]\n")


@pytest.mark.parametrize("spoil", [damage_body, cut_in_half, open_to_the_group, not_a_cache_file])
def test_a_damaged_or_foreign_file_is_ignored_and_written_again(world: World, tmp_path: Path, spoil) -> None:
    folder = tmp_path / "cache"
    load(world, folder)
    [path] = entries(folder)
    spoil(path)
    assert tokcache.read_entry(path, path.stem) is None
    again = load(world, folder)
    assert again.cache == tokcache.REBUILT and again.examples == tokenised(world, "generate")[0]
    assert load(world, folder).cache == tokcache.HIT


def test_a_file_saved_under_another_key_is_not_taken_for_this_one(world: World, tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    load(world, folder, max_length=256)
    [path] = entries(folder)
    other = tokcache.cache_key(world.train, str(world.qwen), task="generate", max_length=64)
    path.rename(folder / f"{other}{tokcache.SUFFIX}")  # the right layout, the wrong key inside
    result = load(world, folder, max_length=64)
    assert result.cache == tokcache.REBUILT and result.examples == tokenised(world, "generate", 64)[0]


def test_a_changed_data_file_max_length_or_tokenizer_misses(world: World, tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    train, _ = write_data(tmp_path / "data", train=12, test=2)
    assert load(world, folder, train_file=train).cache == tokcache.WRITTEN
    key = tokcache.cache_key(train, str(world.qwen), task="generate", max_length=256)
    train.write_text(train.read_text() + train.read_text().splitlines()[0] + "\n")  # one more sample
    changed = load(world, folder, train_file=train)
    assert changed.cache == tokcache.WRITTEN and len(changed.examples) == 13
    assert tokcache.cache_key(train, str(world.qwen), task="generate", max_length=256) != key
    assert load(world, folder, train_file=train, max_length=64).cache == tokcache.WRITTEN
    assert tokcache.cache_key(train, str(world.qwen), task="tag", max_length=256) != key
    assert len(entries(folder)) == 3

    model = tmp_path / "model"  # the same tokenizer in a folder of its own, then one file of it edited
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).write_bytes((world.qwen / name).read_bytes())
    before = tokcache.cache_key(train, str(model), task="generate", max_length=256)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    edited = tokcache.cache_key(train, str(model), task="generate", max_length=256)
    assert before is not None and edited != before
    (model / "model.safetensors").write_bytes(b"weights do not change how text is tokenised")
    assert tokcache.cache_key(train, str(model), task="generate", max_length=256) == edited


def test_a_chat_template_that_writes_todays_date_keys_the_data_by_the_date(world: World, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Llama 3.1's template puts `strftime_now(...)` into every prompt: tokens cached one day are not the next
    day's. Such a tokenizer's data is keyed by the date; any other's is not."""
    import datetime

    train, _ = write_data(tmp_path / "data", train=4, test=2)
    model = tmp_path / "model"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).write_bytes((world.qwen / name).read_bytes())

    class Day(datetime.date):
        today_is = datetime.date(2026, 1, 1)

        @classmethod
        def today(cls):  # type: ignore[override]
            return cls.today_is

    monkeypatch.setattr(tokcache.datetime, "date", Day)
    plain = tokcache.cache_key(train, str(model), task="generate", max_length=256)
    Day.today_is = datetime.date(2026, 1, 20)
    assert tokcache.cache_key(train, str(model), task="generate", max_length=256) == plain
    (model / "chat_template.jinja").write_text("Today Date: {{ strftime_now('%d %b %Y') }}\n{{ messages }}")
    dated = tokcache.cache_key(train, str(model), task="generate", max_length=256)
    Day.today_is = datetime.date(2026, 1, 21)
    assert tokcache.cache_key(train, str(model), task="generate", max_length=256) not in (dated, plain)


def test_without_a_folder_or_a_place_to_write_it_tokenises_all_the_same(world: World, tmp_path: Path) -> None:
    expected = tokenised(world, "generate")[0]
    assert load(world, None).cache == tokcache.OFF
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the cache folder's parent should be")
    result = load(world, blocker / ".cache" / "tokenized")
    assert result.cache == tokcache.UNSAVED and result.examples == expected
    assert tokcache.cache_key(world.train, "nobody/not-downloaded", task="generate", max_length=256) is None


def test_an_arm_that_cannot_get_the_lock_in_time_tokenises_for_itself(world: World, tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    key = tokcache.cache_key(world.train, str(world.qwen), task="generate", max_length=256)
    folder.mkdir(parents=True)
    fd = os.open(folder / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another arm writing, and stuck
        result = load(world, folder, wait_s=0.2)
    finally:
        os.close(fd)
    assert result.cache == tokcache.WRITTEN and load(world, folder).cache == tokcache.HIT


def fds_open_on(path: Path) -> int:
    """How many of this process's file descriptors are open on `path` (Linux /proc)."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            count += os.readlink(fd) == str(path)
        except OSError:
            pass
    return count


def test_an_arm_waits_for_the_one_writing_and_then_reads_its_file(world: World, tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    key = tokcache.cache_key(world.train, str(world.qwen), task="generate", max_length=256)
    folder.mkdir(parents=True)
    lock, path = folder / f"{key}.lock", folder / f"{key}{tokcache.SUFFIX}"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # this test is the arm writing
    results: list[tokcache.TrainingData] = []
    waiter = threading.Thread(target=lambda: results.append(load(world, folder)))
    try:
        waiter.start()
        deadline = time.monotonic() + 120  # guards against a hang only
        while fds_open_on(lock) < 2:  # the other arm found no file and is at the lock
            assert waiter.is_alive() and time.monotonic() < deadline, "the waiting arm never reached the lock"
            time.sleep(0.01)
        written = tokcache.TrainingData([Example([5, 6, 7], [-100, 6, 7], False)], None, 0, tokcache.WRITTEN)
        tokcache.write_entry(path, key, written, task="generate", max_length=256)
    finally:
        os.close(fd)
    waiter.join(timeout=120)
    assert [r.cache for r in results] == [tokcache.HIT] and results[0].examples == written.examples


WRITER = """
import json, sys
from pathlib import Path
from gputwin.validate.modeling import load_tokenizer
from gputwin.train import tokcache
base, train, folder = sys.argv[1:4]
data = tokcache.load_training_data(train, load_tokenizer(base), base=base, task="generate", max_length=256,
                                   folder=Path(folder))
print(json.dumps({"cache": data.cache, "ids": [e.input_ids for e in data.examples]}))
"""


def test_two_arms_starting_at_once_write_one_whole_file_and_share_it(world: World, tmp_path: Path) -> None:
    folder = tmp_path / "logs" / ".cache" / "tokenized"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(world.qwen), str(world.train), str(folder)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.splitlines()[-1]))
    assert sorted(r["cache"] for r in results) == [tokcache.HIT, tokcache.WRITTEN]  # the second waited, then read
    assert results[0]["ids"] == results[1]["ids"] == [e.input_ids for e in tokenised(world, "generate")[0]]
    assert len(entries(folder)) == 1 and not list(folder.glob(".*.tmp"))


@pytest.mark.slow
def test_the_started_event_says_whether_the_data_came_from_the_cache(world: World, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    starts = []
    for experiment in ("first", "second"):  # two experiments under one logs root share the cache
        arm = make_arm(logs / experiment, world.profile("generate", name="arm", epochs=1))
        assert train(arm) == 0
        starts.append(events.read_events(Path(arm) / "events.jsonl").events[0])
    first, second = (s.data["startup_seconds"] for s in starts)
    assert (first["data_cache"], second["data_cache"]) == (tokcache.WRITTEN, tokcache.HIT)
    for phases in (first, second):
        assert {"tokenizer", "data", "model", "lora", "engine", "data_wait", "total"} <= set(phases)
    assert starts[0].data["tokens_per_epoch"] == starts[1].data["tokens_per_epoch"] > 0
    assert starts[0].data["samples"] == starts[1].data["samples"] == len(make_samples(40))
    assert len(entries(tokcache.cache_folder(logs))) == 1


def test_the_cache_holds_the_tokenizers_ids_and_a_lookup_needs_no_tokenizer(world: World, tmp_path: Path) -> None:
    folder = tmp_path / "logs" / ".cache" / "tokenized"
    keys = {"base": str(world.qwen), "task": "generate", "max_length": 256, "folder": folder}
    assert tokcache.lookup(world.train, **keys) is None  # nothing there yet
    written = load(world, folder)
    tokenizer = load_tokenizer(str(world.qwen))
    facts = tokcache.TokenizerFacts(tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id,
                                    len(tokenizer))
    assert written.cache == tokcache.WRITTEN and written.tokenizer == facts
    found = tokcache.lookup(world.train, **keys)
    assert found is not None and found.cache == tokcache.HIT and found.tokenizer == facts
    assert found.examples == written.examples
    assert tokcache.lookup(world.train, **{**keys, "max_length": 64}) is None
    assert tokcache.lookup(world.train, **{**keys, "folder": None}) is None


@pytest.mark.slow
@pytest.mark.parametrize("task", ["generate", "tag"])
def test_on_a_cache_hit_the_tokenizer_loads_only_once_training_runs_and_the_run_is_the_same(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task: str) -> None:
    from gputwin.train import setup

    loaded_at: list[int] = []  # step events in the log when the tokenizer was loaded
    real = setup.load_tokenizer

    def counting(profile):
        log = tmp_path / "logs" / current[0] / "arm" / "events.jsonl"
        loaded_at.append(sum(json.loads(line)["kind"] == events.STEP for line in log.read_text().splitlines()))
        return real(profile)

    monkeypatch.setattr(setup, "load_tokenizer", counting)
    current, runs = [""], []
    for experiment in ("cold", "warm"):
        current[0] = experiment
        arm = make_arm(tmp_path / "logs" / experiment, world.profile(task, name="arm", epochs=1, milestone_step=5))
        assert train(arm) == 0
        runs.append(events.read_events(Path(arm) / "events.jsonl").events)
    (cold, warm) = runs
    assert [e.data["startup_seconds"]["tokenizer_load"] for e in (cold[0], warm[0])] == ["startup", "deferred"]
    assert warm[0].data["startup_seconds"]["data_cache"] == tokcache.HIT
    assert loaded_at[0] == 0 and loaded_at[1] >= 1 and len(loaded_at) == 2  # warm: after its first step, once

    def figures(log: list) -> tuple[list, list]:  # all but times and paths: same steps, losses and validation scores
        wall = {"t", "seconds", "step_seconds", "tokens_per_s", "train_seconds", "validate_seconds",
                "startup_seconds", "pid", "path", "adapter", "checkpoint"}
        background = [e["step"] for e in log if e.kind == events.CHECKPOINT and e.get("background")]  # when written
        return [(e.kind, {k: v for k, v in e.data.items() if k not in wall}) for e in log   # varies with the disk
                if not (e.kind == events.CHECKPOINT and e.get("background"))], background

    assert figures(cold) == figures(warm)
    assert any(e.kind == events.VALIDATION for e in warm)
