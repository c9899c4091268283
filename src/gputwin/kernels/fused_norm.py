"""RMSNorm in one Triton kernel forward and one backward, for frozen norm weights.

torch's fused rms_norm (what decoder.fuse_rms_norms gives the model's RMSNorm modules) runs its layer-norm
kernels: in the co-trained seed step on an H100 they took 2.9 of 30.5 ms of kernel time for the step's 113 norms
(bench/RESULTS.md), three to four times what reading and writing their tensors takes. Qwen3 has four norms
a layer, two over the hidden size and two over each head (q_norm, k_norm: rows of 128). Here a program takes
a block of rows (8 of 1,024, 64 of 128):

    forward    y = x * r * w,  r = 1 / sqrt(mean(x^2) + eps)       (fp32 inside, rounded once; r kept)
    backward   dx = r * u - x * r^3 * mean(u * x),  u = dy * w       (no weight gradient: LoRA freezes it)

the same maths as torch's rms_norm. A weight that trains (requires_grad) keeps torch's kernel.

Used in training steps on a CUDA device where Triton loads and the kernels match torch's rms_norm there, forward
and backward (`check`, once a process for each row width of the model, before any graph capture). Inference
keeps torch's kernel. ENABLED = False keeps torch's kernel everywhere (the benches' A/B).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

ENABLED = True
ELEMENTS = 8192  # elements a program handles: rows of 1,024 take 8 rows a program, rows of 128 take 64
_CHECKED: dict[tuple[str, int], bool] = {}  # (device, row width) -> the kernels matched torch's rms_norm there


def _blocks(width: int) -> tuple[int, int]:
    """(rows a program, the row's padded width) for rows of `width` elements."""
    padded = 1 << max(0, width - 1).bit_length()
    return max(1, min(128, ELEMENTS // padded)), padded


class RMSNormFunction(torch.autograd.Function):
    """rms_norm(x, (width,), weight, eps) with the statistics in fp32; no gradient for weight."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, rows, rstd = _forward(x, weight, eps)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.shape = x.shape
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        rows, weight, rstd = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        width = rows.shape[1]
        grad_rows = grad.reshape(-1, width)
        if not grad_rows.is_contiguous():
            grad_rows = grad_rows.contiguous()
        grad_x = torch.empty_like(rows)
        block_rows, block_cols = _blocks(width)
        grid = (_cdiv(rows.shape[0], block_rows),)
        _kernels().backward[grid](grad_rows, rows, weight, rstd, grad_x, rows.shape[0], width,
                                  BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)
        return grad_x.view(ctx.shape), None, None


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the output in x's shape, x as contiguous rows, each row's 1 / rms)."""
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    out = torch.empty_like(rows)
    rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    block_rows, block_cols = _blocks(width)
    _kernels().forward[(_cdiv(rows.shape[0], block_rows),)](
        rows, weight, out, rstd, rows.shape[0], width, eps, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)
    return out.view(x.shape), rows, rstd


def _cdiv(n: int, d: int) -> int:
    return -(-n // d)


@functools.lru_cache(maxsize=1)
def _kernels() -> Any | None:
    """The two Triton kernels, or None where Triton does not load."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # noqa: BLE001 - no Triton for this torch: torch's rms_norm runs
        return None

    # n_rows is not specialised on: every step's row count reuses one compiled kernel (no compilation inside
    # a graph capture when a new packed shape comes)
    @triton.jit(do_not_specialize=["n_rows"])
    def rms_norm_forward(x_ptr, w_ptr, out_ptr, rstd_ptr, n_rows, width, eps,
                         BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_COLS)
        row_in, col_in = rows < n_rows, cols < width
        inside = row_in[:, None] & col_in[None, :]
        offsets = rows[:, None] * width + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / width + eps)
        w = tl.load(w_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, (x * r[:, None] * w[None, :]).to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(rstd_ptr + rows, r, mask=row_in)

    @triton.jit(do_not_specialize=["n_rows"])
    def rms_norm_backward(grad_ptr, x_ptr, w_ptr, rstd_ptr, grad_x_ptr, n_rows, width,
                          BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_COLS)
        row_in, col_in = rows < n_rows, cols < width
        inside = row_in[:, None] & col_in[None, :]
        offsets = rows[:, None] * width + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
        r = tl.load(rstd_ptr + rows, mask=row_in, other=0.0)
        u = g * w[None, :]
        dot = tl.sum(u * x, axis=1) / width
        grad_x = u * r[:, None] - x * (r * r * r * dot)[:, None]
        tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=inside)

    # named for what they do: a profile lists kernels by name
    return SimpleNamespace(forward=rms_norm_forward, backward=rms_norm_backward)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm over the last dim: the Triton kernels in a training step (gradients on) where checked for this
    device and row width and the weight is frozen; torch's kernel otherwise. Inference (validation's prefill and
    decode) keeps torch's: the seed's validations ran slower with the Triton kernels (bench/RESULTS.md)."""
    if (ENABLED and torch.is_grad_enabled() and x.is_cuda and not weight.requires_grad and x.dtype == weight.dtype
            and _CHECKED.get((str(x.device), x.shape[-1]))):
        return RMSNormFunction.apply(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def describe(device: torch.device | str) -> str:
    """Which kernel the frozen norms on this device run, for the started event ("" off a GPU)."""
    results = [ok for (where, _), ok in _CHECKED.items() if where == str(torch.device(device))]
    if torch.device(device).type != "cuda":
        return ""
    if results and all(results) and ENABLED:
        return "frozen norms on gputwin's Triton kernels"
    if results:
        return "torch's kernel (gputwin's Triton kernels failed their check on this GPU)"
    return "torch's kernel"


def check(device: torch.device | str, widths: Sequence[int], dtype: torch.dtype = torch.bfloat16) -> bool:
    """Check the kernels against torch's rms_norm on this device for these row widths (once each); True when
    every width passed. Runs work on the device: call it before any graph capture (decoder.fuse_rms_norms)."""
    device = torch.device(device)
    if not ENABLED or device.type != "cuda" or _kernels() is None:
        return False
    for width in widths:
        key = (str(device), int(width))
        if key not in _CHECKED:
            _CHECKED[key] = _matches_torch(device, int(width), dtype)
    return all(_CHECKED[(str(device), int(w))] for w in widths)


def _matches_torch(device: torch.device, width: int, dtype: torch.dtype,
                   reference: Callable[..., torch.Tensor] | None = None) -> bool:
    """Forward and backward against torch's rms_norm in fp32 on inputs of `dtype`: rows of a count that no
    block size divides, an input that is a strided view, and a weight away from 1."""
    reference = reference or (lambda x, w, eps: F.rms_norm(x, (x.shape[-1],), w, eps))
    try:
        with torch.inference_mode(False), torch.enable_grad():
            generator = torch.Generator(device=device).manual_seed(0)
            base = torch.randn(3, 45, 2 * width, device=device, dtype=dtype, generator=generator) * 3
            weight = (1 + torch.randn(width, device=device, generator=generator) * 0.5).to(dtype)
            upstream = torch.randn(3, 45, width, device=device, generator=generator)
            leaf = base.clone().requires_grad_()
            ours = RMSNormFunction.apply(leaf[..., :width], weight, 1e-6)  # a strided view, as a head's norm may get
            (ours.float() * upstream).sum().backward()
            ref_in = base[..., :width].float().requires_grad_()
            ref = reference(ref_in, weight.float(), 1e-6)
            (ref * upstream).sum().backward()
            pairs = [(ours.detach().float(), ref.detach()), (leaf.grad[..., :width].float(), ref_in.grad)]
            return all(float((a - b).norm() / b.norm().clamp_min(1e-6)) < 1e-2 for a, b in pairs)
    except Exception:  # noqa: BLE001 - a kernel that fails here is a kernel not to use
        return False
