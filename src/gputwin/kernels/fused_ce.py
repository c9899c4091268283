"""Cross-entropy over the vocabulary for the label rows of a step, in two Triton kernels.

At Qwen3's 151,936-token vocabulary the loss over a step's label rows is a large share of its memory
traffic: torch's path casts the bf16 logits to fp32 (a copy twice their size), runs a softmax forward
over them, and backward a softmax gradient in fp32, then casts it back to bf16 for lm_head's backward.
In a co-trained step (about 1,000 label rows) the two softmax kernels alone took 1.7 ms of 32.5
(bench/RESULTS.md, "Where the co-trained step's time goes").

Here the forward reads each bf16 row once (an online log-sum-exp in fp32) and keeps only the row's
log-sum-exp; the backward reads the row again and writes (softmax - one-hot) times the row's gradient
straight into the logits' buffer in bf16, which lm_head's backward reads. No fp32 copy of the logits
is made, and the gradient weighting (1 / label count, an arm's share) is applied in the same pass.

cross_entropy_rows(logits, target) is F.cross_entropy(logits.float(), target, reduction="none",
ignore_index=-100) (0 where the target is ignored). It uses the kernels on a CUDA device where Triton
loads and the kernels compute what torch does (checked once a process, forward and backward:
`triton_ce_ok`), and torch's path elsewhere. A row whose gradient is 0 (an ignored target, an arm whose
loss is not finite) gets a zero gradient, never NaN.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
BLOCK = 4096  # vocabulary columns a program reads at a time
_CHECKED: dict[str, bool] = {}  # device -> the kernels passed triton_ce_ok there
ENABLED = True  # False: torch's path everywhere (the benches' A/B)


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy in fp32 ([rows]); 0 where target is IGNORE_INDEX. logits: [rows, vocab]."""
    if logits.is_cuda and logits.dim() == 2 and logits.shape[0] > 0 and triton_ce_ok(logits.device):
        return TritonCrossEntropy.apply(logits, target)
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="none")


def triton_ce_ok(device: torch.device | str) -> bool:
    """The kernels load here and match torch's cross-entropy, forward and backward (checked once)."""
    key = str(torch.device(device))
    if not ENABLED:
        return False
    if key not in _CHECKED:
        _CHECKED[key] = False  # a check that raises leaves it off
        _CHECKED[key] = _kernels() is not None and _matches_torch(key)
    return _CHECKED[key]


class TritonCrossEntropy(torch.autograd.Function):
    """Forward: per-row loss and log-sum-exp. Backward: the logits' gradient written over the logits."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kernels = _kernels()
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        rows, vocab = logits.shape
        loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        kernels.forward[(rows,)](logits, logits.stride(0), target, loss, lse, vocab, IGNORE_INDEX, BLOCK=BLOCK)
        ctx.save_for_backward(logits, target, lse)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, target, lse = ctx.saved_tensors
        rows, vocab = logits.shape
        grad = grad_loss.float().contiguous()
        # the gradient goes over the logits, which nothing reads after this (lm_head's backward needs only
        # its weight and this gradient): no second [rows, vocab] buffer
        _kernels().backward[(rows,)](logits, logits.stride(0), target, lse, grad, vocab, IGNORE_INDEX, BLOCK=BLOCK)
        return logits, None


@functools.lru_cache(maxsize=1)
def _kernels() -> Any | None:
    """The two Triton kernels, or None where Triton does not load."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # noqa: BLE001 - no Triton for this torch: torch's path
        return None

    @triton.jit
    def forward(logits_ptr, stride, target_ptr, loss_ptr, lse_ptr, vocab, ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        m = float("-inf")
        s = 0.0
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), 0)
            m = new_m
        lse = m + tl.log(s)
        target = tl.load(target_ptr + row)
        valid = target != ignore_index
        picked = tl.load(base + tl.where(valid, target, 0)).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def backward(logits_ptr, stride, target_ptr, lse_ptr, grad_ptr, vocab, ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        target = tl.load(target_ptr + row)
        lse = tl.load(lse_ptr + row)
        scale = tl.where(target != ignore_index, tl.load(grad_ptr + row), 0.0)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < vocab
            x = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
            d = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
            d = tl.where(scale != 0.0, d, 0.0)  # no NaN from a row that carries no gradient
            tl.store(base + cols, d.to(logits_ptr.dtype.element_ty), mask=inside)

    return SimpleNamespace(forward=forward, backward=backward)


def _matches_torch(device: str) -> bool:
    """Loss and gradient against torch's fp32 cross-entropy on bf16 logits with an ignored row, a vocabulary
    that is not a multiple of BLOCK, and row gradients of both signs and a zero."""
    try:
        with torch.inference_mode(False), torch.enable_grad():
            generator = torch.Generator(device=device).manual_seed(0)
            rows, vocab = 6, 2 * BLOCK + 123
            logits = (torch.randn(rows, vocab, device=device, generator=generator) * 4).to(torch.bfloat16)
            target = torch.randint(0, vocab, (rows,), device=device, generator=generator)
            target[2] = IGNORE_INDEX
            upstream = torch.tensor([1.0, -0.5, 3.0, 0.0, 0.25, 2.0], device=device)
            loss_gap, grad_gap, grad = gaps_to_torch(logits, target, upstream)
            return loss_gap < 1e-3 and grad_gap < 1e-2 and bool(torch.isfinite(grad.float()).all())
    except Exception:  # noqa: BLE001 - a kernel that fails here is a kernel not to use
        return False


def gaps_to_torch(logits: torch.Tensor, target: torch.Tensor, upstream: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """The kernels' loss and gradient (for `upstream` row gradients) against torch's fp32 cross-entropy: the
    largest loss difference, the gradient's relative difference, and the kernels' gradient."""
    ours_in = logits.clone().requires_grad_()
    ours = TritonCrossEntropy.apply(ours_in * 1, target)  # * 1: the kernel writes over its input
    (ours * upstream).sum().backward()
    ref_in = logits.float().requires_grad_()
    ref = F.cross_entropy(ref_in, target, ignore_index=IGNORE_INDEX, reduction="none")
    (ref * upstream).sum().backward()
    loss_gap = float((ours.detach() - ref.detach()).abs().max())
    grad_gap = float((ours_in.grad.float() - ref_in.grad).norm() / ref_in.grad.norm())
    return loss_gap, grad_gap, ours_in.grad
