"""Model helpers shared by the trainer and the validator: load a base model and tokenizer offline,
attach a LoRA adapter, save adapters with the record that makes them usable on their own.

Everything loads with ``local_files_only=True``: gputwin never reaches a model hub at run time, so a
hub id that is not in the local cache is a user error with a hint, not a network timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

from ..core.errors import UserError
from ..core.profiles import LoraSpec

META_FILE = "gputwin.json"  # beside the peft files: what a saved adapter needs to be used again
HEAD_MODULE_NAMES = ("classifier", "score")  # token-classification heads in transformers models
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ModelLoadError(UserError):
    """A base model, tokenizer or adapter that cannot be loaded from what is on this machine."""


def _is_local(base: str) -> bool:
    return Path(base).expanduser().exists()


def _load_hint(base: str) -> str:
    if _is_local(base):
        return f"check that {base} holds config.json, the weights and the tokenizer files"
    return (f"download it once on a machine with internet (`hf download {base}`) so it is in the local "
            "Hugging Face cache, or set model.base to a folder holding the model")


def _where(base: str) -> str:
    return f"model folder {base}" if _is_local(base) else f"model {base!r} (hub id, looked up in the local cache only)"


def resolve_dtype(dtype_name: str, device: str | torch.device) -> torch.dtype:
    """The dtype the base weights are loaded in; 'auto' is bf16 on CUDA and fp32 on CPU."""
    kind = torch.device(device).type
    if dtype_name == "auto":
        return torch.bfloat16 if kind == "cuda" else torch.float32
    try:
        return DTYPES[dtype_name]
    except KeyError:
        raise UserError(f"model.dtype: unknown dtype {dtype_name!r}", f"use one of auto, {', '.join(DTYPES)}") from None


def load_tokenizer(base: str, trust_remote_code: bool = False) -> Any:
    """The base model's tokenizer, with a pad token (decoders often lack one: the EOS token stands in)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.base: cannot load the tokenizer of {_where(base)}: {_first_line(exc)}",
                             _load_hint(base)) from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"model.base: the tokenizer of {_where(base)} has neither a pad nor an EOS token",
                                 "use a tokenizer that defines eos_token or pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(base: str, *, task: str, dtype: str | torch.dtype, device: str | torch.device,
              label_names: list[str] | tuple[str, ...] | None = None, trust_remote_code: bool = False) -> Any:
    """The base model for a task head, on `device`, its weights in `dtype`.

    generate -> AutoModelForCausalLM; tag -> AutoModelForTokenClassification with a fresh head of
    len(label_names) labels (the head is trained through the adapter's modules_to_save).
    """
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code, "dtype": torch_dtype}
    if task == "generate":
        auto = AutoModelForCausalLM
    elif task == "tag":
        if not label_names:
            raise ValueError("load_base(task='tag') needs label_names")
        auto = AutoModelForTokenClassification
        kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={name: i for i, name in enumerate(label_names)})
    else:
        raise UserError(f"model.task: unknown task {task!r}", "use generate or tag")
    try:
        model = auto.from_pretrained(base, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.base: cannot load {_where(base)} for task {task!r}: {_first_line(exc)}",
                             _load_hint(base)) from None
    if task == "generate" and model.config.pad_token_id is None and model.config.eos_token_id is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model.to(device)


def head_module_names(model: Any) -> list[str]:
    """Names of the token-classification head(s) the model has (BERT: classifier, Qwen3: score)."""
    return [name for name, _ in model.named_children() if name in HEAD_MODULE_NAMES]


def attach_lora(model: Any, lora_spec: LoraSpec, task: str, init_adapter: str | None = None) -> Any:
    """Wrap the base model in a trainable peft LoRA model (or continue a saved adapter)."""
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    if init_adapter:
        hint = ("point it at a folder written by gputwin or peft (adapter_config.json) for the same base model "
                "and task")
        try:
            if not (Path(init_adapter) / "adapter_config.json").is_file():  # a local folder, never a hub lookup
                raise OSError(f"{init_adapter} holds no adapter_config.json")
            config = LoraConfig.from_pretrained(init_adapter)
        except (OSError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"model.init_adapter: cannot load adapter {init_adapter}: {_first_line(exc)}",
                                 hint) from None
        _same_shape_or_refuse(config, lora_spec, init_adapter)
        config.lora_dropout = lora_spec.dropout  # no weights of its own: the profile's value trains
        try:
            return PeftModel.from_pretrained(model, init_adapter, is_trainable=True, config=config)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelLoadError(f"model.init_adapter: cannot load adapter {init_adapter}: {_first_line(exc)}",
                                 hint) from None
    config = LoraConfig(
        r=lora_spec.r,
        lora_alpha=lora_spec.alpha,
        lora_dropout=lora_spec.dropout,
        target_modules=list(lora_spec.target_modules),
        task_type=TaskType.CAUSAL_LM if task == "generate" else TaskType.TOKEN_CLS,
        modules_to_save=head_module_names(model) if task == "tag" else None,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"lora.target_modules: {_first_line(exc)}",
                        f"linear layers this model has: {', '.join(linear_module_names(model)) or 'none'}") from None


def _same_shape_or_refuse(config: Any, lora_spec: LoraSpec, init_adapter: str) -> None:
    """peft trains the adapter's own shape; one that is not the resolved profile's (the adapter was
    replaced after `gputwin run` checked it, or the arm predates that check) would train under the wrong
    name, so it stops here."""
    targets = config.target_modules
    saved = (config.r, config.lora_alpha, set(targets) if not isinstance(targets, str) else targets)
    wanted = (lora_spec.r, lora_spec.alpha, set(lora_spec.target_modules))
    if saved != wanted:
        raise ModelLoadError(
            f"model.init_adapter: adapter {init_adapter} has r {config.r}, alpha {config.lora_alpha}, target modules "
            f"{sorted(saved[2]) if isinstance(saved[2], set) else saved[2]}, but this arm's profile says r "
            f"{lora_spec.r}, alpha {lora_spec.alpha}, target modules {sorted(wanted[2])}",
            "restore the adapter the arm was started with, or start the profile again with `gputwin run` "
            "(it refuses a shape other than the adapter's, and takes the adapter's when [lora] leaves it out)")


def linear_module_names(model: Any) -> list[str]:
    """Distinct leaf names of linear layers: what lora.target_modules may name."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return sorted(names - set(HEAD_MODULE_NAMES) - {"lm_head"})


def count_trainable(model: Any) -> int:
    """Parameters the optimizer updates (LoRA matrices plus any trained head)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def save_adapter(model: Any, folder: str | Path, meta: dict[str, Any],
                 state_dict: dict[str, Any] | None = None) -> Path:
    """peft's save_pretrained output plus gputwin.json (task, base, label_names, max_length, trust_remote_code).
    state_dict: the trainable weights to write, by the names model.named_parameters() gives them (a copy taken
    earlier: train/checkpoint.py's Snapshot); None: the model's own, now."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # written beside it and renamed once whole: a folder of this name is always a complete adapter
    temp = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(temp, ignore_errors=True)
    try:
        temp.mkdir()
        model.save_pretrained(str(temp), **({"state_dict": state_dict} if state_dict is not None else {}))
        keys = ("task", "base", "label_names", "max_length", "trust_remote_code")
        record = {key: meta.get(key) for key in keys} | {k: v for k, v in meta.items() if k not in keys}
        (temp / META_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if folder.exists():  # the same step's adapter again (a run resumed there validates it again)
            shutil.rmtree(folder)
        os.replace(temp, folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return folder


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
