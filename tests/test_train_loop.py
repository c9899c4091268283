"""The trainer in-process on tiny random models: events, resume, control requests, failures, milestone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gputwin.control import requests as control
from gputwin.core import events
from gputwin.train import faults
from gputwin.train.loop import train
from gputwin.core.schedule import LrPlan, lr_at
from tiny import World, make_arm

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_fault")]


def log(arm: Path) -> list[events.Event]:
    result = events.read_events(arm / "events.jsonl")
    assert result.bad_lines == []
    return result.events


def kinds(evs: list[events.Event]) -> list[str]:
    return [e.kind for e in evs]


def steps(evs: list[events.Event]) -> list[events.Event]:
    return [e for e in evs if e.kind == events.STEP]


def test_a_whole_run_writes_every_event_with_its_fields(world: World, tmp_path: Path) -> None:
    arm = make_arm(tmp_path, world.profile("generate", epochs=2))
    assert train(arm) == 0
    evs = log(arm)
    assert evs[0].kind == events.STARTED and evs[-1].kind == events.FINISHED
    for e in evs:  # every line carries the required fields of its kind
        assert all(field in e.data for field in events.REQUIRED[e.kind]), e.kind
    started = evs[0]
    assert started["samples"] == 24 and started["steps_per_epoch"] == 6 and started["total_steps"] == 12
    assert started["device"] == "cpu" and started["pid"] > 0 and started["engine"] == "plain"
    assert 0 < started["trainable_params"] < started["total_params"]
    assert started["tokens_per_epoch"] > 0 and started["truncated"] >= 0
    assert started["config"]["name"] == "arm"
    got = steps(evs)
    assert [e["step"] for e in got] == list(range(1, 13))
    assert [e["epoch"] for e in got][5] == 1.0 and got[-1]["epoch"] == 2.0
    for e in got:
        assert e["loss"] > 0 and e["grad_norm"] >= 0 and e["tokens"] > 0 and e["samples"] == 4
        assert e["step_seconds"] > 0 and e["tokens_per_s"] > 0
    plan = LrPlan(5e-3, 2, "linear", 12)
    assert [e["lr"] for e in got] == pytest.approx([lr_at(k, plan) for k in range(1, 13)])
    assert [e["step"] for e in evs if e.kind == events.CHECKPOINT] == [3, 6, 9, 12]
    times = [e.t for e in evs]
    assert times == sorted(times)
    finished = evs[-1]
    assert finished["step"] == 12 and Path(finished["adapter"], "gputwin.json").is_file()
    kept = sorted(p.name for p in (arm / "checkpoints").iterdir())
    assert kept == ["step-000009", "step-000012"]  # keep_checkpoints = 2
    assert (arm / "checkpoints" / "step-000012" / "adapter" / "adapter_config.json").is_file()


def test_training_lowers_the_loss_of_the_tag_head(world: World, tmp_path: Path) -> None:
    arm = make_arm(tmp_path, world.profile("tag", epochs=4, learning_rate=2e-2))
    assert train(arm) == 0
    evs = log(arm)
    assert evs[0]["label_names"][0] == "O" and "B-EMAIL" in evs[0]["label_names"]
    losses = [e["loss"] for e in steps(evs)]
    assert sum(losses[-6:]) < sum(losses[:6])


def test_a_stopped_and_resumed_run_repeats_the_uninterrupted_one(world: World, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    profile = world.profile("generate", epochs=2)  # crosses an epoch boundary; LoRA dropout is on
    whole = make_arm(tmp_path / "whole", profile)
    assert train(whole) == 0

    split = make_arm(tmp_path / "split", profile)
    monkeypatch.setenv(faults.ENV_VAR, "sigterm@5")
    assert train(split) == 0
    first = log(split)
    assert first[-1].kind == events.STOPPED and first[-1]["step"] == 5 and first[-1]["by"] == "signal"
    monkeypatch.delenv(faults.ENV_VAR)
    assert train(split) == 0
    evs = log(split)
    resumed = [e for e in evs if e.kind == events.RESUMED]
    assert len(resumed) == 1 and resumed[0]["step"] == 5 and resumed[0]["checkpoint"].endswith("step-000005")

    expected, got = steps(log(whole)), steps(evs)
    assert [e["step"] for e in got] == list(range(1, 13))
    for a, b in zip(expected, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-6)
        assert b["lr"] == a["lr"] and b["tokens"] == a["tokens"]


def test_a_stop_request_checkpoints_and_stops(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arm = make_arm(tmp_path, world.profile("generate", epochs=2))
    monkeypatch.setenv(faults.ENV_VAR, "sigterm@4")
    assert train(arm) == 0
    monkeypatch.delenv(faults.ENV_VAR)
    control.write_request(arm / "control", control.STOP, by="ui")
    assert train(arm) == 0
    evs = log(arm)
    assert kinds(evs)[-3:] == [events.STARTED, events.RESUMED, events.STOPPED]
    stopped = evs[-1]
    assert stopped["step"] == 4 and stopped["by"] == "ui" and stopped["reason"] == "requested"
    assert stopped["checkpoint"].endswith("step-000004")
    assert not list((arm / "control").iterdir())


def test_extending_keeps_the_lr_continuous_and_decays_to_the_new_end(world: World, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    arm = make_arm(tmp_path, world.profile("generate", epochs=1))  # 6 steps
    monkeypatch.setenv(faults.ENV_VAR, "sigterm@4")
    assert train(arm) == 0
    monkeypatch.delenv(faults.ENV_VAR)
    control.write_request(arm / "control", control.EXTEND, epochs=1, by="verdict")
    assert train(arm) == 0
    evs = log(arm)
    extended = next(e for e in evs if e.kind == events.EXTENDED)
    assert extended["step"] == 4 and extended["total_steps"] == 12 and extended["epochs"] == 2.0
    assert extended["by"] == "verdict" and extended["lr_plan"]["anchor_step"] == 4
    got = {e["step"]: e["lr"] for e in steps(evs)}
    assert sorted(got) == list(range(1, 13)) and evs[-1].kind == events.FINISHED and evs[-1]["step"] == 12
    # continuous: the first lr after the extension follows on from the last one before, without a jump
    old = LrPlan(5e-3, 2, "linear", 6)
    assert got[5] == pytest.approx(extended["lr_next"])
    assert 0 < got[4] - got[5] <= lr_at(4, old) - lr_at(5, old)
    # and decays on a straight line to one step's worth at the new end
    tail = [got[k] for k in range(4, 13)]
    assert [a - b for a, b in zip(tail, tail[1:])] == pytest.approx([got[4] / 9] * 8)
    assert got[12] == pytest.approx(got[4] / 9)


def test_extending_a_finished_run_resumes_from_its_final_checkpoint(world: World, tmp_path: Path) -> None:
    arm = make_arm(tmp_path, world.profile("tag", epochs=1))
    assert train(arm) == 0
    assert log(arm)[-1].kind == events.FINISHED
    control.write_request(arm / "control", control.EXTEND, epochs=1)
    assert train(arm) == 0
    evs = log(arm)
    second = evs[[i for i, e in enumerate(evs) if e.kind == events.STARTED][1]:]
    assert kinds(second)[:3] == [events.STARTED, events.RESUMED, events.EXTENDED]
    assert second[1]["step"] == 6 and second[2]["total_steps"] == 12
    later = steps(second)
    assert [e["step"] for e in later] == list(range(7, 13))
    # a finished arm starts a new cycle: warmup to rules.extend_lr (0.5) of its peak, then its own decay
    lrs = [e["lr"] for e in later]
    peak = world.profile("tag").train.learning_rate
    assert second[2]["new_cycle"] is True and second[2]["lr_now"] == pytest.approx(steps(evs)[5]["lr"])
    assert max(lrs) == pytest.approx(0.5 * peak) and max(lrs) > 2 * steps(evs)[5]["lr"]
    top = lrs.index(max(lrs))
    assert lrs[top:] == sorted(lrs[top:], reverse=True) and lrs[-1] > 0
    assert second[2]["lr_curve"][0] == 0 and max(second[2]["lr_curve"]) == pytest.approx(0.5 * peak)
    assert second[-1].kind == events.FINISHED and second[-1]["step"] == 12


@pytest.mark.parametrize("late", [False, True], ids=["read-at-once", "read-a-step-late"])
def test_a_nan_loss_fails_with_a_hint(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str], late: bool) -> None:
    """Also when the NaN shows only after the next step was issued (a GPU engine): the step it happened
    at is named, and the steps before it keep their events."""
    if late:
        use_late_engines(monkeypatch)
    arm = make_arm(tmp_path, world.profile("generate"))
    monkeypatch.setenv(faults.ENV_VAR, "nan@3")
    assert train(arm) == 1
    evs = log(arm)
    failed = evs[-1]
    assert failed.kind == events.FAILED and failed["error"] == "NonFiniteLoss"
    assert failed["step"] == 2 and "at step 3" in failed["message"] and "learning_rate" in failed["hint"]
    assert [e["step"] for e in steps(evs)] == [1, 2]
    assert "NonFiniteLoss" in capsys.readouterr().err


def test_out_of_memory_fails_with_a_hint(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arm = make_arm(tmp_path, world.profile("tag"))
    monkeypatch.setenv(faults.ENV_VAR, "oom@2")
    assert train(arm) == 1
    failed = log(arm)[-1]
    assert failed.kind == events.FAILED and failed["error"] == "OutOfMemory" and failed["step"] == 1
    assert "batch_size" in failed["hint"] and "max_length" in failed["hint"]


def test_a_missing_dataset_fails_as_a_user_error(world: World, tmp_path: Path) -> None:
    profile = world.profile("tag")
    profile = type(profile).from_dict(profile.to_dict() | {"data": {"train": str(tmp_path / "nope.jsonl"),
                                                                   "test": str(world.test)}})
    arm = make_arm(tmp_path, profile)
    assert train(arm) == 2
    failed = log(arm)[-1]
    assert failed.kind == events.FAILED and "nope.jsonl" in failed["message"] and failed["hint"]


def test_a_start_that_fails_reports_at_once_without_waiting_for_its_data(world: World, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The data is tokenised beside the model's load (in a fork); a model that does not load fails the arm then and
    there, not once the tokenising (minutes, on a large file) is done."""
    import shutil
    import time

    from gputwin.train import tokcache

    model = tmp_path / "tokenizer-only"  # its tokenizer loads; its model does not
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (world.qwen / name).exists():
            shutil.copy(world.qwen / name, model / name)
    gate, record = tmp_path / "go", tmp_path / "tokenising"  # files: the tokenising runs in another process
    real = tokcache.load_training_data

    def held(*args, **kwargs):
        deadline = time.monotonic() + 60
        while not gate.exists() and time.monotonic() < deadline:  # let go by the test once train() has returned
            time.sleep(0.02)
        partial = record.with_suffix(".partial")
        partial.write_text(f"{gate.exists()}")
        partial.replace(record)  # whole, for the test reading it from another process
        return real(*args, **kwargs)

    monkeypatch.setattr(tokcache, "load_training_data", held)
    profile = world.profile("generate")
    arm = make_arm(tmp_path, type(profile).from_dict(profile.to_dict() | {
        "model": {**profile.to_dict()["model"], "base": str(model)}}))
    assert train(arm) == 2
    gate.touch()
    failed = log(arm)[-1]
    assert failed.kind == events.FAILED and "tokenizer-only" in failed["message"]
    for _ in range(200):
        if record.exists():
            break
        time.sleep(0.05)
    waited = [record.read_text() == "True"] if record.exists() else []
    assert waited == [True]  # the data was still being read when the failure was reported


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_a_gpu_without_cuda_fails_clearly(world: World, tmp_path: Path) -> None:
    profile = world.profile("tag")
    arm = make_arm(tmp_path, type(profile).from_dict(profile.to_dict() | {"device": 0}))
    assert train(arm) == 1
    failed = log(arm)[-1]
    assert failed["error"] == "CudaUnavailable" and "cpu" in failed["hint"]


