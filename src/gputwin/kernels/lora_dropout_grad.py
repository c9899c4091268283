"""A LoRA layer's share of its input's gradient, through its dropout, in one Triton kernel.

With dropout, a LoRA layer adds to its input's gradient the adapter's share, where dropout kept the input:

    grad_x += where(mask, (gh A) / keep, 0)        gh: [tokens, r] (the gradient at dropout(x) A^T), A: [r, in]

torch computes it as a GEMM that writes gh A ([tokens, in]) and an addcmul that reads it back with grad_x and
the mask: in the co-trained seed step on an H100 the addcmul alone took 1.72 of 30.5 ms of kernel time over its
109 layers (bench/RESULTS.md), with the GEMMs on top. Here one kernel reads gh and A (r columns: a few KB), the
mask and grad_x, and writes grad_x; the product is never written. It skips the product's rounding to the
compute dtype, so its sums differ from torch's by that rounding.

keep: one keep probability for every token (a float), or each token's ([tokens, 1]: co-trained arms at their own
rates). Used on a CUDA device where Triton loads and the kernel matched torch there (`check`, once a process for
each dtype, before any graph capture); torch's two kernels otherwise. ENABLED = False keeps torch's (the benches'
A/B).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

ENABLED = True
MAX_RANK = 128  # wider adapters (the ranks of co-trained arms summed) keep torch's kernels
_CHECKED: dict[tuple[str, torch.dtype], bool] = {}  # (device, dtype) -> the kernel matched torch there


def add_(grad_x: torch.Tensor, gh: torch.Tensor, lora_a: torch.Tensor, mask: torch.Tensor,
         keep: float | torch.Tensor) -> None:
    """grad_x += where(mask, (gh @ lora_a) / keep, 0), in place; grad_x and mask [tokens, in], gh [tokens, r]."""
    if _fits(grad_x, gh, lora_a, mask, keep):
        _launch(grad_x, gh, lora_a, mask, keep)
    elif isinstance(keep, torch.Tensor):
        grad_x.add_(torch.where(mask, (gh @ lora_a) / keep.to(gh.dtype), 0.0))
    else:
        grad_x.addcmul_(gh @ lora_a, mask, value=1.0 / keep)


def _fits(grad_x: torch.Tensor, gh: torch.Tensor, lora_a: torch.Tensor, mask: torch.Tensor,
          keep: float | torch.Tensor) -> bool:
    return (ENABLED and grad_x.is_cuda and _CHECKED.get((str(grad_x.device), grad_x.dtype), False)
            and grad_x.dim() == 2 and grad_x.is_contiguous() and gh.is_contiguous() and lora_a.is_contiguous()
            and mask.is_contiguous() and mask.dtype == torch.bool and mask.shape == grad_x.shape
            and gh.dtype == lora_a.dtype == grad_x.dtype and 0 < lora_a.shape[0] <= MAX_RANK
            and (not isinstance(keep, torch.Tensor)
                 or (keep.numel() == grad_x.shape[0] and keep.is_contiguous() and keep.device == grad_x.device)))


def _launch(grad_x: torch.Tensor, gh: torch.Tensor, lora_a: torch.Tensor, mask: torch.Tensor,
            keep: float | torch.Tensor) -> None:
    rows, cols = grad_x.shape
    rank = lora_a.shape[0]
    per_row = isinstance(keep, torch.Tensor)
    block_m, block_n, block_r = 64, 128, max(16, 1 << (rank - 1).bit_length())
    grid = (-(-rows // block_m), -(-cols // block_n))
    _kernel()[grid](grad_x, gh, lora_a, mask, keep if per_row else grad_x, 0.0 if per_row else 1.0 / keep,
                    rows, cols, rank, PER_ROW=per_row, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r)


@functools.lru_cache(maxsize=1)
def _kernel() -> Any | None:
    """The Triton kernel, or None where Triton does not load."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # noqa: BLE001 - no Triton for this torch: torch's kernels run
        return None

    # rows is not specialised on: every step's token count reuses one compiled kernel (no compilation inside a
    # graph capture when a new packed shape comes)
    @triton.jit(do_not_specialize=["rows"])
    def lora_dropout_grad(grad_ptr, gh_ptr, a_ptr, mask_ptr, keep_ptr, scale, rows, cols, rank,
                          PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_R: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, BLOCK_R)
        row_in, col_in, r_in = row < rows, col < cols, r < rank
        gh = tl.load(gh_ptr + row[:, None] * rank + r[None, :], mask=row_in[:, None] & r_in[None, :], other=0.0)
        a = tl.load(a_ptr + r[:, None] * cols + col[None, :], mask=r_in[:, None] & col_in[None, :], other=0.0)
        share = tl.dot(gh, a)  # fp32
        if PER_ROW:
            share = share / tl.load(keep_ptr + row, mask=row_in, other=1.0).to(tl.float32)[:, None]
        else:
            share = share * scale
        inside = row_in[:, None] & col_in[None, :]
        at = row[:, None] * cols + col[None, :]
        kept = tl.load(mask_ptr + at, mask=inside, other=0) != 0
        grad = tl.load(grad_ptr + at, mask=inside, other=0.0).to(tl.float32)
        tl.store(grad_ptr + at, (grad + tl.where(kept, share, 0.0)).to(grad_ptr.dtype.element_ty), mask=inside)

    return lora_dropout_grad


def check(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Check the kernel against torch on this device and dtype (once); True when it matched. Runs work on the
    device: call it before any graph capture."""
    device = torch.device(device)
    if not ENABLED or device.type != "cuda" or _kernel() is None:
        return False
    if device.index is None:  # as a tensor's device reads ("cuda:0"), which is what add_ looks up
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), dtype)
    if key not in _CHECKED:
        _CHECKED[key] = _matches_torch(device, dtype)
    return _CHECKED[key]


def _matches_torch(device: torch.device, dtype: torch.dtype) -> bool:
    """Against torch in fp32 on inputs of `dtype`: token and column counts no block divides, ranks of one adapter
    and of several side by side, one keep rate and each token's."""
    try:
        generator = torch.Generator(device=device).manual_seed(0)
        for rank, per_row in ((8, False), (24, True), (100, False)):
            rows, cols = 203, 344
            grad = torch.randn(rows, cols, device=device, generator=generator).to(dtype)
            gh = torch.randn(rows, rank, device=device, generator=generator).to(dtype)
            lora_a = torch.randn(rank, cols, device=device, generator=generator).to(dtype)
            mask = torch.rand(rows, cols, device=device, generator=generator) < 0.9
            keep: float | torch.Tensor = (torch.rand(rows, 1, device=device, generator=generator) * 0.5 + 0.5
                                          if per_row else 0.9)
            expected = grad.float() + torch.where(mask, (gh.float() @ lora_a.float()) / keep, 0.0)
            ours = grad.clone()
            _launch(ours, gh, lora_a, mask, keep)
            if float((ours.float() - expected).norm() / expected.norm()) >= 1e-2:
                return False
        return True
    except Exception:  # noqa: BLE001 - a kernel that fails here is a kernel not to use
        return False
