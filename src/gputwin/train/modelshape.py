"""What a profile's model looks like without loading its weights: the model built on PyTorch's "meta" device
(its structure, no memory), the LoRA parameters it would train, and which of the fast engine's fused paths
it would take.

    lora_params(profile, num_labels) -> (trainable, base)    every targeted linear layer adds r x (in + out)
    fast_paths(profile)                                      the paths, each checked against transformers/peft
    plan_with_params(profile) -> Plan                        plan.plan_profile with the parameter counts

On the trainer side of the layering (it imports torch, transformers and the fast engine when used); only
`gputwin check` among the commands uses it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.plan import SYNTH_LABELS, Plan, head_labels, plan_profile
from ..core.profiles import Profile, ProfileError

BUNDLED_CONFIGS = Path(__file__).resolve().parents[1] / "model_configs"


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
    from ..kernels import fastpaths
    from ..kernels.decoder import decoder_parts

    model = _meta_model(profile.model.base, profile.model.task, profile.model.trust_remote_code, SYNTH_LABELS)
    try:
        decoder_parts(model)
    except TypeError as exc:
        return off(str(exc))
    return {"rms_norm": fastpaths.norm_status(model), "lora": fastpaths.lora_status(),
            "rotary": fastpaths.rotary_status(model, gpu_arm=profile.device is not None),
            "mlp": fastpaths.mlp_status(model, profile.lora.target_modules)}


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


def plan_with_params(profile: Profile) -> Plan:
    """The arm's plan with its LoRA trainable and base parameters (after the plan's own checks)."""
    plan = plan_profile(profile)
    trainable, base = lora_params(profile, head_labels(profile) if profile.model.task == "tag" else SYNTH_LABELS)
    return dataclasses.replace(plan, trainable_params=trainable, base_params=base)
