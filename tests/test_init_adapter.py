"""Continuing a real adapter (model.init_adapter) whose shape the profile leaves out: `gputwin check`, the
trainer, `gputwin status`, the arm's pane and the report all name the shape that trains, and the trainer
itself refuses an adapter that no longer has the resolved profile's shape.

A tiny random BERT (tests/tiny.py) tags PII on CPU; the adapter is saved the way the trainer saves one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gputwin.faces import cli
from gputwin.core import events
from gputwin.validate import modeling
from gputwin.core.data import load_dataset
from gputwin.core.encoding import bio_label_names
from gputwin.core.paths import ExperimentPaths
from gputwin.core.profiles import Experiment, LoraSpec, Rules, load_profile
from gputwin.train.loop import train
from tiny import make_samples, tiny_bert, write_data

pytestmark = pytest.mark.slow

TARGETS = ("query", "key", "value")  # the adapter's; the fresh arm adapts query and value only

CONTINUED = """\
name = "continued"
device = "cpu"

[model]
base = "{base}"
init_adapter = "{adapter}"
dtype = "fp32"

[lora]
dropout = 0.0                  # no weights of its own: the profile's value trains

[train]
learning_rate = 5e-3
batch_size = 4
epochs = 1
checkpoint_every = 3
engine = "plain"
threads = 1

[data]
train = "{data}/train.jsonl"
test = "{data}/test.jsonl"

