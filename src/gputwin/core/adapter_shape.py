"""What a saved LoRA adapter was trained with, set against what a profile or a command asks for.

peft continues an adapter with the shape it was saved with: rank, alpha and target modules come from
its adapter_config.json whatever a profile says. A profile that disagrees would have the plan, the
screen and the report describe an arm other than the one training, so a disagreement is refused
before anything starts, and a key the profile leaves out is taken from the adapter.

    read_adapter(folder)                 AdapterShape from adapter_config.json (and gputwin.json)
    AdapterShape.lora_defaults()         the profile values the adapter fixes, for keys left out
    mismatches(given, adapter)           which given keys the adapter disagrees with (pure)
    describe_mismatches(found)           the key, the problem and the hint a profile error carries
    base_difference(wanted, trained_on)  why two base models differ, or None (same, or cannot tell)

Reading two small JSON files is all the I/O here; nothing imports torch or transformers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
META_FILE = "gputwin.json"  # what gputwin writes beside peft's files (modeling.save_adapter)
PEFT_TASKS = {"CAUSAL_LM": "generate", "TOKEN_CLS": "tag"}
BUNDLED_CONFIGS = Path(__file__).resolve().parents[1] / "model_configs"

# config.json keys that do not change a model's weights or their shapes: two copies of one model may
# differ in them (another transformers version, a head added for a task, a dtype chosen when saving).
VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "id2label",
    "label2id", "num_labels", "problem_type", "finetuning_task", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "_attn_implementation", "attn_implementation", "_commit_hash",
}


class AdapterError(UserError):
    """An adapter folder that cannot be continued or compared: no adapter_config.json, damaged, not LoRA."""


@dataclass(frozen=True)
class AdapterShape:
    """The adapter's shape and origin as its files record them; `*_file` says which file said so."""

    folder: str
    config_file: str
    r: int
    alpha: int | float
    dropout: float
    target_modules: tuple[str, ...]
    task: str | None = None
    task_file: str = ""
    base: str | None = None
    base_file: str = ""
    label_names: tuple[str, ...] | None = None  # a tag adapter's head, row by row (gputwin.json)
    meta_file: str = ""

    def lora_defaults(self) -> dict[str, Any]:
        """Profile values taken from the adapter when the profile leaves them out."""
        values: dict[str, Any] = {} if self.task is None else {"model.task": self.task}
        return values | {"lora.r": self.r, "lora.alpha": self.alpha, "lora.dropout": self.dropout,
                         "lora.target_modules": list(self.target_modules)}

    def value_of(self, key: str) -> Any:
        return {"lora.r": self.r, "lora.alpha": self.alpha, "lora.target_modules": list(self.target_modules),
                "model.task": self.task}[key]

    def source_of(self, key: str) -> str:
        return self.task_file if key == "model.task" else self.config_file


@dataclass(frozen=True)
class Mismatch:
    """One key on which a profile (or a command) and an adapter disagree."""

    key: str
    wanted: Any
    trained: Any
    source: str  # the adapter file that records `trained`


def mismatches(given: dict[str, Any], adapter: AdapterShape) -> list[Mismatch]:
    """The keys in `given` (dotted profile keys the user set) whose values the adapter was not trained with.

    Target modules compare as sets (peft does not keep their order); a task the adapter does not record
    cannot disagree. Dropout has no shape, so it is never a mismatch: the profile's value is used.
    """
    out = []
    for key in ("model.task", "lora.r", "lora.alpha", "lora.target_modules"):
        if key not in given:
            continue
        wanted, trained = given[key], adapter.value_of(key)
        if trained is None:
            continue
        same = set(wanted) == set(trained) if key == "lora.target_modules" else wanted == trained
        if not same:
            out.append(Mismatch(key, wanted, trained, adapter.source_of(key)))
    return out


def describe_mismatches(found: list[Mismatch]) -> tuple[str, str, str]:
    """(the key to blame, the problem, the hint) for a profile: the first mismatch, the others named too."""
    first = found[0]
    table = first.key.split(".")[0]
    same_table = [x for x in found if x.key.split(".")[0] == table]
    short = [x.key.split(".", 1)[1] for x in same_table]
    problem = (f"{toml_value(first.wanted)}, but the init adapter was trained with {short[0]} = "
               f"{toml_value(first.trained)} ({first.source})")
    problem += "".join(f"; {x.key} differs too ({toml_value(x.wanted)} here, {toml_value(x.trained)} in the adapter)"
                       for x in found[1:])
    settings = ", ".join(f"{k} = {toml_value(x.trained)}" for k, x in zip(short, same_table))
    hint = (f"set {settings} in [{table}] as the adapter has {'it' if len(short) == 1 else 'them'}, or leave "
            f"{'/'.join(short)} out to take the adapter's; to train with other values, start a new adapter "
            "(remove model.init_adapter)")
    return first.key, problem, hint


