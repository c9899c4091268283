"""Bad input, table-driven: every case goes through `gputwin.faces.cli.main([...])` and must exit non-zero (2 for a
user error) with a message naming the file, key or line, what was expected and a hint, and must leave every
file as it was (the folder tree with modes, sizes and mtimes is compared before and after).

docs/reliability.md lists these cases; tests/reliability_table.py writes that table from CASES.
"""

from __future__ import annotations

import json
import os
import signal
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from gputwin.reading.eventlog import EventWriter
from gputwin.faces import cli
from gputwin.core import events
from gputwin.control import supervise
from gputwin.core.paths import ArmPaths
from gputwin.core.profiles import Experiment, Rules, load_profile
from tiny import write_data

PROFILE = """\
name = "{name}"
device = "cpu"

[model]
base = "model"
task = "tag"

[lora]
r = 4
alpha = 8
target_modules = ["query", "value"]

[train]
learning_rate = 5e-3
batch_size = 4
epochs = 1
engine = "plain"

[data]
train = "data/train.jsonl"
test = "data/test.jsonl"

[milestone]
step = 3
sample_size = 4
"""

LORA_TABLE = """[lora]
r = 4
alpha = 8
target_modules = ["query", "value"]
"""

EXPERIMENT = """\
name = "pair"
arms = ["a.toml", "b.toml"]
baseline = "a"

[rules]
target_f1 = 0.85
"""

BAD_LINES = '{"text": "no entities key"}\n[1, 2]\nnot json at all\n'

INIT_ADAPTER = ('task = "tag"', 'task = "tag"\ninit_adapter = "adapter"')  # a.toml continues adapter/
BERT_CONFIG = '{{"model_type": "bert", "hidden_size": {hidden}, "num_hidden_layers": 2, "vocab_size": 400}}'


def adapter_config(*, r: int = 4, alpha: int = 8, targets: tuple[str, ...] = ("query", "value"),
                   task: str = "TOKEN_CLS", base: str = "model") -> str:
    """adapter_config.json as peft writes it (the keys gputwin reads) for an adapter trained on {d}/base."""
    return json.dumps({"peft_type": "LORA", "task_type": task, "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
                       "target_modules": list(targets), "base_model_name_or_path": f"{{d}}/{base}"})


# an adapter trained on {d}/other, a model whose config is not that of {d}/model
OTHER_BASE = {"adapter/adapter_config.json": adapter_config(base="other"),
              "model/config.json": BERT_CONFIG.format(hidden=32), "other/config.json": BERT_CONFIG.format(hidden=64)}


@dataclass(frozen=True)
class Case:
    """One bad input: what is wrong, the command, what the message must hold."""

    id: str
    bad_input: str  # for the table: what the user got wrong
    argv: tuple[str, ...]  # "{d}" is the case's folder
    expect: tuple[str, ...]  # fragments of the message: file/key/line, what was expected
    edit: tuple[str, str] | None = None  # (old, new) in a.toml
    files: dict[str, str] = field(default_factory=dict)  # files written (or replaced) in the folder
    exit: int = 2
    hint: bool = True  # the message carries a "hint:" line (argparse's own usage errors do not)
    unreadable: str | None = None  # a file made unreadable with chmod 000


def _run(*args: str) -> tuple[str, ...]:
    return ("run", *args)


