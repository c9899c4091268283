"""The active LoRA adapter folded into copies of the base weights while the fast decoder runs.

Decoding with an unmerged adapter costs each adapted layer two extra GEMMs and an add per token; with the
adapter folded in (W + s * B A, summed in fp32 and rounded once to W's dtype) a layer is one GEMM again.
peft's own merge_adapter writes into W and unmerge_adapter subtracts again, which in bf16 does not give W
back: training would go on from changed base weights, and co-trained arms share them. Here W itself is
never written: each layer's base gets a merged copy for the duration, and its own tensor back after (also
after an error). The copies cost the adapted weights' size once (about 0.35 GB for Qwen3-0.6B's q,k,v,o).

Layers this does not cover (several or no active adapters, DoRA and other variants, LoRA bias, a base that
is not a plain nn.Linear, adapters disabled or already merged) keep their own forward.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ..kernels.fused_lora import fusable, lora_layer_type


@contextlib.contextmanager
def merged_adapter(model: Any, into: dict[int, torch.Tensor] | None = None) -> Iterator[int]:
    """Inside, every coverable LoRA layer computes x (W + s B A)^T with one GEMM; yields how many layers do.

    into: where the merged weights go, by base layer, from one call to the next (a tensor made once, written
    again each time): a decoder graph captured in one call reads the next call's adapter (fastgen.Kept)."""
    layer_type = lora_layer_type()
    swapped: list[tuple[Any, nn.Linear, nn.Parameter, str]] = []
    try:
        with torch.no_grad():
            for layer in model.modules() if layer_type is not None else ():
                if type(layer) is not layer_type or not fusable(layer) or layer.merged or layer.disable_adapters:
                    continue
                active = [name for name in layer.active_adapters if name in layer.lora_A]
                if len(active) != 1:
                    continue
                base, name = layer.base_layer, active[0]
                original = base.weight
                merged = original.float() + layer.get_delta_weight(name).float()
                if into is None:
                    target = merged.to(original.dtype)
                else:
                    target = into.get(id(base))
                    if target is None or target.shape != original.shape or target.dtype != original.dtype:
                        target = into[id(base)] = torch.empty_like(original)
                    target.copy_(merged)
                base.weight = nn.Parameter(target, requires_grad=False)
                layer.merged_adapters.append(name)
                swapped.append((layer, base, original, name))
        yield len(swapped)
    finally:
        for layer, base, original, name in reversed(swapped):
            base.weight = original
            layer.merged_adapters.remove(name)


def lora_layer_count(model: Any) -> int:
    """peft LoRA layers of every kind in the model (merged_adapter covers the plain Linear ones)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return 0
    return sum(1 for module in model.modules() if isinstance(module, LoraLayer))
