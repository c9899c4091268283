"""Load what `gputwin validate --model DIR` points at: a LoRA adapter folder (peft output, usually with
gputwin.json beside it) or a full model folder. Offline only: a base that is not on this machine is a
UserError with a hint, never a download or a network timeout."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..core.adapter_shape import ADAPTER_CONFIG, META_FILE, PEFT_TASKS, base_difference
from ..core.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def resolve_device(device: str | None) -> str:
    """'auto' (or None) is the first GPU when there is one, else the CPU."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine", hint="use --device cpu")
    return str(device)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read it as JSON ({exc})",
                        hint="point --model at a folder written by gputwin, peft or transformers") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object", hint="the file looks damaged; save the model again")
    return data


def _resolve_base(base: str) -> str:
    """'package:NAME' is the model/ folder an installed package ships; anything else is used as given."""
    from ..core.profiles import package_model_dir

    if base.startswith("package:"):
        found = package_model_dir(base.removeprefix("package:"))
        if found is None:
            raise UserError(f"--base {base}: no installed package ships a model/ folder under that name",
                            hint="install the package, or give a model folder")
        return str(found)
    return base


def _task_from_architectures(config: Any) -> str | None:
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith("ForTokenClassification"):
            return "tag"
        if arch.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
            return "generate"
    return None


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    """gputwin.json of an adapter or model folder, or {} when there is none."""
    path = Path(model_dir) / META_FILE
    return _read_json(path) if path.is_file() else {}


def load_for_validation(model_dir: str | Path, *, base: str | None = None, task: str | None = None,
                        device: str | None = "auto") -> tuple[Any, Any, str, list[str] | None]:
    """(model, tokenizer, task, label_names) ready for inference on the resolved device.

    The task and label names come from --task/gputwin.json/the peft or transformers config, in that order.
    """
    from .modeling import ModelLoadError, load_base, load_tokenizer

    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"--model {folder}: no such folder",
                        hint="give an adapter folder (adapter_config.json) or a model folder (config.json)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = resolve_device(device)
    meta = read_meta(folder)
    trust = bool(meta.get("trust_remote_code", False))
    is_adapter = (folder / ADAPTER_CONFIG).is_file()
    if is_adapter:
        adapter = _read_json(folder / ADAPTER_CONFIG)
        _same_as_trained_or_refuse(folder, meta, adapter, base, task)
        base_name = base or meta.get("base") or adapter.get("base_model_name_or_path")
        if not base_name:
            raise UserError(f"{folder / ADAPTER_CONFIG}: names no base model", hint="pass --base MODEL_FOLDER")
        base_name = _resolve_base(str(base_name))
        task = task or meta.get("task") or PEFT_TASKS.get(str(adapter.get("task_type")))
    elif (folder / "config.json").is_file():
        from transformers import AutoConfig

        base_name = str(folder)
        config = AutoConfig.from_pretrained(base_name, local_files_only=True, trust_remote_code=trust)
        task = task or meta.get("task") or _task_from_architectures(config)
        if task == "tag" and not meta.get("label_names"):
            id2label = getattr(config, "id2label", None) or {}
            meta["label_names"] = [id2label[i] for i in sorted(id2label)]
    else:
        raise UserError(f"--model {folder}: holds neither {ADAPTER_CONFIG} nor config.json",
                        hint="give an adapter folder written by gputwin/peft or a transformers model folder")
    if task not in ("generate", "tag"):
        raise UserError(f"--model {folder}: cannot tell the task head (found {task!r})",
                        hint="pass --task generate or --task tag")
    label_names = list(meta["label_names"]) if task == "tag" and meta.get("label_names") else None
    if task == "tag" and not label_names:
        raise UserError(f"--model {folder}: no label names for the tag head ({META_FILE} is missing them)",
                        hint=f"validate an adapter saved by gputwin (it writes {META_FILE} with label_names)")

    has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
    try:
        tokenizer = load_tokenizer(str(folder) if has_tokenizer else base_name, trust)
        model = load_base(base_name, task=task, dtype="auto", device=device, label_names=label_names,
                          trust_remote_code=trust)
    except ModelLoadError as exc:
        if not is_adapter:
            raise
        raise UserError(f"adapter {folder}: its base model cannot be loaded offline: {exc.message}",
                        hint="pass --base with a local model folder (the one the adapter was trained on)") from None
    if is_adapter:
        model = _attach_adapter(model, folder, device)
    model.eval()
    return model, tokenizer, task, label_names


def _same_as_trained_or_refuse(folder: Path, meta: dict[str, Any], adapter: dict[str, Any], base: str | None,
                               task: str | None) -> None:
    """--base and --task may stand in for what the adapter does not record or this machine lacks, never
    contradict it: an adapter applied to another model, or read with another head, scores something else."""
    meta_file, config_file = folder / META_FILE, folder / ADAPTER_CONFIG
    trained_task, task_file = meta.get("task"), meta_file
    if trained_task not in ("generate", "tag"):
        trained_task, task_file = PEFT_TASKS.get(str(adapter.get("task_type"))), config_file
    if task and trained_task and task != trained_task:
        raise UserError(f"--task {task}: the adapter {folder} was trained for task {trained_task!r} ({task_file})",
                        hint=f"leave --task out to take the adapter's, or pass --task {trained_task}")
    trained_on, base_file = meta.get("base"), meta_file
    if not isinstance(trained_on, str) or not trained_on:
        trained_on, base_file = adapter.get("base_model_name_or_path"), config_file
    if not base or not isinstance(trained_on, str) or not trained_on:
        return
    why = base_difference(_resolve_base(base), trained_on)
    if why:
        raise UserError(f"--base {base}: not the model the adapter {folder} was trained on, {trained_on} "
                        f"({base_file}): {why}",
                        hint="leave --base out to use the adapter's base, or pass --base with that model (or a copy "
                        "of it); --base is for an adapter whose base is not on this machine")


def _attach_adapter(model: Any, folder: Path, device: str) -> Any:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=False).to(device)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"adapter {folder}: cannot be applied to its base model: {first}",
                        hint="check that --base is the model the adapter was trained on") from None