CASES: list[Case] = [
    # ---- profiles: TOML syntax
    Case("toml-unclosed-string", "malformed TOML: an unclosed string", _run("{d}/a.toml"),
         ("a.toml:14:", "not valid TOML", "quotes"), edit=('learning_rate = 5e-3', 'learning_rate = "5e-3')),
    Case("toml-bad-header", "malformed TOML: a table header without its ]", _run("{d}/a.toml"),
         ("a.toml:", "not valid TOML", "[table] headers"), edit=("[train]", "[train")),
    Case("toml-duplicate-key", "malformed TOML: a key given twice", _run("{d}/a.toml"),
         ("a.toml:", "not valid TOML"), edit=("epochs = 1", "epochs = 1\nepochs = 2")),
    # ---- profiles: unknown keys
    Case("unknown-top-key", "unknown key: `devise` for `device`", _run("{d}/a.toml"),
         ("a.toml:2: devise: unknown key", "did you mean 'device'?"), edit=('device = "cpu"', 'devise = "cpu"')),
    Case("unknown-train-key", "unknown key in [train]: `learning_rat`", _run("{d}/a.toml"),
         ("a.toml:14: train.learning_rat: unknown key", "did you mean 'learning_rate'?"),
         edit=("learning_rate =", "learning_rat =")),
    Case("unknown-table", "unknown table [optimizer]", _run("{d}/a.toml"),
         ("a.toml: optimizer: unknown key", "known keys: data, device"),
         edit=("[milestone]", "[optimizer]\nname = 1\n\n[milestone]")),
    # ---- profiles: wrong types
    Case("type-lr-string", "wrong type: learning_rate = \"fast\"", _run("{d}/a.toml"),
         ("a.toml:14: train.learning_rate: expected a number, got 'fast'",),
         edit=("learning_rate = 5e-3", 'learning_rate = "fast"')),
    Case("type-batch-float", "wrong type: batch_size = 4.5", _run("{d}/a.toml"),
         ("train.batch_size: expected an integer, got 4.5",), edit=("batch_size = 4", "batch_size = 4.5")),
    Case("type-table-as-value", "wrong type: `lora = 3` where a table belongs", _run("{d}/a.toml"),
         ("a.toml: lora: must be a table, got int", "write it as [lora]"),
         files={"a.toml": PROFILE.format(name="a").replace(LORA_TABLE, "").replace("\n\n", "\nlora = 3\n\n", 1)}),
    Case("type-targets-string", "wrong type: target_modules = \"query\"", _run("{d}/a.toml"),
         ("lora.target_modules: expected a list",),
         edit=('target_modules = ["query", "value"]', 'target_modules = "query"')),
    Case("type-trust-string", "wrong type: trust_remote_code = \"yes\"", _run("{d}/a.toml"),
         ("model.trust_remote_code: expected true/false, got 'yes'",),
         edit=('task = "tag"', 'task = "tag"\ntrust_remote_code = "yes"')),
    # ---- profiles: impossible values
    Case("lr-zero", "impossible value: learning_rate = 0", _run("{d}/a.toml"),
         ("a.toml:14: train.learning_rate: must be > 0", "1e-5 to 1e-3"),
         edit=("learning_rate = 5e-3", "learning_rate = 0.0")),
    Case("lr-huge", "impossible value: learning_rate = 5", _run("{d}/a.toml"),
         ("train.learning_rate: 5.0 is far too large",), edit=("learning_rate = 5e-3", "learning_rate = 5")),
    Case("batch-zero", "impossible value: batch_size = 0", _run("{d}/a.toml"),
         ("a.toml:15: train.batch_size: must be >= 1, got 0",), edit=("batch_size = 4", "batch_size = 0")),
    Case("epochs-negative", "impossible value: epochs = -1", _run("{d}/a.toml"),
         ("train.epochs: must be > 0, got -1.0", "e.g. 1 or 2"), edit=("epochs = 1", "epochs = -1")),
    Case("lora-r-zero", "impossible value: lora.r = 0", _run("{d}/a.toml"),
         ("a.toml:9: lora.r: must be >= 1, got 0", "ranks are 4 to 64"), edit=("r = 4", "r = 0")),
    Case("dropout-above-one", "impossible value: lora.dropout = 1.5", _run("{d}/a.toml"),
         ("lora.dropout: must be in [0, 1), got 1.5",), edit=("alpha = 8", "alpha = 8\ndropout = 1.5")),
    Case("milestone-both", "impossible value: milestone with both step and epoch", _run("{d}/a.toml"),
         ("milestone.epoch: give either step or epoch, not both",), edit=("step = 3", "step = 3\nepoch = 1")),
    Case("milestone-after-end", "impossible value: milestone after the last step", _run("{d}/a.toml"),
         ("a.toml: milestone.step: milestone at step 500 comes after the last step (6", "move the milestone earlier"),
         edit=("step = 3", "step = 500")),
    Case("device-name", "impossible value: device = \"cuda\"", _run("{d}/a.toml"),
         ("a.toml:2: device: expected a GPU index or \"cpu\", got 'cuda'",),
         edit=('device = "cpu"', 'device = "cuda"')),
    Case("device-negative", "impossible value: device = -1", _run("{d}/a.toml"),
         ("a.toml:2: device: GPU index must be >= 0, got -1",), edit=('device = "cpu"', "device = -1")),
    Case("device-missing-gpu", "a GPU index this machine does not have (device = 99)", _run("{d}/a.toml"),
         ("a.toml:2: device: GPU 99 requested, but this machine has", 'device = "cpu"'),
         edit=('device = "cpu"', "device = 99")),
    Case("required-base", "a required key left out: model.base", _run("{d}/a.toml"),
         ("a.toml: model.base: is required", "hub id"), edit=('base = "model"\n', "")),
    # ---- continuing an adapter: model.init_adapter
    Case("adapter-r-differs", "lora.r other than the init adapter's (r 4, the adapter's r 8)", _run("{d}/a.toml"),
         ("a.toml:10: lora.r: 4, but the init adapter was trained with r = 8", "adapter/adapter_config.json",
          "set r = 8 in [lora]", "leave r out to take the adapter's"),
         edit=INIT_ADAPTER, files={"adapter/adapter_config.json": adapter_config(r=8)}),
    Case("adapter-alpha-differs", "lora.alpha other than the init adapter's, found by `check`", ("check", "{d}/a.toml"),
         ("a.toml:11: lora.alpha: 8, but the init adapter was trained with alpha = 16", "adapter/adapter_config.json",
          "leave alpha out"),
         edit=INIT_ADAPTER, files={"adapter/adapter_config.json": adapter_config(alpha=16)}),
    Case("adapter-targets-differ", "lora.target_modules other than the init adapter's", _run("{d}/a.toml"),
         ('a.toml:12: lora.target_modules: ["query", "value"], but the init adapter was trained with '
          'target_modules = ["query", "key", "value"]', "adapter/adapter_config.json", "leave target_modules out"),
         edit=INIT_ADAPTER, files={"adapter/adapter_config.json": adapter_config(targets=("query", "key", "value"))}),
    Case("adapter-task-differs", "model.task other than the init adapter's (tag, the adapter's generate)",
         _run("{d}/a.toml"),
         ('a.toml:6: model.task: "tag", but the init adapter was trained with task = "generate"',
          "adapter/adapter_config.json", 'set task = "generate" in [model]'),
         edit=INIT_ADAPTER, files={"adapter/adapter_config.json": adapter_config(task="CAUSAL_LM")}),
    Case("adapter-base-differs", "model.base other than the model the init adapter was trained on", _run("{d}/a.toml"),
         ("a.toml:5: model.base:", "is not the model the init adapter was trained on", "/other (",
          "hidden_size 32 against 64", "set base ="),
         edit=INIT_ADAPTER, files=OTHER_BASE),
    Case("adapter-head-differs", "a training set with other entity types than the init adapter's tag head",
         _run("{d}/a.toml"),
         ("a.toml: data.train:", "has the entity types EMAIL, PERSON, PHONE, but the init adapter's head was "
          "trained for ADDRESS, EMAIL", "adapter/gputwin.json", "the adapter's entity types"),
         edit=INIT_ADAPTER, files={"adapter/adapter_config.json": adapter_config(), "adapter/gputwin.json": json.dumps(
             {"task": "tag", "base": "{d}/model", "label_names": ["O", "B-ADDRESS", "I-ADDRESS", "B-EMAIL", "I-EMAIL"]})}),
    Case("adapter-folder-not-an-adapter", "model.init_adapter names a folder without adapter_config.json",
         _run("{d}/a.toml"), ("a.toml:7: model.init_adapter:", "holds no adapter_config.json", "written by gputwin or peft"),
         edit=('task = "tag"', 'task = "tag"\ninit_adapter = "data"')),
    # ---- files
    Case("profile-missing", "a profile file that does not exist", _run("{d}/nope.toml"),
         ("nope.toml: file not found", "check the path")),
    Case("profile-is-folder", "a folder given as the profile", _run("{d}/data"),
         ("data: is a folder, not a TOML file", "name a .toml file")),
    Case("profile-unreadable", "an unreadable profile (chmod 000)", _run("{d}/a.toml"),
         ("a.toml: cannot be read", "Permission denied", "check permissions"), unreadable="a.toml"),
    Case("profile-not-utf8", "a profile that is not UTF-8 text", _run("{d}/a.toml"),
         ("a.toml: cannot be read", "UTF-8"), files={"a.toml": "name = \"\udcff\"\n"}),
    Case("model-folder-missing", "model.base names a folder that does not exist", _run("{d}/a.toml"),
         ("a.toml:5: model.base: model folder", "does not exist", "existing folder"),
         edit=('base = "model"', 'base = "./gone"')),
    Case("data-missing", "data.train names a file that does not exist", _run("{d}/a.toml"),
         ("a.toml:20: data.train: data file", "nope.jsonl does not exist", "gputwin data synth"),
         edit=('train = "data/train.jsonl"', 'train = "data/nope.jsonl"')),
    Case("data-only-bad-lines", "a training set with only bad lines", _run("{d}/a.toml"),
         ("bad.jsonl: no usable line among 3", "line 1", "line 3"), files={"data/bad.jsonl": BAD_LINES},
         edit=('train = "data/train.jsonl"', 'train = "data/bad.jsonl"')),
    Case("test-only-bad-lines", "a test set with only bad lines (found before training, not at the milestone)",
         _run("{d}/a.toml"), ("bad.jsonl: no usable line among 3",), files={"data/bad.jsonl": BAD_LINES},
         edit=('test = "data/test.jsonl"', 'test = "data/bad.jsonl"')),
    Case("data-empty", "an empty dataset file", ("data", "inspect", "{d}/data/empty.jsonl"),
         ("empty.jsonl: the file is empty", "expected"), files={"data/empty.jsonl": ""}),
    Case("inspect-only-bad-lines", "`data inspect` on a file with only bad lines", ("data", "inspect", "{d}/data/bad.jsonl"),
         ("bad.jsonl: no usable line among 3", "line 2"), files={"data/bad.jsonl": BAD_LINES}),
    # ---- experiments and arms together
    Case("arm-name-traversal", "an arm name that is a path: name = \"../x\"", _run("{d}/a.toml"),
         ("a.toml:1: name: '../x' cannot be an arm name", "letters, digits"), edit=('name = "a"', 'name = "../x"')),
    Case("experiment-name-absolute", "an experiment name that is a path: --name /abs", _run("{d}/a.toml", "--name", "/abs"),
         ("--name '/abs' cannot be an experiment name", "letters, digits")),
    Case("experiment-name-slash", "an experiment name with a slash in the file: name = \"a/b\"", _run("{d}/exp.toml"),
         ("exp.toml:1: name: 'a/b' cannot be an experiment name",),
         files={"exp.toml": EXPERIMENT.replace('"pair"', '"a/b"')}),
    Case("same-output-dir", "two arms on one output folder", _run("{d}/a.toml", "{d}/b.toml"),
         ("b.toml: train.output_dir: arms 'a' and 'b' both write to", "its own output_dir"),
         files={"a.toml": PROFILE.format(name="a").replace('engine = "plain"', 'engine = "plain"\noutput_dir = "out"'),
                "b.toml": PROFILE.format(name="b").replace('engine = "plain"', 'engine = "plain"\noutput_dir = "out"')}),
    Case("same-arm-name", "two arms with one name", _run("{d}/a.toml", "{d}/a2.toml"),
         ("a.toml: name: two arms are called 'a'", "its own name"), files={"a2.toml": PROFILE.format(name="a")}),
    Case("experiment-one-arm", "an experiment file with one arm", _run("{d}/exp.toml"),
         ("exp.toml:2: arms: expected a list of at least two profile paths",),
         files={"exp.toml": EXPERIMENT.replace('["a.toml", "b.toml"]', '["a.toml"]')}),
    Case("experiment-bad-baseline", "an experiment whose baseline is not one of its arms", _run("{d}/exp.toml"),
         ("exp.toml:3: baseline: 'c' is not one of the arms",), files={"exp.toml": EXPERIMENT.replace('"a"', '"c"')}),
    Case("rules-percent", "a verdict rule in percent: target_f1 = 85", _run("{d}/exp.toml"),
         ("exp.toml:6: rules.target_f1: must be a fraction from 0 to 1, got 85.0", "0.85 for 85%"),
         files={"exp.toml": EXPERIMENT.replace("0.85", "85")}),
    Case("experiment-arm-missing", "an experiment naming a profile that does not exist", _run("{d}/exp.toml"),
         ("exp.toml:2: arms: profile", "c.toml does not exist", "relative to the experiment file's folder"),
         files={"exp.toml": EXPERIMENT.replace('"b.toml"', '"c.toml"')}),
    Case("rerun-ended", "`gputwin run` into an experiment that already ran", _run("{d}/a.toml", "{d}/b.toml", "--name", "done"),
         ("experiment done already ran", "--name NEW_NAME")),
    # ---- commands at the wrong time, or naming what does not exist
    Case("unknown-arm", "an unknown arm", ("stop", "c", "-x", "done"),
         ("experiment done has no arm 'c'; its arms: a, b", "gputwin status done")),
    Case("extend-zero", "extend by 0 epochs", ("extend", "a", "-x", "done", "--epochs", "0"),
         ("--epochs must be a whole number >= 1, got 0", "e.g. --epochs 1")),
    Case("extend-negative", "extend by -1 epochs", ("extend", "a", "-x", "done", "--epochs", "-1"),
         ("--epochs must be a whole number >= 1, got -1",)),
    Case("extend-not-a-number", "extend by a word (argparse)", ("extend", "a", "-x", "done", "--epochs", "two"),
         ("argument --epochs: invalid int value: 'two'",), hint=False),
    Case("stop-finished", "stop an arm that already finished", ("stop", "a", "-x", "done"),
         ("cannot stop arm a: it is finished, not running", "gputwin extend a")),
    Case("validate-now-finished", "validate-now on a finished arm", ("validate-now", "b", "-x", "done"),
         ("cannot validate arm b: it is finished, not running",)),
    Case("resume-finished", "resume an arm that finished", ("resume", "a", "-x", "done"),
         ("arm a finished; there is nothing to resume", "gputwin extend a --epochs N")),
    Case("status-unknown-experiment", "status of an unknown experiment", ("status", "nope"),
         ("no experiment 'nope' under", "experiments there: done")),
    Case("attach-unknown-experiment", "attach to an unknown experiment", ("attach", "nope"),
         ("no experiment 'nope' under",)),
    Case("stop-unknown-experiment", "stop in an unknown experiment", ("stop", "a", "-x", "nope"),
         ("no experiment 'nope'",)),
    Case("report-empty-folder", "report on an empty folder", ("report", "{d}/empty"),
         ("empty: not an experiment folder (it holds no experiment.json)", "gputwin run")),
    Case("export-into-a-file", "export --tensorboard into a path that is a file",
         ("export", "--tensorboard", "{d}/a.toml", "done"),
         ("a.toml: exists and is not a folder", "give a folder for the TensorBoard runs")),
    Case("validate-missing-model", "validate with a missing model folder",
         ("validate", "--model", "{d}/gone", "--test-data", "{d}/data/test.jsonl"),
         ("--model", "gone: no such folder", "adapter folder")),
    Case("validate-bad-test-data", "validate on a test file with only bad lines",
         ("validate", "--model", "{d}/model", "--test-data", "{d}/data/bad.jsonl"),
         ("bad.jsonl: no usable line among 3",), files={"data/bad.jsonl": BAD_LINES}),
    Case("validate-sample-size-zero", "validate with --sample-size 0",
         ("validate", "--model", "{d}/model", "--test-data", "{d}/data/test.jsonl", "--sample-size", "0"),
         ("--sample-size 0: expected a positive number of samples", "e.g. --sample-size 500")),
    Case("validate-base-differs", "validate with a --base other than the model the adapter was trained on",
         ("validate", "--model", "{d}/adapter", "--base", "{d}/model", "--test-data", "{d}/data/test.jsonl"),
         ("--base", "not the model the adapter", "was trained on", "hidden_size 32 against 64", "leave --base out"),
         files=OTHER_BASE),
    Case("validate-task-differs", "validate with a --task other than the adapter's",
         ("validate", "--model", "{d}/adapter", "--task", "generate", "--test-data", "{d}/data/test.jsonl"),
         ("--task generate: the adapter", "was trained for task 'tag'", "leave --task out"),
         files={"adapter/adapter_config.json": adapter_config()}),
    Case("synth-zero", "data synth with --train 0", ("data", "synth", "--out", "{d}/synth", "--train", "0"),
         ("--train must be at least 1, got 0", "number of samples")),
    Case("synth-out-is-file", "data synth into a path that is a file", ("data", "synth", "--out", "{d}/a.toml"),
         ("a.toml: is a file, expected a folder", "name a folder")),
    Case("synth-bad-locale", "data synth with an unknown locale", ("data", "synth", "--out", "{d}/synth", "--locales", "xx_YY"),
         ("xx_YY",)),
    Case("unknown-command", "an unknown command (argparse)", ("frobnicate",),
         ("invalid choice: 'frobnicate'",), hint=False),
]


