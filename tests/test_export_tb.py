"""`gputwin export --tensorboard`: the runs are read back with TensorBoard's own reader (EventAccumulator)
and compared with the event logs and validation files they came from."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from gputwin.core import events as ev
from gputwin.faces.cli import main
from gputwin.core.errors import UserError
from gputwin.faces.export_tb import export_tensorboard, run_scalars
from gputwin.core.paths import ExperimentPaths

FIXTURE = Path(__file__).parent / "fixtures" / "events" / "seed-verdict"
ARMS = ("conservative", "aggressive")
FIELDS = ("loss", "lr", "grad_norm", "tokens_per_s")


@pytest.fixture
def logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "logs"
    shutil.copytree(FIXTURE, root / "pii-seed")
    monkeypatch.setenv("GPUTWIN_LOGS", str(root))
    return root


def read_run(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every point
    accumulator.Reload()
    return accumulator


def test_every_arm_becomes_a_run_with_its_steps_and_validations(logs: Path, tmp_path: Path, capsys):
    out = tmp_path / "runs"
    assert main(["export", "--tensorboard", str(out), "pii-seed"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'pii-seed' / 'conservative'}: 1065 steps, 1 validation" in printed
    assert f"view: tensorboard --logdir {out}" in printed

    for arm in ARMS:
        run = read_run(out / "pii-seed" / arm)
        events = ev.read_events(FIXTURE / arm / "events.jsonl").events
        steps = [e for e in events if e.kind == "step"]
        for name in FIELDS:
            points = run.Scalars(f"train/{name}")
            assert [p.step for p in points] == [e["step"] for e in steps]
            assert [p.wall_time for p in points] == pytest.approx([e.t for e in steps])
            assert [p.value for p in points] == pytest.approx([e[name] for e in steps], rel=1e-6)  # float32

        (validation_event,) = [e for e in events if e.kind == "validation"]
        for metric in ("precision", "recall", "f1"):
            (point,) = run.Scalars(f"validation/{metric}")
            assert (point.step, point.wall_time) == (879, pytest.approx(validation_event.t))
            assert point.value == pytest.approx(validation_event[metric], rel=1e-6)
        # The log's validation events carry no per-type scores: they come from the validation file.
        per_type = json.loads((FIXTURE / arm / "validation" / "step-000879.json").read_text())["per_type"]
        for etype, scores in per_type.items():
            for metric in ("precision", "recall", "f1"):
                (point,) = run.Scalars(f"validation_by_type/{etype}/{metric}")
                assert point.step == 879 and point.value == pytest.approx(scores[metric], rel=1e-6)
        tags = set(run.Tags()["scalars"])
        assert len(tags) == len(FIELDS) + 3 + 3 * len(per_type)

        # The resolved profile as hyperparameters, for TensorBoard's HPARAMS tab.
        content = run.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        hparams = hparams_metadata.parse_session_start_info_plugin_data(content).hparams
        profile = json.loads((FIXTURE / arm / "profile.json").read_text())
        assert hparams["lora.r"].number_value == profile["lora"]["r"]
        assert hparams["train.learning_rate"].number_value == pytest.approx(profile["train"]["learning_rate"])
        assert hparams["model.base"].string_value == profile["model"]["base"]
        assert hparams["lora.target_modules"].string_value == ", ".join(profile["lora"]["target_modules"])


def test_exporting_again_replaces_the_runs(logs: Path, tmp_path: Path):
    out = tmp_path / "runs"
    exp = ExperimentPaths(logs / "pii-seed")
    export_tensorboard(exp, out)
    other = out / "pii-seed" / "aggressive" / "events.out.tfevents.1.other-tool"
    other.write_bytes(b"")  # not ours: left alone
    export_tensorboard(exp, out)
    files = sorted(p.name for p in (out / "pii-seed" / "aggressive").iterdir())
    assert len(files) == 2 and other.name in files
    assert len(read_run(out / "pii-seed" / "aggressive").Scalars("train/loss")) == 879


def test_an_arm_without_events_is_skipped_and_said_so(logs: Path, tmp_path: Path, capsys):
    (logs / "pii-seed" / "aggressive" / "events.jsonl").write_text("")
    assert main(["export", "--tensorboard", str(tmp_path / "runs")]) == 0  # the latest experiment
    assert "aggressive: no events yet; not exported" in capsys.readouterr().out
    assert not (tmp_path / "runs" / "pii-seed" / "aggressive").exists()
    assert (tmp_path / "runs" / "pii-seed" / "conservative").is_dir()


def test_bad_destinations_and_names_are_user_errors(logs: Path, tmp_path: Path, capsys):
    a_file = tmp_path / "runs.txt"
    a_file.write_text("")
    assert main(["export", "--tensorboard", str(a_file), "pii-seed"]) == 2
    assert f"{a_file}: exists and is not a folder" in capsys.readouterr().err
    assert main(["export", "--tensorboard", str(tmp_path / "runs"), "nope"]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err


def test_without_tensorboardx_the_error_says_what_to_install(logs: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if it were not installed
    with pytest.raises(UserError) as err:
        export_tensorboard(ExperimentPaths(logs / "pii-seed"), tmp_path / "runs")
    assert "tensorboardX" in str(err.value) and "gputwin[tensorboard]" in str(err.value)


def _event(kind: str, t: float, **fields) -> ev.Event:
    return ev.parse(ev.dumps(ev.make(kind, t=t, **fields)))


def _step(step: int, loss: float, t: float) -> ev.Event:
    return _event("step", t, step=step, epoch=step / 10, loss=loss, lr=1e-4)


def test_steps_trained_again_after_a_restart_are_written_once():
    started = dict(arm="a", pid=1, device="cpu", samples=40, steps_per_epoch=10, total_steps=10, milestone_step=5)
    events = [
        _event("started", 0.0, **started, step=0),
        *(_step(s, 1.0 / s, float(s)) for s in range(1, 6)),
        _event("validation", 5.5, step=5, precision=0.5, recall=0.4, f1=0.44),
        _step(6, float("nan"), 6.0),
        _event("started", 10.0, **started, step=4),  # crashed after step 6, resumed from the step-4 checkpoint
        *(_step(s, 2.0 / s, 10.0 + s) for s in range(5, 8)),
        _event("validation", 15.5, step=5, precision=0.6, recall=0.5, f1=0.55),
        _event("resumed", 20.0, step=6, checkpoint="checkpoints/step-000006"),  # once more, from step 6
        _step(7, 0.25, 21.0),
    ]
    scalars = run_scalars(events)
    loss = scalars.series("loss")
    assert [s for s, _, _ in loss] == [1, 2, 3, 4, 5, 6, 7]
    assert [v for _, v, _ in loss] == [1.0, 0.5, 1.0 / 3, 0.25, 0.4, 2.0 / 6, 0.25]
    assert [t for _, _, t in loss] == [1.0, 2.0, 3.0, 4.0, 15.0, 16.0, 21.0]
    assert scalars.validations[5].scores == {"precision": 0.6, "recall": 0.5, "f1": 0.55}
    assert scalars.series("grad_norm") == []  # not logged: no series


def test_a_diverged_loss_is_exported_as_nan():
    scalars = run_scalars([_step(1, float("nan"), 1.0), _step(2, 0.5, 2.0)])
    loss = scalars.series("loss")
    assert math.isnan(loss[0][1]) and loss[1][1] == 0.5