def test_garbage_control_files_are_removed_and_reported(world: World, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    arm = make_arm(tmp_path, world.profile("tag"))
    (arm / "control").mkdir()
    (arm / "control" / "0001-junk.json").write_text("{not json")
    (arm / "control" / "0002-odd.json").write_text(json.dumps({"action": "explode"}))
    assert train(arm) == 0
    assert log(arm)[-1].kind == events.FINISHED
    assert not list((arm / "control").iterdir())
    err = capsys.readouterr().err
    assert "0001-junk.json" in err and "0002-odd.json" in err and "explode" in err


def test_the_milestone_saves_an_adapter_and_validates(world: World, tmp_path: Path) -> None:
    arm = make_arm(tmp_path, world.profile("tag", milestone_step=4))
    assert train(arm) == 0
    evs = log(arm)
    at = kinds(evs).index(events.MILESTONE)
    assert evs[at]["step"] == 4
    assert kinds(evs)[at:at + 3] == [events.MILESTONE, events.CHECKPOINT, events.VALIDATION]
    validation = evs[at + 2]
    assert validation["step"] == 4 and validation["reason"] == "milestone" and validation["sample_size"] == 4
    for key in ("precision", "recall", "f1"):
        assert 0.0 <= validation[key] <= 1.0
    written = json.loads(Path(validation["path"]).read_text())
    assert written["step"] == 4 and written["f1"] == validation["f1"]
    assert Path(validation["path"]) == arm / "validation" / "step-000004.json"
    meta = json.loads((arm / "adapters" / "step-000004" / "gputwin.json").read_text())
    assert meta["task"] == "tag" and meta["label_names"][0] == "O" and meta["max_length"] == 256
    assert evs[-1].kind == events.FINISHED


def test_validation_does_not_change_the_training_run(world: World, tmp_path: Path) -> None:
    plain = make_arm(tmp_path / "plain", world.profile("tag"))
    checked = make_arm(tmp_path / "checked", world.profile("tag", milestone_step=2))
    control.write_request(checked / "control", control.VALIDATE, by="cli")  # validate now, at step 0
    assert train(plain) == 0 and train(checked) == 0
    validations = [e for e in log(checked) if e.kind == events.VALIDATION]
    assert [(e["step"], e["reason"]) for e in validations] == [(0, "requested"), (2, "milestone"), (6, "final")]
    assert [e["loss"] for e in steps(log(checked))] == pytest.approx([e["loss"] for e in steps(log(plain))], rel=1e-6)


def test_the_generate_head_validates_at_the_milestone(world: World, tmp_path: Path) -> None:
    arm = make_arm(tmp_path, world.profile("generate", milestone_step=6))
    assert train(arm) == 0
    validation = next(e for e in log(arm) if e.kind == events.VALIDATION)
    assert validation["step"] == 6 and Path(validation["path"]).is_file()
    assert log(arm)[-1].kind == events.FINISHED


def test_the_milestone_validation_finds_its_prompts_prepared_while_training_ran(world: World, tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Once training runs, a thread tokenises the validation's prompts; the milestone's validation and the
    cooldown probe's find them done (encoded once, on that thread) and score as they would have."""
    import threading

    from gputwin.validate import predict

    threads: list[str] = []
    encode = predict.encode_prompts

    def recorded(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return encode(*args, **kwargs)

    monkeypatch.setattr(predict, "encode_prompts", recorded)
    arm = make_arm(tmp_path, world.profile("generate", epochs=2, milestone_step=6))
    assert train(arm) == 0
    validations = [e for e in log(arm) if e.kind == events.VALIDATION]
    assert [e["step"] for e in validations] == [6, 12]
    assert threads == ["gputwin-validation-prep"]
    assert json.loads(Path(validations[0]["path"]).read_text())["schedule"]["probe_steps"] > 0


@pytest.mark.parametrize("task", ["generate", "tag"])
def test_a_fast_engine_profile_trains_to_the_end(world: World, tmp_path: Path, task: str) -> None:
    """train.engine = "fast" runs wherever the plain engine does (falling back to it where needed)."""
    arm = make_arm(tmp_path, world.profile(task, engine="fast"))
    assert train(arm) == 0
    evs = log(arm)
    assert evs[0]["engine"] in ("fast", "plain") and evs[-1].kind == events.FINISHED
    assert [e["step"] for e in steps(evs)] == list(range(1, 7))
    assert all(e["loss"] > 0 for e in steps(evs))


def test_a_validation_that_fails_loses_no_training_and_runs_again_on_resume(world: World, tmp_path: Path) -> None:
    profile = world.profile("tag", milestone_step=3)
    broken = profile.to_dict()
    broken["data"]["test"] = str(tmp_path / "missing-test.jsonl")
    arm = make_arm(tmp_path, type(profile).from_dict(broken))
    assert train(arm) == 2
    evs = log(arm)
    assert kinds(evs)[-3:] == [events.MILESTONE, events.CHECKPOINT, events.FAILED]
    assert "missing-test.jsonl" in evs[-1]["message"] and evs[-1]["step"] == 3
    # the milestone's checkpoint, written on a thread while it validated, landed before the run ended
    assert evs[-2].get("background") and (arm / "checkpoints" / "step-000003" / "checkpoint.json").is_file()
    assert not (arm / "validation" / "step-000003.json").exists()

    make_arm(tmp_path, profile)  # the test file put right
    assert train(arm) == 0
    later = log(arm)[len(evs):]
    # the checkpoint of step 3 is already there: validation follows the milestone at once
    assert kinds(later)[:4] == [events.STARTED, events.RESUMED, events.MILESTONE, events.VALIDATION]
    assert later[1]["step"] == 3 and later[3]["step"] == 3
    assert [e["step"] for e in steps(later)] == [4, 5, 6] and later[-1].kind == events.FINISHED


# ---------------------------------------------------------------- an engine whose figures arrive later


class LateOutcome:
    """What a GPU engine returns: figures read later; a NaN shows only when they are read."""

    def __init__(self, compute: object) -> None:
        self.compute = compute

    def result(self) -> object:
        return self.compute()


class LateEngine:
    """The real engine, with the outcome of each step handed back before it is looked at, as on a GPU."""

    def __init__(self, inner: object) -> None:
        self.inner, self.name = inner, inner.name
        self.issued: list[int] = []

    def collate(self, examples: object) -> object:
        return self.inner.collate(examples)

    def step(self, batch: object, lr: float) -> LateOutcome:
        try:
            output = self.inner.step(batch, lr)
        except Exception as exc:  # noqa: BLE001 - raised when read, like a GPU step's NaN
            failure = exc

            def fail() -> object:
                raise failure
            return LateOutcome(fail)
        return LateOutcome(output.result)


def use_late_engines(monkeypatch: pytest.MonkeyPatch) -> None:
    from gputwin.train import setup

    real = setup.make_engine
    monkeypatch.setattr(setup, "make_engine", lambda *args, **kwargs: LateEngine(real(*args, **kwargs)))


@pytest.fixture()
def late_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    use_late_engines(monkeypatch)


def test_figures_read_a_step_late_give_the_same_log_in_the_same_order(world: World, tmp_path: Path,
                                                                      late_engine: None) -> None:
    profile = world.profile("tag", epochs=2, milestone_step=4)
    late = make_arm(tmp_path / "late", profile)
    assert train(late) == 0
    evs = log(late)
    got = steps(evs)
    assert [e["step"] for e in got] == list(range(1, 13))
    # a checkpoint, the milestone and the validation come after the event of their step, never before it; a
    # periodic checkpoint written in the background says so once it is on disk, a step or more later
    for e in evs:
        if e.kind in (events.CHECKPOINT, events.MILESTONE, events.VALIDATION, events.FINISHED):
            logged = [s["step"] for s in evs[:evs.index(e)] if s.kind == events.STEP]
            if e.get("background") and e["step"] != 4:
                assert logged[-1] >= e["step"] and e["step"] % profile.train.checkpoint_every == 0
            else:
                assert logged[-1] == e["step"], (e.kind, e["step"], logged[-3:])
    assert any(e.get("background") for e in evs if e.kind == events.CHECKPOINT and e["step"] != 4)
    # the milestone's checkpoint is written while the model is validated, and says so before the validation does
    at_milestone = [e for e in evs if e.get("step") == 4 and e.kind != events.STEP]
    assert [e.kind for e in at_milestone][:3] == [events.MILESTONE, events.CHECKPOINT, events.VALIDATION]
    assert at_milestone[1].get("background") is True
    adapter = Path(at_milestone[2]["adapter"])
    assert adapter.name == "step-000004" and (adapter / "adapter_model.safetensors").is_file()
    assert all(e["step_seconds"] > 0 for e in got)


def test_a_stop_request_with_a_step_in_flight_logs_it_then_stops_there(world: World, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       late_engine: None) -> None:
    arm = make_arm(tmp_path, world.profile("generate", epochs=2))
    monkeypatch.setenv(faults.ENV_VAR, "sigterm@4")
    assert train(arm) == 0
    evs = log(arm)
    assert [e["step"] for e in steps(evs)] == [1, 2, 3, 4]
    assert evs[-1].kind == events.STOPPED and evs[-1]["step"] == 4
    assert evs[-2].kind == events.CHECKPOINT and evs[-2]["step"] == 4


def test_an_old_checkpoint_that_cannot_be_removed_leaves_the_new_one_standing(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Pruning comes after a checkpoint is whole: its failure (a folder made read-only, say) is reported and
    training goes on, each checkpoint with its event."""
    from gputwin.train import loop

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "step-000003")

    monkeypatch.setattr(loop, "prune", refuse)
    arm = make_arm(tmp_path, world.profile("tag", epochs=2))
    assert train(arm) == 0
    evs = log(arm)
    assert evs[-1].kind == events.FINISHED
    assert sorted({e["step"] for e in evs if e.kind == events.CHECKPOINT}) == [3, 6, 9, 12]
    assert "could not remove an old checkpoint" in capsys.readouterr().err