# ---------------------------------------------------------------- the folder each case runs in


def _finished_experiment(root: Path, folder: Path) -> None:
    """logs/done as `gputwin run` leaves it once arms a and b have finished (private folders, lock files)."""
    arms = tuple(load_profile(folder / f"{n}.toml") for n in ("a", "b"))
    exp = root / "done"
    exp.mkdir(parents=True, mode=0o700)
    (exp / "experiment.json").write_text(json.dumps(Experiment("done", arms, Rules(baseline="a")).to_dict()))
    (exp / "run.lock").touch(mode=0o600)
    for profile in arms:
        arm = ArmPaths(exp / profile.name)
        arm.root.mkdir(mode=0o700)
        (arm.root / supervise.ARM_LOCK_FILE).touch(mode=0o600)
        arm.profile_json.write_text(json.dumps(profile.to_dict()))
        with EventWriter(arm.events) as log:
            log.emit(events.STARTED, arm=profile.name, pid=1, device="cpu", samples=24, steps_per_epoch=6,
                     total_steps=6, milestone_step=3)
            for step in range(1, 7):
                log.emit(events.STEP, step=step, epoch=step / 6, loss=1.0 / step, lr=1e-3)
            log.emit(events.FINISHED, step=6)
        arm.exit.write_text("0\n")


