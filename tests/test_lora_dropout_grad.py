"""The LoRA dropout's share of x's gradient in one Triton kernel (kernels/lora_dropout_grad.py): when it is taken,
and its sums against torch's (a GPU, or Triton's interpreter on the CPU where Triton is installed)."""

from __future__ import annotations

import pytest
import torch

from interpreter import run_interpreted
from gputwin.kernels import lora_dropout_grad
from gputwin.kernels.fused_lora import LoraLinearFunction
from gputwin.kernels.multi_lora import multi_lora


def inputs(rows: int, cols: int, rank: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
           seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device=device).manual_seed(seed)
    grad = torch.randn(rows, cols, device=device, generator=generator).to(dtype)
    gh = torch.randn(rows, rank, device=device, generator=generator).to(dtype)
    lora_a = torch.randn(rank, cols, device=device, generator=generator).to(dtype)
    mask = torch.rand(rows, cols, device=device, generator=generator) < 0.9
    return grad, gh, lora_a, mask


def test_off_a_gpu_torch_s_kernels_run_unchanged() -> None:
    grad, gh, lora_a, mask = inputs(37, 48, 6)
    ours = grad.clone()
    lora_dropout_grad.add_(ours, gh, lora_a, mask, 0.95)
    assert torch.equal(ours, grad.clone().addcmul_(gh @ lora_a, mask, value=1.0 / 0.95))
    keep = torch.rand(37, 1) * 0.5 + 0.5
    ours = grad.clone()
    lora_dropout_grad.add_(ours, gh, lora_a, mask, keep)
    assert torch.equal(ours, grad + torch.where(mask, (gh @ lora_a) / keep, 0.0))
    assert not lora_dropout_grad.check("cpu")


def kernel_matches_torch() -> None:
    """Under the interpreter: one keep rate and each token's, ranks of one adapter and of several side by side,
    counts no block divides; a mask the kernel ignored would fail."""
    cpu = torch.device("cpu")
    assert lora_dropout_grad._matches_torch(cpu, torch.float32)
    for rank, keep in ((8, 0.9), (24, None)):
        grad, gh, lora_a, mask = inputs(70, 150, rank, seed=rank)
        rate = torch.rand(70, 1) * 0.5 + 0.5 if keep is None else keep
        ours = grad.clone()
        lora_dropout_grad._launch(ours, gh, lora_a, mask, rate)
        expected = grad + torch.where(mask, (gh @ lora_a) / rate, 0.0)
        assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4), float((ours - expected).abs().max())
        unmasked = grad + (gh @ lora_a) / rate
        assert not torch.allclose(ours, unmasked, atol=1e-2)


def test_the_kernel_gives_torch_s_sums() -> None:
    run_interpreted("test_lora_dropout_grad", "kernel_matches_torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel runs on a GPU")
def test_on_the_gpu_lora_layers_with_dropout_take_the_kernel_and_give_torch_s_gradients() -> None:
    assert lora_dropout_grad.check("cuda", torch.bfloat16)  # "cuda": the current device, as tensors name it
    grad, gh, lora_a, mask = inputs(300, 96, 8, device="cuda", dtype=torch.bfloat16)
    assert lora_dropout_grad._fits(grad, gh, lora_a, mask, 0.9)  # the layers below take the kernel
    torch.manual_seed(0)
    x = torch.randn(300, 96, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(80, 96, device="cuda", dtype=torch.bfloat16) / 10
    lora_a = torch.randn(8, 96, device="cuda", requires_grad=True)
    lora_b = torch.randn(80, 8, device="cuda", requires_grad=True)
    upstream = torch.randn(300, 80, device="cuda", dtype=torch.bfloat16)

    def x_grad(kernel: bool, function: str) -> torch.Tensor:
        lora_dropout_grad.ENABLED = kernel
        try:
            torch.manual_seed(1)  # the same dropout mask both times
            leaf = x.clone().requires_grad_()
            if function == "one":
                out = LoraLinearFunction.apply(leaf, weight, None, lora_a, lora_b, 2.0, 0.1)
            else:
                own = torch.ones(300, 8, dtype=torch.bool, device="cuda")
                scale = torch.full((8,), 2.0, device="cuda", dtype=torch.bfloat16)
                out = multi_lora(leaf, weight, None, own, scale, 0.9, [lora_a], [lora_b])
            (out * upstream).float().sum().backward()
            return leaf.grad.float()
        finally:
            lora_dropout_grad.ENABLED = True

    for function in ("one", "multi"):
        ours, theirs = x_grad(True, function), x_grad(False, function)
        assert float((ours - theirs).norm() / theirs.norm()) < 1e-2, function
