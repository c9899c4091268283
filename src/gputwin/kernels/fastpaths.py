"""Which of the fast step's fused paths engage for a model, and why any does not.

The fused paths stand in for code of transformers and peft (rotary embeddings, RMSNorm, peft's LoRA
Linear) with fewer kernels that compute the same maths. Each is checked against the library's own code
on small inputs (fp64 or fp32, CPU) before it is used, so a release that changes the maths keeps its own
code instead of training something else. This module runs those checks and says, for the `started`
event and `gputwin check`, which paths passed and why any is off.

A status is a dict: {"on": bool, "why": str}.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import fused_norm
from .fused_lora import lora_matches_peft
from .fused_mlp import fusable

__all__ = ["lora_matches_peft", "lora_status", "mlp_status", "norm_status", "rms_norm_matches", "rotary_status",
           "summary"]


def status(on: bool, why: str) -> dict[str, Any]:
    return {"on": bool(on), "why": why}


# ---------------------------------------------------------------- RMSNorm


@functools.lru_cache(maxsize=None)
def rms_norm_matches(cls: type) -> bool:
    """Does this RMSNorm class compute torch's rms_norm(x, weight, eps)? (a fresh instance, fp32, CPU)"""
    try:
        try:
            module = cls(16, eps=1e-5)
        except TypeError:
            module = cls(16)
        weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or not isinstance(eps, float):
            return False
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            weight.copy_(torch.randn(16, generator=generator))
            x = torch.randn(3, 5, 16, generator=generator)
            theirs = cls.forward(module, x)
            ours = F.rms_norm(x, (16,), weight, eps)
        return theirs.shape == ours.shape and torch.allclose(theirs, ours, atol=1e-5, rtol=1e-5)
    except Exception:  # noqa: BLE001 - anything unexpected: keep the model's own forward
        return False


def rms_norm_classes(model: Any) -> dict[type, bool]:
    """Each RMSNorm class in the model, and whether it passed rms_norm_matches."""
    classes = {type(m) for m in model.modules() if type(m).__name__.endswith("RMSNorm")}
    return {cls: rms_norm_matches(cls) for cls in sorted(classes, key=lambda c: c.__qualname__)}


def norm_status(model: Any, fused: int | None = None) -> dict[str, Any]:
    classes = rms_norm_classes(model)
    if not classes:
        return status(False, "the model has no RMSNorm modules")
    differ = [cls.__name__ for cls, same in classes.items() if not same]
    if differ:
        return status(False, f"{', '.join(differ)} computes something else than torch's rms_norm: its own forward runs")
    names = ", ".join(cls.__name__ for cls in classes)
    kernel = fused_norm.describe(next(model.parameters()).device)
    return status(True, f"{names} checked against torch's rms_norm" + (f"; {fused} modules" if fused else "")
                  + (f"; {kernel}" if kernel else ""))


# ---------------------------------------------------------------- rotary embeddings


def rotary_status(model: Any, modules: list[Any] | None = None, *, gpu_arm: bool = False) -> dict[str, Any]:
    """gpu_arm: the model (on the meta device, `gputwin check`) is for an arm on a GPU: say which rotary kernel
    it would take there, without running one."""
    from .fused_rotary import FUNCTION_NAME, attention_modeling_modules, liger_rope_function, rotary_modules, triton_rope

    found = attention_modeling_modules(model)
    if not found:
        return status(False, f"no {FUNCTION_NAME} in the attention layers' modeling module")
    checked = rotary_modules(model) if modules is None else modules
    names = [m.__name__.rsplit(".", 1)[-1] for m in checked]
    others = [m.__name__.rsplit(".", 1)[-1] for m in found if m not in checked]
    if others:
        return status(False, f"{', '.join(others)}.{FUNCTION_NAME} computes something else: the model's own runs")
    device = next(model.parameters()).device
    kernel = "roll + fused multiply-add"
    missing = " (pip install 'gputwin[gpu]' for liger-kernel's Triton RoPE, about 1.1x the tokens/s)"
    if device.type == "cuda":
        if triton_rope(device) is not None:  # checked here, before any capture
            kernel = "liger-kernel's Triton RoPE"
        elif liger_rope_function() is None:
            kernel += missing
        else:
            kernel += " (liger-kernel's Triton RoPE failed its check on this GPU)"
    elif gpu_arm:
        kernel = ("liger-kernel's Triton RoPE, once checked on the GPU" if liger_rope_function() is not None
                  else kernel + missing)
    return status(True, f"{', '.join(names)}.{FUNCTION_NAME} checked; {kernel}")


# ---------------------------------------------------------------- peft's LoRA Linear


def lora_status(fused: int | None = None) -> dict[str, Any]:
    import peft

    if not lora_matches_peft():
        return status(False, f"peft {peft.__version__}'s LoRA Linear computes something else: its own forward runs")
    return status(True, f"peft {peft.__version__}'s LoRA Linear checked" + (f"; {fused} layers" if fused else ""))


# ---------------------------------------------------------------- MLP


def mlp_status(model: Any, lora_targets: Any = ()) -> dict[str, Any]:
    """Would the model's MLPs take the fused forward (kernels/fused_mlp.py)? Structure only: on a GPU the kernels
    are also checked against the module's own forward before use."""
    mlps = [m for m in model.modules() if type(m).__name__.endswith("MLP")]
    adapted = sorted(set(lora_targets) & {"gate_proj", "up_proj", "down_proj"})
    if adapted:
        return status(False, f"LoRA on {', '.join(adapted)}: the MLP keeps its own forward")
    if not mlps or not all(fusable(m) for m in mlps):
        return status(False, "no MLP of bias-free gate, up and down Linear layers with SiLU")
    return status(True, "gate and up in one GEMM, SiLU * up in one Triton kernel (on a GPU, once checked)")


def summary(paths: dict[str, dict[str, Any]]) -> str:
    """'rotary on, rms_norm on, lora off (why)' in one line."""
    return ", ".join(f"{name} {'on' if s['on'] else 'off'}" + ("" if s["on"] else f" ({s['why']})")
                     for name, s in paths.items())