[milestone]
step = 3
sample_size = 4
"""

FRESH = CONTINUED.replace('name = "continued"', 'name = "fresh"').replace('init_adapter = "{adapter}"\n', "").replace(
    "dropout = 0.0                  # no weights of its own: the profile's value trains",
    'r = 4\nalpha = 8\ntarget_modules = ["query", "value"]').replace("[model]", '[model]\ntask = "tag"')


class Folder:
    """Data, a tiny BERT and an r 6 / alpha 12 adapter trained on it (saved as the trainer saves one)."""

    def __init__(self, root: Path) -> None:
        import torch

        self.root = root
        self.data = root / "data"
        write_data(self.data)
        self.base = tiny_bert(root / "bert", make_samples(24))
        labels = bio_label_names(load_dataset(self.data / "train.jsonl").entity_types)
        torch.manual_seed(0)
        model = modeling.attach_lora(
            modeling.load_base(str(self.base), task="tag", dtype="fp32", device="cpu", label_names=labels),
            LoraSpec(r=6, alpha=12, dropout=0.05, target_modules=TARGETS), "tag")
        self.adapter = modeling.save_adapter(model, root / "adapter", {
            "task": "tag", "base": str(self.base), "label_names": labels, "max_length": 512, "arm": "earlier"})
        self.trainable = modeling.count_trainable(model)
        fields = {"base": self.base, "adapter": self.adapter, "data": self.data}
        self.continued = root / "continued.toml"
        self.continued.write_text(CONTINUED.format(**fields))
        self.fresh = root / "fresh.toml"
        self.fresh.write_text(FRESH.format(**fields))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Folder:
    return Folder(tmp_path_factory.mktemp("init-adapter"))


def test_check_shows_the_adapters_shape_and_the_parameters_it_trains(folder: Folder,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", str(folder.continued), str(folder.fresh), "--json"]) == 0
    arms = {a["profile"]["name"]: a for a in json.loads(capsys.readouterr().out)["arms"]}
    lora = arms["continued"]["profile"]["lora"]
    assert (lora["r"], lora["alpha"], lora["dropout"], sorted(lora["target_modules"])) == (6, 12, 0.0, sorted(TARGETS))
    assert arms["continued"]["profile"]["model"]["task"] == "tag"
    assert arms["continued"]["from_adapter"] == ["model.task", "lora.r", "lora.alpha", "lora.target_modules"]
    assert arms["continued"]["plan"]["trainable_params"] == folder.trainable
    assert cli.main(["check", str(folder.continued), str(folder.fresh)]) == 0
    out = capsys.readouterr().out
    assert "≠ lora.r" in out and f"{folder.trainable:,}" in out
    assert "continued: model.task, lora.r, lora.alpha, lora.target_modules taken from the init adapter" in " ".join(
        out.split())


def test_the_arm_trains_the_shape_status_the_pane_and_the_report_show(folder: Folder, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    continued, fresh = load_profile(folder.continued), load_profile(folder.fresh)
    exp = ExperimentPaths(tmp_path / "continue-demo")
    exp.root.mkdir()  # as `gputwin run` leaves it for the trainers: the resolved profiles
    exp.experiment_json.write_text(json.dumps(Experiment(exp.name, (continued, fresh),
                                                         Rules(baseline="continued")).to_dict()))
    for profile in (continued, fresh):
        exp.arm(profile.name).root.mkdir()
        exp.arm(profile.name).profile_json.write_text(json.dumps(profile.to_dict()))

    arm = exp.arm("continued")
    assert train(arm.root) == 0
    log = events.read_events(arm.events).events
    started, finished = log[0], log[-1]
    assert started["trainable_params"] == folder.trainable  # what `gputwin check` planned with
    assert started["config"]["lora"]["r"] == 6 and started["config"]["lora"]["alpha"] == 12
    saved = json.loads((Path(finished["adapter"]) / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"]) == (6, 12, 0.0)
    assert sorted(saved["target_modules"]) == sorted(TARGETS)

    assert cli.main(["status", str(exp.root), "--json"]) == 0
    shown = {a["name"]: a["hparams"] for a in json.loads(capsys.readouterr().out)["arms"]}
    assert (shown["continued"]["r"], shown["continued"]["alpha"]) == ("6", "12")
    assert (shown["fresh"]["r"], shown["fresh"]["alpha"]) == ("4", "8")
    assert cli.main(["status", str(exp.root)]) == 0
    assert "  lr 5.0e-03  r 6  alpha 12  batch 4  epochs 1" in capsys.readouterr().out

    from gputwin.reading.watcher import ExperimentWatcher
    from gputwin.faces.widgets.arm_pane import hparams_text

    watcher = ExperimentWatcher(exp)
    watcher.poll()
    pane = hparams_text(watcher.state.arms["continued"], watcher.state.differing_keys).plain
    assert pane.startswith("lr 5.0e-03  r 6  alpha 12")

    assert cli.main(["report", str(exp.root)]) == 0
    report = (exp.root / "comparison.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]]
            for line in report.splitlines() if line.startswith("| lora.")}
    assert rows["lora.r"] == ["6", "4"] and rows["lora.alpha"] == ["12", "8"]


def test_the_trainer_refuses_an_adapter_that_is_not_the_resolved_profiles_shape(folder: Folder) -> None:
    import torch

    labels = json.loads((folder.adapter / "gputwin.json").read_text())["label_names"]
    base = modeling.load_base(str(folder.base), task="tag", dtype="fp32", device="cpu", label_names=labels)
    with pytest.raises(modeling.ModelLoadError) as info:
        modeling.attach_lora(base, LoraSpec(r=8, alpha=16, target_modules=TARGETS), "tag", str(folder.adapter))
    assert "has r 6, alpha 12" in info.value.message and "profile says r 8, alpha 16" in info.value.message
    model = modeling.attach_lora(base, LoraSpec(r=6, alpha=12, dropout=0.0, target_modules=("value", "key", "query")),
                                 "tag", str(folder.adapter))
    assert modeling.count_trainable(model) == folder.trainable
    dropouts = [m for name, m in model.named_modules() if name.endswith("lora_dropout.default")]
    assert dropouts and all(isinstance(m, torch.nn.Identity) for m in dropouts)  # the adapter's 0.05 is not used


def test_validate_takes_a_copy_of_the_base_and_refuses_another_model(folder: Folder, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    copy = shutil.copytree(folder.base, tmp_path / "bert-copy")
    test = str(folder.data / "test.jsonl")
    assert cli.main(["validate", "--model", str(folder.adapter), "--base", str(copy), "--test-data", test,
                     "--sample-size", "4", "--device", "cpu"]) == 0
    assert "overall" in capsys.readouterr().out
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3}))
    assert cli.main(["validate", "--model", str(folder.adapter), "--base", str(copy), "--test-data", test]) == 2
    assert "num_hidden_layers 3 against 2" in capsys.readouterr().err
