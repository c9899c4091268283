"""A Llama-family MLP as two GEMMs and one Triton kernel each way.

HF's MLP computes down(act(gate(x)) * up(x)): forward three GEMMs, SiLU and a multiply; backward the
multiply's two products, SiLU's gradient, two GEMMs for x's gradient and their sum. With the gate and up
weights side by side in one [2F, H] tensor (the two modules' weights become views of it: no second copy),
forward is one GEMM for gate and up, one kernel for SiLU(gate) * up (in fp32, rounded once) and down;
backward is down's GEMM, one kernel writing both halves' gradient over the saved gate/up output, and one
GEMM for x. Six kernels a layer fewer, and SiLU's output is not kept for the backward.

fuse_mlps(model) gives this forward to the model's MLP modules on a CUDA device where Triton loads and a
module's fused forward and backward match its own (checked once a process, on the first module of each
class); a module whose projections are not plain bias-free Linear layers (LoRA on the MLP) or whose
activation is not SiLU keeps its own.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 4096  # columns of one half a program handles at a time
_CHECKED: dict[type, bool] = {}  # MLP class -> its fused forward matched its own on this device
ENABLED = True  # False: the modules keep their own forward (the benches' A/B)


class SwiGLU(torch.autograd.Function):
    """silu(y[..., :F]) * y[..., F:] for y = x @ [gate; up]^T ([..., 2F]); backward writes y's gradient over y."""

    @staticmethod
    def forward(ctx: Any, gate_up: torch.Tensor) -> torch.Tensor:
        y = gate_up.reshape(-1, gate_up.shape[-1])
        if y.stride(-1) != 1 or y.stride(0) != y.shape[1]:
            y = y.contiguous()
        half = y.shape[1] // 2
        out = torch.empty(y.shape[0], half, dtype=y.dtype, device=y.device)
        _kernels().forward[(y.shape[0],)](y, out, half, BLOCK=BLOCK)
        ctx.save_for_backward(y)
        ctx.shape = gate_up.shape
        return out.view(*gate_up.shape[:-1], half)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        grad = grad_out.reshape(y.shape[0], -1).contiguous()
        # y (the gate/up GEMM's output) is read by nothing after this: its gradient goes over it
        _kernels().backward[(y.shape[0],)](grad, y, y.shape[1] // 2, BLOCK=BLOCK)
        return y.view(ctx.shape)


@functools.lru_cache(maxsize=1)
def _kernels() -> Any | None:
    """The two Triton kernels, or None where Triton does not load."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # noqa: BLE001 - no Triton for this torch: the modules keep their forward
        return None

    @triton.jit
    def swiglu_forward(y_ptr, out_ptr, half, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        y_row, out_row = y_ptr + row * 2 * half, out_ptr + row * half
        for start in range(0, half, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < half
            gate = tl.load(y_row + cols, mask=inside, other=0.0).to(tl.float32)
            up = tl.load(y_row + half + cols, mask=inside, other=0.0).to(tl.float32)
            out = gate * tl.sigmoid(gate) * up
            tl.store(out_row + cols, out.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def swiglu_backward(grad_ptr, y_ptr, half, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        y_row, grad_row = y_ptr + row * 2 * half, grad_ptr + row * half
        for start in range(0, half, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < half
            grad = tl.load(grad_row + cols, mask=inside, other=0.0).to(tl.float32)
            gate = tl.load(y_row + cols, mask=inside, other=0.0).to(tl.float32)
            up = tl.load(y_row + half + cols, mask=inside, other=0.0).to(tl.float32)
            sig = tl.sigmoid(gate)
            silu = gate * sig
            d_gate = grad * up * (sig + silu * (1.0 - sig))
            d_up = grad * silu
            tl.store(y_row + cols, d_gate.to(y_ptr.dtype.element_ty), mask=inside)
            tl.store(y_row + half + cols, d_up.to(y_ptr.dtype.element_ty), mask=inside)

    # named for what they do: a profile lists kernels by name
    return SimpleNamespace(forward=swiglu_forward, backward=swiglu_backward)


def fusable(module: nn.Module) -> bool:
    """An MLP of gate_proj, up_proj, down_proj (plain bias-free Linear layers) and a SiLU act_fn."""
    projections = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(module, "act_fn", None)
    return (all(type(p) is nn.Linear and p.bias is None for p in projections)
            and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation")
            and projections[0].weight.shape == projections[1].weight.shape)


def fused_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SwiGLU.apply(F.linear(x, self.gate_up_weight)))


def join_weights(module: nn.Module) -> None:
    """Gate and up weights side by side in one tensor; the two Linear layers keep views of it."""
    gate, up = module.gate_proj, module.up_proj
    if getattr(module, "gate_up_weight", None) is not None:
        return
    joined = torch.cat([gate.weight.detach(), up.weight.detach()])
    half = gate.weight.shape[0]
    gate.weight = nn.Parameter(joined[:half], requires_grad=False)
    up.weight = nn.Parameter(joined[half:], requires_grad=False)
    module.register_buffer("gate_up_weight", joined, persistent=False)


def fuse_mlps(model: Any) -> int:
    """Give the model's fusable MLP modules the fused forward, where checked; how many were changed."""
    if not ENABLED or _kernels() is None:
        return 0
    changed = 0
    for module in model.modules():
        if not type(module).__name__.endswith("MLP") or not fusable(module):
            continue
        weights = [getattr(module, name).weight for name in ("gate_proj", "up_proj", "down_proj")]
        if not weights[0].is_cuda or any(w.requires_grad for w in weights):  # trained MLP weights: its own forward
            continue
        if type(module) not in _CHECKED:
            _CHECKED[type(module)] = _matches_own(module)
        if _CHECKED[type(module)]:
            join_weights(module)
            module.forward = fused_forward.__get__(module)
            changed += 1
    return changed


def _matches_own(module: nn.Module) -> bool:
    """The fused forward and backward against the module's own, on a few rows of random input in the weights'
    dtype (the fused one computes SiLU * up in fp32 and rounds once)."""
    try:
        weight = module.gate_proj.weight
        with torch.inference_mode(False), torch.enable_grad():
            generator = torch.Generator(device=weight.device).manual_seed(0)
            x = torch.randn(1, 37, weight.shape[1], device=weight.device, dtype=weight.dtype, generator=generator)
            upstream = torch.randn(1, 37, weight.shape[1], device=weight.device, dtype=torch.float32,
                                   generator=generator)
            own_in, ours_in = x.clone().requires_grad_(), x.clone().requires_grad_()
            own = type(module).forward(module, own_in)
            (own.float() * upstream).sum().backward()
            joined = torch.cat([module.gate_proj.weight, module.up_proj.weight])
            ours = module.down_proj(SwiGLU.apply(F.linear(ours_in, joined)))
            (ours.float() * upstream).sum().backward()
            pairs = [(ours.float(), own.float()), (ours_in.grad.float(), own_in.grad.float())]
            return all(float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-6)) < 2e-2 for a, b in pairs)
    except Exception:  # noqa: BLE001 - a kernel that fails here is a kernel not to use
        return False
