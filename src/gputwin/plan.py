"""The figures a user plans with, derived from profiles without training anything:
samples, steps per epoch, total steps, milestone step and LoRA trainable parameters.

Trainable parameters come from the model's config alone: the model is built on PyTorch's "meta"
device (no weights, no memory) and every targeted linear layer contributes r x (in + out).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .profiles import Profile, ProfileError, differing_keys, flatten, load_any

BUNDLED_CONFIGS = Path(__file__).parent / "model_configs"
SYNTH_LABELS = 19  # O and B-/I- for each of the synthetic corpus's 9 entity types


@dataclass(frozen=True)
class Plan:
    samples: int
    steps_per_epoch: int
    total_steps: int
    milestone_step: int
    trainable_params: int | None
    base_params: int | None
    samples_note: str = ""


def steps_for(samples: int, batch_size: int, epochs: float) -> tuple[int, int]:
    """(steps per epoch, total steps); the last partial batch of an epoch is a step too."""
    per_epoch = max(1, math.ceil(samples / batch_size))
    return per_epoch, max(1, math.ceil(per_epoch * epochs))


def milestone_step(profile: Profile, steps_per_epoch: int) -> int:
    if profile.milestone.step is not None:
        return profile.milestone.step
    return max(1, round((profile.milestone.epoch or 1.0) * steps_per_epoch))


def count_samples(profile: Profile) -> tuple[int, str]:
    """Valid training samples; for data made on first use, the size it will be made with."""
    path = Path(profile.data.train)
    if not path.is_file():
        if profile.data.synth_if_missing:
            return profile.data.synth_train, "synthetic, made on first run"
        raise ProfileError(profile.source, "data.train", f"data file {path} does not exist",
                           "make one with `gputwin data synth --out DIR` or set synth_if_missing = true")
    info = path.stat()
    samples, bad, _ = _count_valid(str(path.resolve()), info.st_mtime_ns, info.st_size)
    return samples, f"{bad} bad lines skipped" if bad else ""


def entity_types(profile: Profile) -> tuple[str, ...] | None:
    """The training set's entity types, sorted; None for data made on first run."""
    path = Path(profile.data.train)
    if not path.is_file():
        return None
    info = path.stat()
    return _count_valid(str(path.resolve()), info.st_mtime_ns, info.st_size)[2]


def head_labels(profile: Profile) -> int:
    """Labels of a tag arm's classifier head as the trainer builds it: B- and I- per entity type of the
    training set, and O (for data made on first run, the synthetic corpus's 9 types: 19)."""
    types = entity_types(profile)
    return SYNTH_LABELS if types is None else 1 + 2 * len(types)


@functools.lru_cache(maxsize=16)
def _count_valid(path: str, mtime_ns: int, size: int) -> tuple[int, int, tuple[str, ...]]:
    """Valid samples, bad lines and entity types of a data file, read once per version of it (arms share a file)."""
    from .data import load_dataset

    dataset = load_dataset(Path(path))
    return len(dataset.samples), len(dataset.bad_lines), tuple(dataset.entity_types)


def check_adapter_head(profile: Profile) -> None:
    """A tag arm continuing an adapter trains the adapter's classifier head, one row per label it was saved
    with; a training set with other entity types would not fit it, or would fit it with rows that meant
    other labels. Refused before anything starts (data made on first run is checked by the trainer's load)."""
    if profile.model.task != "tag" or not profile.model.init_adapter:
        return
    from .adapter_shape import AdapterError, label_types, read_adapter
    from .encoding import bio_label_names

    try:
        adapter = read_adapter(profile.model.init_adapter)
    except AdapterError:
        return  # the profile was read without its files; the trainer's load reports it
    types = entity_types(profile)
    if adapter.label_names is None or types is None or list(adapter.label_names) == bio_label_names(types):
        return
    same = label_types(adapter.label_names) == list(types)
    raise ProfileError(profile.source, "data.train",
                       f"{profile.data.train} has the entity types {', '.join(types) or 'none'}, but the init "
                       f"adapter's head was trained for {', '.join(label_types(adapter.label_names))} "
                       f"({adapter.meta_file}{'; its rows are in another order' if same else ''})",
                       "train on data with the adapter's entity types, or start a new adapter (remove "
                       "model.init_adapter)")