def make_folder(case: Case, folder: Path) -> Path:
    """Profiles a.toml/b.toml, exp.toml, data, an (empty) model folder, logs/done; then the case's changes."""
    write_data(folder / "data")
    (folder / "model").mkdir()
    (folder / "empty").mkdir()
    for name in ("a", "b"):
        (folder / f"{name}.toml").write_text(PROFILE.format(name=name))
    (folder / "exp.toml").write_text(EXPERIMENT)
    _finished_experiment(folder / "logs", folder)
    if case.edit is not None:
        text = (folder / "a.toml").read_text()
        assert case.edit[0] in text, f"case {case.id}: {case.edit[0]!r} is not in the profile"
        (folder / "a.toml").write_text(text.replace(*case.edit, 1))
    for name, text in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.replace("{d}", str(folder)).encode("utf-8", errors="surrogateescape"))
    return folder


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root with its mode, size and mtime: what "nothing changed on disk" compares."""
    out = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = path.lstat()
        out[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return out


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("GPUTWIN_LOGS", str(tmp_path / "logs"))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for pid_file in (tmp_path / "logs").glob("*/*/pid"):  # a case that wrongly started an arm: end it
        recorded = supervise.read_pid(ArmPaths(pid_file.parent))
        if recorded and supervise.process_alive(*recorded):
            os.kill(recorded[0], signal.SIGKILL)


def call(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        return int(exc.code or 0)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_clearly_and_changes_nothing(case: Case, folder: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    make_folder(case, folder)
    if case.unreadable:
        path = folder / case.unreadable
        path.chmod(0)
        if os.access(path, os.R_OK):
            path.chmod(stat.S_IRUSR | stat.S_IWUSR)
            pytest.skip("running as root: chmod 000 does not stop reads, so the file cannot be made unreadable")
    before = snapshot(folder)
    code = call([part.replace("{d}", str(folder)) for part in case.argv])
    out, err = capsys.readouterr()
    assert code == case.exit, f"exit {code}\nstdout: {out}\nstderr: {err}"
    assert out == "", "a refused command prints its error to stderr only"
    for fragment in case.expect:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    if case.hint:
        assert "\n  hint: " in err, err
    assert snapshot(folder) == before, "a refused command changed files"


def test_there_are_at_least_thirty_distinct_cases() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)
    assert len({c.bad_input for c in CASES}) == len(CASES)


def test_the_docs_table_agrees_with_the_tests() -> None:
    """docs/reliability.md holds exactly the table tests/reliability_table.py makes from these tests."""
    import reliability_table

    doc = reliability_table.DOC.read_text(encoding="utf-8")
    assert reliability_table.generated_section() in doc, "run `python tests/reliability_table.py` to update it"
    for case in CASES:
        assert f"`{case.id}`" in doc
