"""peft's LoRA Linear layers as one autograd function each: the same maths in fewer, larger kernels.

peft computes ``base(x) + lora_B(lora_A(dropout(x.float()))) * scaling``. Under bf16 autocast that casts
x to fp32 and back, runs dropout on the fp32 copy, scales and adds in kernels of their own, and autograd
mirrors each of them backward: about twenty kernels per adapted layer per step, most of them over a
[tokens, hidden] tensor. On a 0.6B model at batch 4 those small kernels cost more than the GEMMs.

fuse_lora gives each such layer a forward that computes, in the layer's own dtype,

    y = x W^T (+ bias) + s * (dropout(x) A^T) B^T

with the adapter's addition inside the last GEMM (addmm), and a backward that builds x's gradient from
one GEMM and one fused accumulate. A and B stay fp32 parameters (the optimizer and checkpoints see no
change); their copies in the compute dtype are made on each call, as autocast makes them, or, inside
`AdapterCopies.fresh()` (what the fast step does), for all layers at once at the start of the step: two
kernels a step instead of two casts and a scaling per layer, the scaling folded into B's copy. Layers or
calls this path does not cover (merged or disabled adapters, several active adapters, DoRA and other variants,
LoRA bias, a trainable or non-plain base layer, or a call whose LoRA GEMMs peft would run in another dtype
than x's, such as bf16 inputs to fp32 adapters without autocast) run peft's own forward.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import torch
from torch import nn

from . import lora_dropout_grad

__all__ = ["AdapterCopies", "LoraLinearFunction", "fuse_lora"]


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T (+ bias) + scaling * (dropout(x) A^T) B^T for a frozen W and trainable A, B (any dtype)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropout: float,
                copies: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """copies: A and scaling * B already in x's dtype (AdapterCopies), else they are made here."""
        flat = x.reshape(-1, x.shape[-1])
        if copies is None:
            a, b, b_scale = lora_a.to(x.dtype), lora_b.to(x.dtype), scaling
        else:
            (a, b), b_scale = copies, 1.0
        mask = None
        if dropout > 0.0:
            flat_dropped, mask = torch.native_dropout(flat, dropout, True)
        else:
            flat_dropped = flat
        h = flat_dropped @ a.t()                                   # [tokens, r]
        y = torch.addmm(bias, flat, weight.t()) if bias is not None else flat @ weight.t()
        y.addmm_(h, b.t(), alpha=b_scale)                         # the adapter's share, added inside the GEMM
        ctx.save_for_backward(flat_dropped, weight, a, b, h, mask)
        ctx.scaling, ctx.b_scale = scaling, b_scale
        ctx.keep = 1.0 - dropout
        ctx.x_shape, ctx.a_dtype, ctx.b_dtype = x.shape, lora_a.dtype, lora_b.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat_dropped, weight, a, b, h, mask = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        g = grad.reshape(-1, grad.shape[-1])
        gh = g @ b                                                # d loss / d h, [tokens, r]
        if ctx.b_scale != 1.0:
            gh.mul_(ctx.b_scale)
        grad_x = grad_bias = grad_a = grad_b = None
        if need_x:
            grad_x = g @ weight
            if mask is None:
                grad_x.addmm_(gh, a)
            else:
                lora_dropout_grad.add_(grad_x, gh, a, mask, ctx.keep)
            grad_x = grad_x.view(ctx.x_shape)
        if need_bias:
            grad_bias = g.sum(0)
        if need_a:
            grad_a = (gh.t() @ flat_dropped).to(ctx.a_dtype)
        if need_b:
            grad_b = (g.t() @ h).to(ctx.b_dtype).mul_(ctx.scaling)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