def toml_value(value: Any) -> str:
    """A value as it would be written in a profile: "tag", 12, ["query", "value"]."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


# ---------------------------------------------------------------- reading an adapter folder


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterError(f"{path}: cannot be read as JSON ({exc})",
                           "the adapter looks damaged; save it again or point at another one") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object", "the adapter looks damaged; save it again")
    return data


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_adapter(folder: str | Path) -> AdapterShape:
    """The shape of the LoRA adapter saved in `folder`; AdapterError naming the file when it has none."""
    folder = Path(folder)
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        inner = folder / "adapter" / ADAPTER_CONFIG
        hint = (f"a checkpoint keeps its adapter in a subfolder: use {inner.parent}" if inner.is_file()
                else "point it at a folder written by gputwin or peft (it holds adapter_config.json)")
        raise AdapterError(f"{folder}: holds no {ADAPTER_CONFIG}, so it is not a saved adapter", hint)
    config = _read_json(config_path)
    where = str(config_path)
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: a {config.get('peft_type')} adapter; gputwin continues LoRA adapters only",
                           "point it at a LoRA adapter, or train a new one (remove the init adapter)")
    r, alpha, dropout = config.get("r"), config.get("lora_alpha"), config.get("lora_dropout", 0.0)
    targets = config.get("target_modules")
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1) or not (_number(alpha) and alpha > 0):
        raise AdapterError(f"{where}: r and lora_alpha must be positive numbers, got r = {r!r}, "
                           f"lora_alpha = {alpha!r}", "the adapter looks damaged; save it again")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError(f"{where}: the adapter has a rank or alpha per module (rank_pattern, alpha_pattern), "
                           "which a profile's single lora.r and lora.alpha cannot describe",
                           "continue an adapter with one rank and alpha, or train a new one")
    if isinstance(targets, str):
        raise AdapterError(f"{where}: target_modules is the pattern {targets!r}, which a profile's list of "
                           "module names cannot describe", "continue an adapter saved with a list of module names")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{where}: target_modules must be a list of module names, got {targets!r}",
                           "the adapter looks damaged; save it again")
    meta_path = folder / META_FILE
    meta = _read_json(meta_path) if meta_path.is_file() else {}
    task, task_file = meta.get("task"), str(meta_path)
    if task not in ("generate", "tag"):
        task, task_file = PEFT_TASKS.get(str(config.get("task_type"))), where
    base, base_file = meta.get("base"), str(meta_path)
    if not isinstance(base, str) or not base:
        base, base_file = config.get("base_model_name_or_path"), where
    return AdapterShape(
        folder=str(folder), config_file=where, r=r, alpha=int(alpha) if float(alpha).is_integer() else float(alpha),
        dropout=float(dropout) if _number(dropout) else 0.0, target_modules=tuple(targets),
        task=task, task_file=task_file if task else "", base=base if isinstance(base, str) and base else None,
        base_file=base_file, label_names=_label_names(meta.get("label_names")), meta_file=str(meta_path),
    )


def _label_names(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def label_types(label_names: Sequence[str]) -> list[str]:
    """The entity types of BIO label names: ["O", "B-EMAIL", "I-EMAIL"] -> ["EMAIL"]."""
    return sorted({name[2:] for name in label_names if name[:2] in ("B-", "I-")})


# ---------------------------------------------------------------- are two base models the same?


def hub_id(name: str) -> str | None:
    """The hub id a name stands for: "Qwen/Qwen3-0.6B" itself, or a Hugging Face cache folder's
    (.../models--Qwen--Qwen3-0.6B/snapshots/<sha>); None for any other folder."""
    match = re.search(r"models--([^/]+?)--([^/]+)", name)
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    if name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        return name
    return None


def model_config(name: str) -> dict[str, Any] | None:
    """config.json of a model folder, of a hub id in the local cache, or bundled with gputwin; None if none."""
    folder = Path(name).expanduser()
    path: Path | None = folder / "config.json" if folder.is_dir() else None
    if path is None and (identity := hub_id(name)):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(identity, "config.json")
        except (ImportError, ValueError):
            cached = None
        bundled = BUNDLED_CONFIGS / (identity.replace("/", "--") + ".json")
        path = Path(cached) if isinstance(cached, str) else bundled
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def config_difference(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """"key a against b" for the keys both configs set to different values (volatile keys aside)."""
    keys = sorted((set(a) & set(b)) - VOLATILE_CONFIG_KEYS)
    keys.sort(key=lambda k: k != "model_type")  # the most telling difference first
    return [f"{k} {a[k]!r} against {b[k]!r}" for k in keys if a[k] != b[k]]


def base_difference(wanted: str, trained_on: str) -> str | None:
    """Why `wanted` is not the model an adapter was trained on (`trained_on`), or None.

    The same: the same name, the same folder, a cache folder of the same hub id, or two models whose
    config.json agree on every key both set (a copy of the model elsewhere). Different: configs that
    disagree, or two hub ids without configs to compare. Where a config cannot be found on this machine
    (an adapter trained on another one), gputwin cannot tell and says nothing.
    """
    if wanted == trained_on:
        return None
    a, b = Path(wanted).expanduser(), Path(trained_on).expanduser()
    try:
        if a.exists() and b.exists() and a.samefile(b):
            return None
    except OSError:
        pass
    ids = hub_id(wanted), hub_id(trained_on)
    if ids[0] is not None and ids[0] == ids[1]:
        return None
    configs = model_config(wanted), model_config(trained_on)
    if configs[0] is not None and configs[1] is not None:
        differ = config_difference(configs[0], configs[1])
        return f"their config.json differ: {', '.join(differ[:3])}" if differ else None
    if ids[0] is not None and ids[1] is not None and not a.exists() and not b.exists():
        return "two different hub ids"
    return None