def load_model_config(base: str, trust_remote_code: bool = False) -> Any:
    """A local folder, the local Hugging Face cache, or a config bundled with gputwin. Never the network."""
    from transformers import AutoConfig

    folder = Path(base)
    if folder.is_dir():
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    try:
        return AutoConfig.from_pretrained(base, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        bundled = BUNDLED_CONFIGS / (base.replace("/", "--") + ".json")
        if bundled.is_file():
            data = json.loads(bundled.read_text())
            return AutoConfig.for_model(data.pop("model_type"), **data)
    raise UserError(f"model {base!r}: no config.json in a local folder, the Hugging Face cache or gputwin's bundled configs",
                    "download the model once (huggingface-cli download ...) or point model.base at a local folder")


@functools.lru_cache(maxsize=8)
def _meta_model(base: str, task: str, trust_remote_code: bool, num_labels: int) -> Any:
    """The profile's model built on PyTorch's meta device: its structure, no weights, no memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    config = load_model_config(base, trust_remote_code)
    with torch.device("meta"):
        if task == "tag":
            config.num_labels = num_labels
            return AutoModelForTokenClassification.from_config(config, trust_remote_code=trust_remote_code)
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def fast_paths(profile: Profile) -> dict[str, dict[str, Any]]:
    """Which fused paths the fast engine would take for this profile's model with the installed
    transformers and peft (each checked against the library's own code), or why the engine would not run."""
    def off(why: str) -> dict[str, dict[str, Any]]:
        return {"fast_engine": {"on": False, "why": why}}

    if profile.train.engine != "fast":
        return off('train.engine = "plain"')
    if profile.model.task != "generate":
        return off("the fast engine trains decoders for the generate task; tag arms use the plain engine")
    from .train import fastpaths
    from .train.fast import decoder_parts

    model = _meta_model(profile.model.base, profile.model.task, profile.model.trust_remote_code, SYNTH_LABELS)
    try:
        decoder_parts(model)
    except TypeError as exc:
        return off(str(exc))
    return {"rms_norm": fastpaths.norm_status(model), "lora": fastpaths.lora_status(),
            "rotary": fastpaths.rotary_status(model)}


def lora_params(profile: Profile, num_labels: int = SYNTH_LABELS) -> tuple[int, int]:
    """(LoRA trainable parameters, base parameters) for the profile's model, computed on the meta device.

    For the `tag` task the classifier head trains too; num_labels is its width (B/I per type + O).
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    model = _meta_model(profile.model.base, profile.model.task, profile.model.trust_remote_code, num_labels)
    targets = set(profile.lora.target_modules)
    trainable = 0
    matched = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        if isinstance(module, torch.nn.Linear):
            trainable += profile.lora.r * (module.in_features + module.out_features)
        elif isinstance(module, Conv1D):
            fan_in, fan_out = module.weight.shape
            trainable += profile.lora.r * (fan_in + fan_out)
        else:
            continue
        matched += 1
    if matched == 0:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ProfileError(profile.source, "lora.target_modules",
                           f"none of {list(profile.lora.target_modules)} is a linear layer of {profile.model.base}",
                           f"this model's linear layers are named: {', '.join(linear_names)}")
    if profile.model.task == "tag":
        head = getattr(model, "classifier", None) or getattr(model, "score", None)
        if head is not None:
            trainable += sum(p.numel() for p in head.parameters())
    base_params = sum(p.numel() for p in model.parameters())
    return trainable, base_params


def plan_profile(profile: Profile, *, with_params: bool = True) -> Plan:
    samples, note = count_samples(profile)
    per_epoch, total = steps_for(samples, profile.train.batch_size, profile.train.epochs)
    check_adapter_head(profile)
    milestone = milestone_step(profile, per_epoch)
    if milestone > total:
        key = "milestone.step" if profile.milestone.step is not None else "milestone.epoch"
        raise ProfileError(profile.source, key,
                           f"milestone at step {milestone} comes after the last step ({total} = "
                           f"{profile.train.epochs:g} epochs x {per_epoch} steps)",
                           "move the milestone earlier or train more epochs")
    trainable = base = None
    if with_params:
        trainable, base = lora_params(profile, head_labels(profile) if profile.model.task == "tag" else SYNTH_LABELS)
    return Plan(samples, per_epoch, total, milestone, trainable, base, note)


# ---------------------------------------------------------------- `gputwin check`

DERIVED_ROWS = [
    ("samples", "samples (train)"),
    ("steps_per_epoch", "steps per epoch"),
    ("total_steps", "total steps"),
    ("milestone_step", "milestone step"),
    ("trainable_params", "LoRA trainable params"),
    ("base_params", "base model params"),
]


def _fmt(value: Any, *, commas: bool = False) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "-"
    if isinstance(value, int):
        return f"{value:,}" if commas else str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _paths_cell(paths: dict[str, dict[str, Any]]) -> str:
    if "fast_engine" in paths:
        return "plain engine"
    on = [name for name, s in paths.items() if s["on"]]
    off = [name for name, s in paths.items() if not s["on"]]
    return ", ".join(on) + " on" + (f"; {', '.join(off)} off" if off else "") if on else "all off"


def cmd_check(args: Any) -> int:
    from rich.console import Console
    from rich.table import Table

    experiment = load_any(args.profiles, check_files=True)
    arms = list(experiment.arms)
    plans = [plan_profile(a) for a in arms]
    paths = [fast_paths(a) for a in arms]
    differ = set(differing_keys(arms))
    if getattr(args, "json", False):
        reference = None if experiment.reference is None else asdict(experiment.reference)
        print(json.dumps({"experiment": experiment.name, "differing_keys": sorted(differ),
                          "arms": [{"profile": a.to_dict(), "from_adapter": list(a.from_adapter), "plan": asdict(p),
                                    "fast_paths": f} for a, p, f in zip(arms, plans, paths)],
                          "reference": reference}, indent=2))
        return 0
    console = Console()
    table = Table(title=f"gputwin check: {experiment.name}", title_justify="left", show_lines=False)
    table.add_column("key", style="dim", no_wrap=True)
    for arm in arms:
        table.add_column(arm.name + (" (baseline)" if arm.name == experiment.rules.baseline else ""))
    flats = [flatten(a) for a in arms]
    for key in [k for k in flats[0] if k not in {"name", "source"}]:
        marker = "≠ " if key in differ else "  "
        style = "bold yellow" if key in differ else None
        cells = ["cpu" if key == "device" and f.get(key) is None else _fmt(f.get(key)) for f in flats]
        table.add_row(marker + key, *cells, style=style)
    table.add_section()
    for attr, label in DERIVED_ROWS:
        values = [getattr(p, attr) for p in plans]
        marker = "≠ " if len(set(values)) > 1 else "  "
        table.add_row(marker + label, *[_fmt(v, commas=True) for v in values], style="bold" if marker.strip() else None)
    table.add_row("  fast paths", *[_paths_cell(f) for f in paths])
    console.print(table)
    notes = [f"{a.name}: {p.samples_note}" for a, p in zip(arms, plans) if p.samples_note]
    notes += [f"{a.name}: {', '.join(a.from_adapter)} taken from the init adapter {a.model.init_adapter}"
              for a in arms if a.from_adapter]
    notes += [f"{a.name}: {name} off: {s['why']}" for a, f in zip(arms, paths) for name, s in f.items()
              if not s["on"] and name != "fast_engine"]
    if experiment.reference is not None:
        from .paths import logs_root
        from .reference_run import REFERENCE_DIR, RESULT_FILE, inputs_for

        out = logs_root() / experiment.name / REFERENCE_DIR / RESULT_FILE
        notes.append(f"reference {experiment.reference.name}: validated before the arms start (unless cached) "
                     f"with `{inputs_for(experiment).command(out)}`")
    for note in notes:
        console.print(f"note: {note}")
    if any("fast_engine" not in f for f in paths):
        import peft
        import transformers

        console.print(f"fast paths: checked against transformers {transformers.__version__} and peft "
                      f"{peft.__version__}; they engage on CUDA", style="dim")
    console.print("≠ marks the keys that differ between arms.", style="dim")
    return 0
