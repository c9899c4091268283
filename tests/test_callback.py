"""GputwinCallback in a real (tiny) transformers Trainer run on CPU: the arm folder, the events,
stop/extend/validate-now requests, and what gputwin's own readers make of it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gputwin.control import requests as control, launcher
from gputwin.core import events as ev
from gputwin.core.errors import UserError
from gputwin.core.paths import ExperimentPaths
from gputwin.core.profiles import Experiment, Profile
from gputwin.reading.watcher import ExperimentWatcher

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from gputwin.callback import GputwinCallback  # noqa: E402

SAMPLES = 16
BATCH = 4


def tiny_model() -> Any:
    """A one-layer random Qwen3 with a LoRA adapter: nothing downloaded."""
    config = transformers.Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config)
    adapter = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                              task_type="CAUSAL_LM")
    return peft.get_peft_model(model, adapter)


def dataset() -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(SAMPLES):
        ids = torch.randint(0, 64, (8,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


class Probe(transformers.TrainerCallback):
    """Runs after the gputwin callback at each step: records what the launcher sees, or drops a request."""

    def __init__(self, exp: ExperimentPaths, arm: str, request_at: int | None = None, action: str = "",
                 epochs: int = 0) -> None:
        self.exp, self.arm, self.request_at, self.action, self.epochs = exp, arm, request_at, action, epochs
        self.statuses: list[str] = []

    def on_step_end(self, args: Any, state: Any, control_: Any, **kwargs: Any) -> None:
        self.statuses.append(launcher.arm_status(self.exp.arm(self.arm)))
        if state.global_step == self.request_at:
            control.write_request(self.exp.arm(self.arm).control, self.action, epochs=self.epochs, by="cli")


def train(tmp_path: Path, callback: Any, probe: Probe, epochs: int = 2, logging_steps: int = 1) -> Any:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH, num_train_epochs=epochs,
        logging_steps=logging_steps, save_strategy="steps", save_steps=4, report_to="none", use_cpu=True,
        disable_tqdm=True, learning_rate=1e-3, seed=3,
    )
    trainer = transformers.Trainer(model=tiny_model(), args=args, train_dataset=dataset(),
                                   callbacks=[callback, probe])
    trainer.train()
    return trainer


def kinds(exp: ExperimentPaths, arm: str) -> list[ev.Event]:
    result = ev.read_events(exp.arm(arm).events)
    assert result.bad_lines == []
    return result.events


@pytest.mark.slow
def test_a_trainer_run_writes_a_gputwin_arm(tmp_path: Path) -> None:
    exp = ExperimentPaths(tmp_path / "logs" / "hf")
    callback = GputwinCallback(exp.root, "mine", milestone_step=4)
    assert exp.arm("mine").root.is_dir()
    probe = Probe(exp, "mine")
    train(tmp_path, callback, probe)
    callback.log_validation({"eval_precision": 0.5, "eval_recall": 0.25, "eval_f1": 1 / 3, "sample_size": 8})

    log = kinds(exp, "mine")
    started = log[0]
    assert started.kind == ev.STARTED
    assert (started["total_steps"], started["steps_per_epoch"], started["samples"]) == (8, 4, SAMPLES)
    assert started["milestone_step"] == 4 and started["device"] == "cpu"
    steps = [e for e in log if e.kind == ev.STEP and e["loss"] is not None]
    assert [e["step"] for e in steps] == list(range(1, 9))
    assert all(e["lr"] > 0 and e["grad_norm"] is not None for e in steps)
    assert [e["step"] for e in log if e.kind == ev.CHECKPOINT] == [4, 8]
    assert Path(next(e for e in log if e.kind == ev.CHECKPOINT)["path"]).is_dir()
    assert [e["step"] for e in log if e.kind == ev.MILESTONE] == [4]
    finished = [e for e in log if e.kind == ev.FINISHED]
    assert [e["step"] for e in finished] == [8]
    validation = log[-1]
    assert validation.kind == ev.VALIDATION and validation["step"] == 8 and validation["sample_size"] == 8
    assert (validation["precision"], validation["recall"]) == (0.5, 0.25)

    # the launcher saw it running while it trained, and finished afterwards
    assert set(probe.statuses) == {launcher.RUNNING}
    assert launcher.arm_status(exp.arm("mine")) == launcher.FINISHED
    # experiment.json and profile.json are readable by gputwin's own readers
    experiment = Experiment.from_dict(json.loads(exp.experiment_json.read_text()))
    assert experiment.arm_names == ["mine"] and experiment.rules.baseline == "mine"
    profile = Profile.from_dict(json.loads(exp.arm("mine").profile_json.read_text()))
    assert (profile.lora.r, profile.lora.alpha, profile.lora.target_modules) == (2, 4, ("q_proj", "v_proj"))
    assert profile.train.learning_rate == 1e-3 and profile.train.batch_size == BATCH
    watcher = ExperimentWatcher(exp)
    watcher.poll()
    arm = watcher.state.arms["mine"]
    assert (arm.status, arm.step, arm.total_steps) == ("finished", 8, 8)
    assert arm.last_validation is not None and arm.last_validation.f1 == pytest.approx(1 / 3)


@pytest.mark.slow
def test_stop_ends_training_with_a_checkpoint_and_extend_is_refused_politely(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    exp = ExperimentPaths(tmp_path / "logs" / "hf")
    extend_probe = Probe(exp, "a", request_at=1, action=control.EXTEND, epochs=1)
    train(tmp_path / "a", GputwinCallback(exp.root, "a"), extend_probe, epochs=1)
    assert "extending needs gputwin's own trainer" in capfd.readouterr().err
    assert control.pending(exp.arm("a").control) == []  # consumed
    assert [e.kind for e in kinds(exp, "a")][-1] == ev.FINISHED

    stop_probe = Probe(exp, "b", request_at=2, action=control.STOP)
    trainer = train(tmp_path / "b", GputwinCallback(exp.root, "b"), stop_probe)
    assert trainer.state.global_step == 3  # the request is seen at the end of the next step
    log = kinds(exp, "b")
    assert (log[-1].kind, log[-1]["step"], log[-1]["by"]) == (ev.STOPPED, 3, "cli")
    assert [e["step"] for e in log if e.kind == ev.CHECKPOINT] == [3]  # a checkpoint to resume from
    assert launcher.arm_status(exp.arm("b")) == launcher.STOPPED
    assert json.loads(exp.experiment_json.read_text())["arm_names"] == ["a", "b"]  # both arms registered
    with pytest.raises(UserError, match="ran in your own script"):
        launcher.resume_arm(exp, "b")


@pytest.mark.slow
def test_validate_now_flags_the_request_for_the_script(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    exp = ExperimentPaths(tmp_path / "logs" / "hf")
    callback = GputwinCallback(exp.root, "a")
    train(tmp_path, callback, Probe(exp, "a", request_at=1, action=control.VALIDATE), epochs=1, logging_steps=4)
    assert callback.validation_requested
    steps = [e for e in kinds(exp, "a") if e.kind == ev.STEP]
    assert (steps[0]["step"], steps[0]["loss"]) == (1, None)  # progress between logged losses
    assert steps[-1]["step"] == 4 and steps[-1]["loss"] is not None
    assert "call callback.log_validation" in capfd.readouterr().err
    callback.log_validation({"precision": 1.0, "recall": 1.0, "f1": 1.0})
    assert not callback.validation_requested


def test_bad_names_and_metrics_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="invalid arm name"):
        GputwinCallback(tmp_path / "exp", "../escape")
    callback = GputwinCallback(tmp_path / "exp", "a")
    with pytest.raises(ValueError, match="needs numeric recall, f1"):
        callback.log_validation({"precision": 0.5})
    with pytest.raises(ValueError, match="fraction from 0 to 1"):
        callback.log_validation({"precision": 85.0, "recall": 0.5, "f1": 0.6})
    assert not (tmp_path / "exp" / "a" / "events.jsonl").exists()


def test_importing_the_callback_module_does_not_import_transformers() -> None:
    code = "import sys, gputwin.callback; print('transformers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