class AdapterCopies:
    """Every fused layer's A and scaling * B in the compute dtype, made together at the start of a step.

    Per call, the fused forward would cast A and B (two kernels) and scale the adapter's share (one more
    in the backward): at 4 layers x 28 in Qwen3-0.6B that is 336 small kernels a step, where a kernel
    costs its launch more than its bytes. Inside `fresh(dtype)` the layers use views of one buffer that a
    concatenation and one multiply fill, from the parameters as they are now (after the last update);
    outside it, every call casts for itself, so a stale copy is never read. Layers whose adapter is not
    the one found at construction, or whose A and B differ in dtype, device or layout, cast for themselves.
    """

    def __init__(self, model: Any) -> None:
        self._layers: list[tuple[Any, str]] = []
        for module in model.modules():
            if getattr(module.forward, "__func__", None) is _fused_forward and len(module.active_adapters) == 1:
                self._layers.append((module, module.active_adapters[0]))
        self._key: tuple[Any, ...] = ()
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._layers)

    def _current(self) -> list[tuple[Any, torch.Tensor, torch.Tensor, float]]:
        found = []
        for module, name in self._layers:
            if list(module.active_adapters) == [name] and name in module.lora_A:
                a, b = module.lora_A[name].weight, module.lora_B[name].weight
                if a.dtype == b.dtype and a.device == b.device and a.is_contiguous() and b.is_contiguous():
                    found.append((module, a, b, float(module.scaling[name])))
        return found

    def ready(self, dtype: torch.dtype | None) -> bool:
        """Make the buffer for these layers and dtype if it is not there (before a graph capture: no
        allocation may happen inside one). False where no layer takes copies."""
        layers = self._current() if dtype is not None else []
        if not layers or len({(a.dtype, a.device) for _, a, _, _ in layers}) != 1:
            return False
        key = (dtype, tuple((id(m), a.data_ptr(), b.data_ptr(), tuple(a.shape), tuple(b.shape), s)
                            for m, a, b, s in layers))
        if key != self._key:
            self._build(layers, dtype)
            self._key = key
        return True

    def _build(self, layers: list[tuple[Any, torch.Tensor, torch.Tensor, float]], dtype: torch.dtype) -> None:
        source_dtype, device = layers[0][1].dtype, layers[0][1].device
        scale = torch.cat([torch.full((t.numel(),), s if k == 1 else 1.0, dtype=source_dtype)
                           for _, a, b, s in layers for k, t in enumerate((a, b))])
        self._scale = scale.to(device)
        self._flat = torch.empty(scale.numel(), dtype=source_dtype, device=device)
        self._low = torch.empty(scale.numel(), dtype=dtype, device=device)
        self._sources = [t.detach().view(-1) for _, a, b, _ in layers for t in (a, b)]  # they share the storage
        views, at = {}, 0
        for module, a, b, _ in layers:
            a_low = self._low[at:at + a.numel()].view(a.shape)
            b_low = self._low[at + a.numel():at + a.numel() + b.numel()].view(b.shape)
            at += a.numel() + b.numel()
            views[id(module)] = (a_low, b_low)
        self._views = views

    @contextlib.contextmanager
    def fresh(self, dtype: torch.dtype | None) -> Iterator[None]:
        """The layers use copies of the adapters as they are now, in `dtype` (None: each call casts)."""
        global _COPIES
        if not self.ready(dtype):
            yield
            return
        torch.cat(self._sources, out=self._flat)
        torch.mul(self._flat, self._scale, out=self._low)
        previous, _COPIES = _COPIES, (dtype, self._views)
        try:
            yield
        finally:
            _COPIES = previous


_COPIES: tuple[torch.dtype, dict[int, tuple[torch.Tensor, torch.Tensor]]] | None = None


def lora_layer_type() -> type | None:
    """peft's LoRA Linear class (None without peft)."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    return Linear


@functools.lru_cache(maxsize=None)
def lora_matches_peft() -> bool:
    """Does peft's LoRA Linear forward compute base(x) + s * B(A(x))? (one small layer, fp32, CPU)"""
    try:
        from peft import LoraConfig, get_peft_model

        generator = torch.Generator().manual_seed(0)
        holder = nn.Module()
        holder.proj = nn.Linear(12, 6)
        model = get_peft_model(holder, LoraConfig(r=2, lora_alpha=6, lora_dropout=0.0, target_modules=["proj"]))
        layer = next(m for m in model.modules() if type(m) is lora_layer_type())
        base, name = layer.base_layer, layer.active_adapters[0]
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
            x = torch.randn(4, 12, generator=generator)
            theirs = type(layer).forward(layer, x)
            ours = LoraLinearFunction.apply(x, base.weight, base.bias, layer.lora_A[name].weight,
                                            layer.lora_B[name].weight, float(layer.scaling[name]), 0.0)
        return torch.allclose(theirs, ours, atol=1e-5, rtol=1e-5)
    except Exception:  # noqa: BLE001 - a peft that builds or computes its layer otherwise: keep its forward
        return False


def fusable(module: Any) -> bool:
    """The parts of a layer that do not change between calls: a plain nn.Linear base, plain LoRA."""
    base = getattr(module, "base_layer", None)
    return (type(base) is nn.Linear and not getattr(module, "fan_in_fan_out", False)
            and not getattr(module, "lora_variant", {}) and not any(getattr(module, "use_dora", {}).values())
            and not any(getattr(module, "lora_bias", {}).values()))


def dropout_p(module: nn.Module) -> float | None:
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return float(module.p) if module.training else 0.0
    return None


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    adapters = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1 or adapters[0] not in self.lora_A:
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    base, lora_a, lora_b = self.base_layer, self.lora_A[name], self.lora_B[name]
    p = dropout_p(self.lora_dropout[name])
    device = x.device.type
    # peft's LoRA GEMMs run in autocast's dtype, else in the adapter's: fuse only where that is x's dtype
    peft_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else lora_a.weight.dtype
    if (p is None or peft_dtype != x.dtype or base.weight.requires_grad or base.weight.dtype != x.dtype
            or not x.dtype.is_floating_point or lora_b.bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    copies = _COPIES[1].get(id(self)) if _COPIES is not None and _COPIES[0] == x.dtype else None
    with torch.autocast(device, enabled=False):
        return LoraLinearFunction.apply(x, base.weight, base.bias, lora_a.weight, lora_b.weight,
                                        float(self.scaling[name]), p, copies)


def fuse_lora(model: Any) -> int:
    """Give the model's peft LoRA Linear layers the fused forward and backward, in place (idempotent).

    Returns how many layers have it; calls it does not cover still run peft's forward.
    """
    layer_type = lora_layer_type()
    if layer_type is None or not lora_matches_peft():  # a peft whose layer computes otherwise keeps its own
        return 0
    changed = 0
    for module in model.modules():
        if type(module) is layer_type and fusable(module):
            if getattr(module.forward, "__func__", None) is not _fused_forward:
                module.forward = _fused_forward.__get__(module)
            changed += 1
    return changed
