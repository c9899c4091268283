"""Checkpoints survive crashes: damaged or half-written ones are skipped, a changed setup is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gputwin.core import events
from gputwin.train import checkpoint
from gputwin.train.loop import train
from tiny import World, make_arm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_arm(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 12-step tag run with checkpoints at 9 and 12 (every 3, keep 2)."""
    arm = make_arm(tmp_path_factory.mktemp("runs"), world.profile("tag", epochs=2))
    assert train(arm) == 0
    return arm


def copy_arm(arm: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(arm, tmp_path / arm.name))


def last_events(arm: Path) -> list[events.Event]:
    evs = events.read_events(arm / "events.jsonl").events
    starts = [i for i, e in enumerate(evs) if e.kind == events.STARTED]
    return evs[starts[-1]:]


def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(finished_arm: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    arm = copy_arm(finished_arm, tmp_path)
    state = arm / "checkpoints" / "step-000012" / checkpoint.STATE_FILE
    state.write_bytes(state.read_bytes()[:100])  # torn by a crash or a full disk
    assert train(arm) == 0
    evs = last_events(arm)
    assert evs[1].kind == events.RESUMED and evs[1]["step"] == 9
    assert [e["step"] for e in evs if e.kind == events.STEP] == [10, 11, 12]
    assert evs[1]["checkpoint"].endswith("step-000009")
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint" in err and "step-000012" in err


def test_a_checkpoint_that_fails_half_way_through_loading_leaves_the_run_as_it_was(
        finished_arm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Its weights fit and load, its optimizer state does not: it is skipped, and the run that then starts afresh
    starts from the base weights, not from the skipped checkpoint's (its first loss is the first run's)."""
    import torch

    arm = copy_arm(finished_arm, tmp_path)
    shutil.rmtree(arm / "checkpoints" / "step-000009")
    state_file = arm / "checkpoints" / "step-000012" / checkpoint.STATE_FILE
    saved = torch.load(state_file, weights_only=True)
    saved["optimizer"]["param_groups"][0]["params"] = saved["optimizer"]["param_groups"][0]["params"][:1]
    torch.save(saved, state_file)
    first_loss = next(e["loss"] for e in events.read_events(arm / "events.jsonl").events if e.kind == events.STEP)
    assert train(arm) == 0
    evs = last_events(arm)
    assert not any(e.kind == events.RESUMED for e in evs)
    assert next(e["loss"] for e in evs if e.kind == events.STEP) == first_loss
    assert "skipping damaged checkpoint" in capsys.readouterr().err


def test_half_written_folders_are_cleaned_and_never_resumed(finished_arm: Path, tmp_path: Path) -> None:
    arm = copy_arm(finished_arm, tmp_path)
    root = arm / "checkpoints"
    torn = root / ".tmp-step-000015-999"
    shutil.copytree(root / "step-000012", torn)
    (torn / checkpoint.MANIFEST).unlink()  # the crash came before the manifest
    incomplete = root / "step-000014"
    incomplete.mkdir()  # a folder with a checkpoint's name but nothing in it
    assert [s for s, _ in checkpoint.list_checkpoints(root)] == [9, 12]
    assert train(arm) == 0
    assert not torn.exists()
    evs = last_events(arm)
    assert evs[1].kind == events.RESUMED and evs[1]["step"] == 12 and evs[-1].kind == events.FINISHED


def test_a_checkpoint_moved_aside_just_before_a_crash_is_put_back(finished_arm: Path, tmp_path: Path) -> None:
    arm = copy_arm(finished_arm, tmp_path)
    root = arm / "checkpoints"
    (root / "step-000012").rename(root / ".old-step-000012")
    checkpoint.clean_leftovers(root)
    assert [s for s, _ in checkpoint.list_checkpoints(root)] == [9, 12]


def test_a_changed_setup_refuses_to_resume(finished_arm: Path, world: World, tmp_path: Path) -> None:
    arm = copy_arm(finished_arm, tmp_path)
    profile = world.profile("tag", epochs=2)
    changed = profile.to_dict()
    changed["lora"]["r"] = 8
    (arm / "profile.json").write_text(json.dumps(changed))
    assert train(arm) == 2
    failed = events.read_events(arm / "events.jsonl").events[-1]
    assert failed.kind == events.FAILED and failed["error"] == "CheckpointMismatch"
    assert "lora" in failed["message"] and "checkpoints" in failed["hint"]


def test_prune_keeps_the_newest_and_never_the_protected_one(tmp_path: Path) -> None:
    for step in (3, 6, 9, 12):
        folder = tmp_path / checkpoint.checkpoint_name(step)
        folder.mkdir()
        (folder / checkpoint.MANIFEST).write_text("{}")
        (folder / checkpoint.STATE_FILE).write_bytes(b"")
    removed = checkpoint.prune(tmp_path, 2, protect=tmp_path / "step-000003")
    assert sorted(p.name for p in removed) == ["step-000006"]
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [3, 9, 12]


def test_a_snapshot_holds_the_state_it_was_taken_at_while_training_goes_on(world: World, tmp_path: Path) -> None:
    """A periodic checkpoint is written on a thread from a copy taken at its step: whatever the run does to its
    weights and optimizer meanwhile, the checkpoint (adapter folder included) holds that step's state."""
    import torch
    from safetensors.torch import load_file

    from gputwin.core.paths import ArmPaths
    from gputwin.core.schedule import make_plan
    from gputwin.train.loop import read_profile
    from gputwin.train.setup import build_run

    arm = ArmPaths(make_arm(tmp_path, world.profile("generate")))
    run = build_run(arm, read_profile(arm))
    params = [p for p in run.model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
    loss = sum((p.float() ** 2).sum() for p in params)
    loss.backward()
    run.optimizer.step()  # optimizer state exists
    at_snapshot = {name: p.detach().clone() for name, p in run.model.named_parameters() if p.requires_grad}
    state = checkpoint.TrainState(step=7, epoch=1, index=2, plan=make_plan(1e-3, 0, "linear", run.total_steps))
    snapshot = checkpoint.take_snapshot(state, run.model, run.optimizer, run.adapter_meta)
    optimizer_then = {k: v.clone() for k, v in run.optimizer.state[params[0]].items()}
    with torch.no_grad():  # training goes on before the write
        for p in params:
            p.mul_(-3.0)
    run.optimizer.step()
    state.step = 8
    written = checkpoint.BackgroundWrite(lambda: checkpoint.write_snapshot(tmp_path / "ckpt", snapshot, run.fingerprint),
                                         "test-write").result()
    assert written.name == "step-000007" and checkpoint.read_manifest(written)["state"]["step"] == 7
    saved = torch.load(written / checkpoint.STATE_FILE, weights_only=True)
    assert saved["trainable"].keys() == at_snapshot.keys()
    assert all(torch.equal(saved["trainable"][k], at_snapshot[k].cpu()) for k in at_snapshot)
    first = saved["optimizer"]["state"][0]
    assert all(torch.equal(first[k], optimizer_then[k].cpu()) for k in optimizer_then)
    adapter = load_file(str(written / checkpoint.ADAPTER_DIR / "adapter_model.safetensors"))
    lora_a = next(k for k in at_snapshot if "lora_A" in k)
    stored = next(v for k, v in adapter.items() if lora_a.replace(".default", "").endswith(k.split("base_model.")[-1]))
    assert torch.equal(stored, at_snapshot[lora_a].cpu())


def test_a_background_write_that_fails_raises_its_error_when_asked() -> None:
    def full() -> Path:
        raise checkpoint.CheckpointWriteError(28, "No space left on device")

    write = checkpoint.BackgroundWrite(full, "test-full")
    with pytest.raises(checkpoint.CheckpointWriteError, match="No space"):
        write.result()
    assert write.done()

