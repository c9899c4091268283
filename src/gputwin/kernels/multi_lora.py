"""Several LoRA adapters on one frozen Linear, each on its own tokens: the co-trained step's layer in few kernels.

In a co-trained step (train/cofast.py) one packed row holds several arms' tokens, and every LoRA layer adds
each arm's adapter to that arm's tokens only. MultiLoraFunction puts the adapters side by side,
A = [A_1; A_2; ...] ([R, in], R the ranks summed) and B = [B_1 B_2 ...] ([out, R]), and computes

    h = dropout(x) A^T               [tokens, R]: every adapter's down-projection in one GEMM
    h = where(own, h * scale, 0)     each token keeps its own arm's columns (scale: each column's alpha/r)
    y = x W^T (+ bias) + h B^T       the adapters' share added inside the base's output GEMM

where own[t, c] says that column c belongs to token t's arm. The cost over one adapter is a handful of
kernels on [tokens, R] tensors, whatever the number of arms; the per-arm alternative (each adapter over the
whole row, masked) costs a dozen kernels over [tokens, hidden] per arm and layer.

Arms stay apart. `own` is applied with where (a selection, never a product with 0), so a token's output
and its input gradient see only its own arm's columns; the adapters' weights enter the GEMMs with
non-finite values zeroed (an arm whose weights hold NaN is failed by the step, which checks them), so
another arm's NaN cannot reach a row through them. Each arm's weight gradient sums its own tokens' rows
and zeros from the others; should another arm's *activations* overflow to inf (with finite weights and
bf16's fp32 range, a loss diverging past 3e38), that sum turns non-finite and the step skips this arm's
update too (found_inf), so nothing is corrupted either way.

Dropout is one mask over x shared by the adapters, each token's at its own arm's rate: every token meets
only its own adapter, so this is each arm's own dropout, drawn from one random stream.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from . import lora_dropout_grad

__all__ = ["ALIGN", "MultiLoraFunction", "multi_lora"]

# The adapters' columns side by side are padded with zero columns to a multiple of this: a [tokens, R] bf16
# operand whose rows are a multiple of 16 bytes long takes cuBLAS's aligned tensor-core kernels (the seed's
# r8 + r12 = 20 columns would be 40-byte rows). 1: no padding.
ALIGN = 8


class MultiLoraFunction(torch.autograd.Function):
    """y = x W^T (+ bias) + where(own, dropout(x) A^T * scale, 0) B^T, with A, B the adapters side by side.

    Inputs after the fixed ones: each adapter's A ([r_i, in]) then each adapter's B ([out, r_i]), any dtype
    (cast to x's); their gradients come back in their own dtypes. keep: None (no dropout), a float (one
    rate for every token) or a [tokens, 1] tensor of each token's keep probability. own and scale may be
    wider than the ranks summed: the columns past them are padding (own False, scale 0), zeros in A and B."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, own: torch.Tensor,
                scale: torch.Tensor, keep: float | torch.Tensor | None, *adapters: torch.Tensor) -> torch.Tensor:
        n = len(adapters) // 2
        flat = x.reshape(-1, x.shape[-1])
        split = [t.shape[0] for t in adapters[:n]]
        pad = own.shape[1] - sum(split)
        lora_a, lora_b = [t.to(x.dtype) for t in adapters[:n]], [t.to(x.dtype) for t in adapters[n:]]
        if pad:
            lora_a.append(x.new_zeros(pad, x.shape[-1]))
            lora_b.append(x.new_zeros(weight.shape[0], pad))
        a = torch.nan_to_num(torch.cat(lora_a), nan=0.0, posinf=0.0, neginf=0.0)        # [R, in]
        b = torch.nan_to_num(torch.cat(lora_b, dim=1), nan=0.0, posinf=0.0, neginf=0.0)  # [out, R]
        mask = None
        if isinstance(keep, torch.Tensor):  # each token at its own arm's rate
            mask = torch.rand(flat.shape, device=flat.device) < keep
            dropped = torch.where(mask, flat / keep.to(flat.dtype), 0.0)
        elif keep is not None and keep < 1.0:
            dropped, mask = torch.native_dropout(flat, 1.0 - keep, True)
        else:
            dropped = flat
        h = torch.where(own, (dropped @ a.t()).mul_(scale), 0.0)                                       # [tokens, R]
        y = torch.addmm(bias, flat, weight.t()) if bias is not None else flat @ weight.t()
        y.addmm_(h, b.t())
        ctx.save_for_backward(dropped, weight, a, b, h, own, scale, mask, keep if isinstance(keep, torch.Tensor) else None)
        ctx.keep = keep if not isinstance(keep, torch.Tensor) else None
        ctx.x_shape, ctx.split, ctx.pad = x.shape, split, pad
        ctx.dtypes = [t.dtype for t in adapters]
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        dropped, weight, a, b, h, own, scale, mask, keep_tokens = ctx.saved_tensors
        need_x, _, need_bias = ctx.needs_input_grad[:3]
        g = grad.reshape(-1, grad.shape[-1])
        gh = torch.where(own, (g @ b).mul_(scale), 0.0)  # d loss / d (dropout(x) A^T), [tokens, R]
        grad_x = grad_bias = None
        if need_x:
            grad_x = g @ weight
            if mask is None:
                grad_x.addmm_(gh, a)
            else:  # where dropout kept x: in one kernel where checked (kernels/lora_dropout_grad.py)
                lora_dropout_grad.add_(grad_x, gh, a, mask, keep_tokens if keep_tokens is not None else ctx.keep)
            grad_x = grad_x.view(ctx.x_shape)
        if need_bias:
            grad_bias = g.sum(0)
        grad_a = gh.t() @ dropped  # [R, in]: each arm's rows sum its own tokens only (gh is 0 elsewhere)
        grad_b = g.t() @ h         # [out, R]: likewise (h is 0 elsewhere)
        n = len(ctx.split)
        split = [*ctx.split, ctx.pad]  # the padding's gradient is dropped
        grads_a = [part.to(dtype) for part, dtype in zip(grad_a.split(split), ctx.dtypes[:n])]
        grads_b = [part.to(dtype) for part, dtype in zip(grad_b.split(split, dim=1), ctx.dtypes[n:])]
        return (grad_x, None, grad_bias, None, None, None, *grads_a, *grads_b)


def multi_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, own: torch.Tensor,
               scale: torch.Tensor, keep: float | torch.Tensor | None,
               lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor]) -> torch.Tensor:
    """MultiLoraFunction with the adapters as two lists (A's, B's, in the same order as own's columns)."""
    return MultiLoraFunction.apply(x, weight, bias, own, scale, keep, *lora_a, *lora_b)
