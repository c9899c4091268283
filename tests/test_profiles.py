"""Profile and experiment loading: every rule rejects bad input with file, key, line and a hint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gputwin.core.profiles import (
    Experiment,
    Profile,
    ProfileError,
    differing_keys,
    load_any,
    load_experiment,
    load_profile,
)

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
name = "arm-a"
device = 0

[model]
base = "Qwen/Qwen3-0.6B"
task = "generate"

[lora]
r = 8
alpha = 16
target_modules = ["q_proj", "v_proj"]

[train]
learning_rate = 1e-4
batch_size = 4
epochs = 2

[data]
train = "train.jsonl"
test = "test.jsonl"

[milestone]
step = 10
sample_size = 50
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "train.jsonl").write_text('{"text": "hi", "entities": []}\n')
    (tmp_path / "test.jsonl").write_text('{"text": "hi", "entities": []}\n')
    return tmp_path


def write(folder: Path, text: str, name: str = "arm.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_good_profile_resolves_paths_against_its_folder(folder: Path) -> None:
    profile = load_profile(write(folder, GOOD))
    assert profile.name == "arm-a"
    assert profile.device == 0
    assert profile.data.train == str(folder / "train.jsonl")
    assert profile.lora.target_modules == ("q_proj", "v_proj")
    assert profile.train.epochs == 2.0
    assert Profile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile


# (description, replacement of a line of GOOD or extra text, expected key, expected words in the message)
BAD = [
    ("unknown top key", ("name = \"arm-a\"", "name = \"arm-a\"\ncolour = 1"), "colour", "unknown key"),
    ("unknown table key", ("r = 8", "r = 8\nrank = 3"), "lora.rank", "unknown key"),
    ("typo gets a suggestion", ("batch_size = 4", "batch_sise = 4"), "train.batch_sise", "did you mean"),
    ("lr zero", ("learning_rate = 1e-4", "learning_rate = 0.0"), "train.learning_rate", "> 0"),
    ("lr negative", ("learning_rate = 1e-4", "learning_rate = -1e-4"), "train.learning_rate", "> 0"),
    ("lr huge", ("learning_rate = 1e-4", "learning_rate = 5.0"), "train.learning_rate", "too large"),
    ("lr as string", ("learning_rate = 1e-4", "learning_rate = \"fast\""), "train.learning_rate", "expected a number"),
    ("r zero", ("r = 8", "r = 0"), "lora.r", ">= 1"),
    ("r float", ("r = 8", "r = 8.5"), "lora.r", "expected an integer"),
    ("batch zero", ("batch_size = 4", "batch_size = 0"), "train.batch_size", ">= 1"),
    ("epochs zero", ("epochs = 2", "epochs = 0"), "train.epochs", "> 0"),
    ("epochs bool", ("epochs = 2", "epochs = true"), "train.epochs", "expected a number"),
    ("bad task", ("task = \"generate\"", "task = \"classify\""), "model.task", "one of generate, tag"),
    ("bad compile", ("epochs = 2", "epochs = 2\ncompile = \"yes\""), "train.compile", "one of auto, on, off"),
    ("bad scheduler", ("epochs = 2", "epochs = 2\nscheduler = \"step\""), "train.scheduler", "linear, cosine, constant"),
    ("dropout one", ("r = 8", "r = 8\ndropout = 1.0"), "lora.dropout", "[0, 1)"),
    ("empty targets", ("target_modules = [\"q_proj\", \"v_proj\"]", "target_modules = []"), "lora.target_modules", "non-empty"),
    ("bad device", ("device = 0", "device = \"gpu0\""), "device", "GPU index"),
    ("negative device", ("device = 0", "device = -1"), "device", ">= 0"),
    ("bad name", ("name = \"arm-a\"", "name = \"../evil\""), "name", "cannot be an arm name"),
    ("missing base", ("base = \"Qwen/Qwen3-0.6B\"", ""), "model.base", "is required"),
    ("missing train data", ("train = \"train.jsonl\"", "train = \"nope.jsonl\""), "data.train", "does not exist"),
    ("missing test data", ("test = \"test.jsonl\"", "test = \"nope.jsonl\""), "data.test", "does not exist"),
    ("missing local model", ("base = \"Qwen/Qwen3-0.6B\"", "base = \"./no-model-here\""), "model.base", "does not exist"),
    ("missing init adapter", ("task = \"generate\"", "task = \"generate\"\ninit_adapter = \"adapters/x\""), "model.init_adapter", "does not exist"),
    ("milestone step and epoch", ("step = 10", "step = 10\nepoch = 1"), "milestone.epoch", "not both"),
    ("milestone zero", ("step = 10", "step = 0"), "milestone.step", ">= 1"),
    ("sample size zero", ("sample_size = 50", "sample_size = 0"), "milestone.sample_size", ">= 1"),
    ("checkpoint every zero", ("epochs = 2", "epochs = 2\ncheckpoint_every = 0"), "train.checkpoint_every", ">= 1"),
    ("max length tiny", ("epochs = 2", "epochs = 2\nmax_length = 2"), "train.max_length", ">= 8"),
    ("table not a table", ("[milestone]\nstep = 10\nsample_size = 50\n", ""), "milestone", "must be a table"),
    ("bad locales", ("test = \"test.jsonl\"", "test = \"test.jsonl\"\nsynth_locales = [\"english\"]"), "data.synth_locales", "Faker locales"),
]


@pytest.mark.parametrize("old_new,key,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_profile_names_file_key_and_hint(folder: Path, old_new: tuple[str, str], key: str, words: str) -> None:
    old, new = old_new
    assert old in GOOD
    text = GOOD.replace(old, new)
    if key == "milestone":  # a scalar where a table belongs
        text = text.replace("device = 0\n", "device = 0\nmilestone = 3\n")
    path = write(folder, text)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    err = info.value
    assert err.key == key
    assert words in str(err)
    assert str(path) in str(err)


@pytest.mark.parametrize("value,mode", [('"off"', "off"), ("true", "on"), ("false", "off"), ('"on"', "on")])
def test_train_compile_reads_modes_and_booleans(folder: Path, value: str, mode: str) -> None:
    assert load_profile(write(folder, GOOD)).train.compile == "auto"
    profile = load_profile(write(folder, GOOD.replace("epochs = 2", f"epochs = 2\ncompile = {value}")))
    assert profile.train.compile == mode
    assert Profile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile


def test_error_carries_line_of_the_key(folder: Path) -> None:
    path = write(folder, GOOD.replace("batch_size = 4", "batch_size = 0"))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert info.value.line == GOOD.splitlines().index("batch_size = 4") + 1
    assert f"{path}:{info.value.line}" in str(info.value)


def test_malformed_toml_gives_line(folder: Path) -> None:
    path = write(folder, GOOD.replace("r = 8", "r = = 8"))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert "not valid TOML" in str(info.value)
    assert info.value.line == GOOD.splitlines().index("r = 8") + 1
    assert "hint:" in str(info.value)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="file not found"):
        load_profile(tmp_path / "nope.toml")
    with pytest.raises(ProfileError, match="is a folder"):
        load_profile(tmp_path)


def test_seed_profiles_reproduce_the_seed() -> None:
    exp = load_experiment(REPO / "profiles" / "seed.toml", check_files=False)
    cons, aggr = exp.arms
    assert (cons.device, cons.train.learning_rate, cons.lora.r, cons.lora.alpha, cons.train.batch_size, cons.train.epochs) == (
        0, 1e-4, 8, 16, 4, 2.0)
    assert (aggr.device, aggr.train.learning_rate, aggr.lora.r, aggr.lora.alpha, aggr.train.batch_size, aggr.train.epochs) == (
        1, 1.5e-4, 12, 24, 4, 1.0)
    for arm in exp.arms:
        assert arm.model.base == "Qwen/Qwen3-0.6B" and arm.model.task == "generate"
        assert arm.milestone.step == 879 and arm.milestone.sample_size == 500
        assert arm.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert exp.rules.baseline == "conservative"
    assert (exp.rules.target_f1, exp.rules.target_recall, exp.rules.close_margin) == (0.85, 0.80, 0.03)
    assert (exp.rules.goal_precision, exp.rules.goal_recall, exp.rules.goal_f1) == (0.85, 0.90, 0.875)
    assert set(differing_keys(list(exp.arms))) == {"device", "lora.r", "lora.alpha", "train.learning_rate", "train.epochs"}
    assert Experiment.from_dict(json.loads(json.dumps(exp.to_dict()))) == exp


def test_demo_experiment_uses_the_packaged_model() -> None:
    exp = load_experiment(REPO / "profiles" / "demo.toml")
    for arm in exp.arms:
        assert (Path(arm.model.base) / "config.json").is_file()
        assert arm.model.task == "tag" and arm.device is None


def test_two_arms_one_output_dir_rejected(folder: Path) -> None:
    shared = "epochs = 2\noutput_dir = \"out\""
    a = write(folder, GOOD.replace("epochs = 2", shared), "a.toml")
    b = write(folder, GOOD.replace("epochs = 2", shared).replace("arm-a", "arm-b"), "b.toml")
    with pytest.raises(ProfileError, match="both write to"):
        load_any([a, b])


def test_two_arms_same_name_rejected(folder: Path) -> None:
    a = write(folder, GOOD, "a.toml")
    b = write(folder, GOOD, "b.toml")
    with pytest.raises(ProfileError, match="two arms are called"):
        load_any([a, b])


def test_experiment_rules_validated(folder: Path) -> None:
    write(folder, GOOD, "a.toml")
    write(folder, GOOD.replace("arm-a", "arm-b"), "b.toml")
    base = 'arms = ["a.toml", "b.toml"]\n'
    exp = load_experiment(write(folder, base, "exp.toml"))
    assert exp.rules.baseline == "arm-a" and exp.name == "exp"
    cases = [
        ('baseline = "zzz"\n', "baseline"),
        ("[rules]\ntarget_f1 = 85\n", "rules.target_f1"),
        ('[rules]\non_verdict = "maybe"\n', "rules.on_verdict"),
        ("[rules]\nbootstrap_resamples = 10\n", "rules.bootstrap_resamples"),
        ("[rules]\nextend_epochs = 0\n", "rules.extend_epochs"),
        ("[rules]\nvibes = 1\n", "rules.vibes"),
    ]
    for extra, key in cases:
        with pytest.raises(ProfileError) as info:
            load_experiment(write(folder, base + extra, "exp.toml"))
        assert info.value.key == key, extra
    with pytest.raises(ProfileError, match="at least two"):
        load_experiment(write(folder, 'arms = ["a.toml"]\n', "exp.toml"))
    with pytest.raises(ProfileError, match="arm profile, not an experiment"):
        load_experiment(folder / "a.toml")


def test_placement_cotrain_is_read_defaults_to_auto_and_refuses_other_values(folder: Path) -> None:
    write(folder, GOOD, "a.toml")
    write(folder, GOOD.replace("arm-a", "arm-b"), "b.toml")
    base = 'arms = ["a.toml", "b.toml"]\n'
    assert load_experiment(write(folder, base, "exp.toml")).placement.cotrain == "auto"
    exp = load_experiment(write(folder, base + '[placement]\ncotrain = "on"\n', "exp.toml"))
    assert exp.placement.cotrain == "on" and Experiment.from_dict(json.loads(json.dumps(exp.to_dict()))) == exp
    for extra, key in (('[placement]\ncotrain = "yes"\n', "placement.cotrain"),
                       ("[placement]\ncotrain = true\n", "placement.cotrain"),
                       ("[placement]\ncotrian = \"on\"\n", "placement.cotrian")):
        with pytest.raises(ProfileError) as info:
            load_experiment(write(folder, base + extra, "exp.toml"))
        assert info.value.key == key and info.value.line == 3, extra
    ray = '[placement]\nbackend = "ray"\naddress = "auto"\n'
    assert load_experiment(write(folder, base + ray, "exp.toml")).placement.cotrain == "auto"  # ignored there
    with pytest.raises(ProfileError, match="not on a Ray cluster") as info:
        load_experiment(write(folder, base + ray + 'cotrain = "on"\n', "exp.toml"))
    assert info.value.key == "placement.cotrain"


def test_experiment_from_profiles_first_is_baseline(folder: Path) -> None:
    a = write(folder, GOOD, "a.toml")
    b = write(folder, GOOD.replace("arm-a", "arm-b").replace("r = 8", "r = 12"), "b.toml")
    exp = load_any([a, b])
    assert exp.arm_names == ["arm-a", "arm-b"]
    assert exp.rules.baseline == "arm-a"
    assert differing_keys(list(exp.arms)) == ["lora.r"]


# ---------------------------------------------------------------- model.init_adapter

ADAPTER_CONFIG = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 12, "lora_alpha": 24, "lora_dropout": 0.1,
                  "target_modules": ["v_proj", "q_proj"], "base_model_name_or_path": "Qwen/Qwen3-0.6B"}


def continuing(folder: Path, text: str = GOOD, **config: object) -> Path:
    """GOOD with model.init_adapter pointing at an adapter saved with ADAPTER_CONFIG (plus `config`)."""
    (folder / "adapter").mkdir(exist_ok=True)
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG | config))
    return write(folder, text.replace('task = "generate"', 'task = "generate"\ninit_adapter = "adapter"'))


def test_lora_keys_left_out_are_the_adapters_and_are_listed_as_such(folder: Path) -> None:
    without_lora = GOOD.replace('r = 8\nalpha = 16\ntarget_modules = ["q_proj", "v_proj"]\n', "")
    profile = load_profile(continuing(folder, without_lora))
    assert profile.model.init_adapter == str(folder / "adapter")
    assert (profile.lora.r, profile.lora.alpha, profile.lora.dropout) == (12, 24, 0.1)
    assert profile.lora.target_modules == ("v_proj", "q_proj")
    assert profile.from_adapter == ("lora.r", "lora.alpha", "lora.dropout", "lora.target_modules")
    assert "from_adapter" not in profile.to_dict()  # the resolved values are what profile.json keeps
    assert Profile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile


def test_a_task_left_out_is_the_adapters_too(folder: Path) -> None:
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG | {"task_type": "TOKEN_CLS"}))
    text = GOOD.replace('task = "generate"', 'init_adapter = "adapter"').replace("r = 8\nalpha = 16\n", "r = 12\n")
    profile = load_profile(write(folder, text))  # targets in another order than the adapter's agree
    assert profile.model.task == "tag" and profile.lora.alpha == 24
    assert profile.from_adapter == ("model.task", "lora.alpha", "lora.dropout")


def test_keys_that_agree_with_the_adapter_are_the_profiles_and_dropout_never_disagrees(folder: Path) -> None:
    text = GOOD.replace("r = 8\nalpha = 16", "r = 12\nalpha = 24\ndropout = 0.0")
    profile = load_profile(continuing(folder, text))
    assert (profile.lora.r, profile.lora.alpha, profile.lora.dropout) == (12, 24, 0.0)
    assert profile.lora.target_modules == ("q_proj", "v_proj") and profile.from_adapter == ()


def test_a_shape_the_adapter_was_not_trained_with_is_refused_at_its_line(folder: Path) -> None:
    path = continuing(folder)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    err = info.value
    assert (err.key, err.line) == ("lora.r", GOOD.splitlines().index("r = 8") + 2)  # init_adapter added a line
    assert str(err).startswith(f"{path}:{err.line}: lora.r: 8, but the init adapter was trained with r = 12 "
                               f"({folder / 'adapter' / 'adapter_config.json'}); lora.alpha differs too")
    assert "set r = 12, alpha = 24 in [lora]" in err.hint and "leave r/alpha out" in err.hint


def test_a_task_or_base_model_the_adapter_was_not_trained_on_is_refused(folder: Path) -> None:
    same_shape = GOOD.replace("r = 8\nalpha = 16", "r = 12\nalpha = 24")
    with pytest.raises(ProfileError) as info:
        load_profile(continuing(folder, same_shape, task_type="TOKEN_CLS"))
    assert info.value.key == "model.task" and 'trained with task = "tag"' in str(info.value)
    with pytest.raises(ProfileError) as info:
        load_profile(continuing(folder, same_shape, base_model_name_or_path="Qwen/Qwen3-1.7B"))
    assert info.value.key == "model.base" and info.value.line == 5
    assert "Qwen/Qwen3-0.6B is not the model the init adapter was trained on, Qwen/Qwen3-1.7B" in str(info.value)
    assert 'set base = "Qwen/Qwen3-1.7B"' in info.value.hint


def test_an_init_adapter_folder_without_an_adapter_is_refused(folder: Path) -> None:
    (folder / "adapter").mkdir()
    path = write(folder, GOOD.replace('task = "generate"', 'task = "generate"\ninit_adapter = "adapter"'))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert info.value.key == "model.init_adapter" and "holds no adapter_config.json" in str(info.value)
    assert load_profile(path, check_files=False).lora.r == 8  # read away from its files: passed over
