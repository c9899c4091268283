"""The cross-entropy kernels (kernels/fused_ce.py) against torch's: loss, gradient, ignored rows, rows that
carry no gradient. The kernels run on a GPU, and on a CPU under Triton's interpreter where Triton is installed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from interpreter import run_interpreted
from gputwin.kernels import fused_ce
from gputwin.kernels.fused_ce import IGNORE_INDEX, TritonCrossEntropy, cross_entropy_rows, gaps_to_torch


def logits_and_targets(device: str, rows: int = 7, vocab: int = 2 * fused_ce.BLOCK + 77,
                       dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(3)
    logits = (torch.randn(rows, vocab, device=device, generator=generator) * 3).to(dtype)
    target = torch.randint(0, vocab, (rows,), device=device, generator=generator)
    target[1] = IGNORE_INDEX
    target[4] = vocab - 1  # the last column, in the last partial block
    return logits, target


def test_on_the_cpu_it_is_torch_s_cross_entropy() -> None:
    logits, target = logits_and_targets("cpu", dtype=torch.float32)
    ours = cross_entropy_rows(logits, target)
    assert torch.equal(ours, F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none"))
    assert ours[1] == 0


def interpreted(check: str) -> None:
    """Run `check` (a function of this module) with the kernels under Triton's interpreter, in small blocks."""
    run_interpreted("test_fused_ce", check, setup="from gputwin.kernels import fused_ce; fused_ce.BLOCK = 64")


def kernels_give_torch_s_loss_and_gradient() -> None:
    logits, target = logits_and_targets("cpu", vocab=2 * 64 + 13, dtype=torch.float32)
    upstream = torch.tensor([1.0, 2.0, -0.5, 0.0, 3.0, 0.25, 1.0])
    loss_gap, grad_gap, grad = gaps_to_torch(logits, target, upstream)
    assert loss_gap < 1e-4 and grad_gap < 1e-5, (loss_gap, grad_gap)
    assert torch.count_nonzero(grad[1]) == 0 and torch.count_nonzero(grad[3]) == 0  # ignored; no gradient


def row_without_gradient_gets_zeros_even_with_nan_logits() -> None:
    logits, target = logits_and_targets("cpu", vocab=2 * 64 + 13, dtype=torch.float32)
    logits[5, 7] = float("nan")  # an arm whose loss is not finite: its rows' gradient is 0
    upstream = torch.ones(7)
    upstream[5] = 0.0
    ours_in = logits.clone().requires_grad_()
    loss = TritonCrossEntropy.apply(ours_in * 1, target)
    assert torch.isnan(loss[5]) and torch.isfinite(loss[[0, 2, 3, 4, 6]]).all()
    (loss.nan_to_num() * upstream).sum().backward()
    assert torch.isfinite(ours_in.grad).all() and torch.count_nonzero(ours_in.grad[5]) == 0


def test_the_kernels_give_torch_s_loss_and_gradient() -> None:
    interpreted("kernels_give_torch_s_loss_and_gradient")


def test_a_row_without_gradient_gets_zeros_even_with_nan_logits() -> None:
    interpreted("row_without_gradient_gets_zeros_even_with_nan_logits")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels run on a GPU")
def test_on_the_gpu_the_kernels_pass_their_check_and_match_torch_in_bf16() -> None:
    assert fused_ce.triton_ce_ok("cuda")
    logits, target = logits_and_targets("cuda", rows=300, vocab=151_936)
    loss_gap, grad_gap, _ = gaps_to_torch(logits, target, torch.rand(300, device="cuda"))
    assert loss_gap < 1e-3 and grad_gap < 1e-2
