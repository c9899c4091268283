"""The Triton RMSNorm (kernels/fused_norm.py): when it is taken, and its forward and backward against torch's
rms_norm (a GPU, or Triton's interpreter on the CPU where Triton is installed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM

from interpreter import run_interpreted
from gputwin.kernels import fused_norm
from gputwin.kernels.decoder import fuse_rms_norms
from gputwin.kernels.fastpaths import norm_status


def tiny(dtype: torch.dtype = torch.float32) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return Qwen3ForCausalLM(config).to(dtype)


def test_off_a_gpu_torch_s_kernel_runs_unchanged() -> None:
    x, weight = torch.randn(5, 32), torch.randn(32)
    assert torch.equal(fused_norm.rms_norm(x, weight, 1e-6), F.rms_norm(x, (32,), weight, 1e-6))
    assert not fused_norm.check("cpu", [32])
    assert fused_norm.describe("cpu") == ""
    model = tiny().requires_grad_(False)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    before = model(ids).logits
    assert fuse_rms_norms(model) == 2 * 4 + 1  # four norms a Qwen3 layer, and the final one
    assert torch.allclose(model(ids).logits, before, atol=1e-5)
    assert "checked against torch's rms_norm" in norm_status(model)["why"]


def test_blocks_cover_a_row_and_keep_a_program_s_size() -> None:
    assert fused_norm._blocks(1024) == (8, 1024)
    assert fused_norm._blocks(128) == (64, 128)
    assert fused_norm._blocks(80) == (64, 128)   # a width that is no power of two: masked columns
    assert fused_norm._blocks(16384) == (1, 16384)


def kernels_match_torch() -> None:
    """Under the interpreter: forward (training and inference) and input gradient against torch's rms_norm,
    on widths with and without masked columns, and a row count no block divides."""
    for width in (128, 80, 1024):
        assert fused_norm._matches_torch(torch.device("cpu"), width, torch.float32), width
    # against something else (the weight left out) the check fails
    assert not fused_norm._matches_torch(torch.device("cpu"), 128, torch.float32,
                                         reference=lambda x, w, eps: F.rms_norm(x, (x.shape[-1],), None, eps))


def test_the_kernels_give_torch_s_output_and_gradient() -> None:
    run_interpreted("test_fused_norm", "kernels_match_torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels run on a GPU")
def test_on_the_gpu_frozen_norms_take_the_kernels_and_train_as_torch_s() -> None:
    model = tiny(torch.bfloat16).cuda().requires_grad_(False)
    ids = torch.randint(0, 64, (2, 37), device="cuda")
    embeds = model.model.embed_tokens(ids).detach()
    reference_in = embeds.clone().requires_grad_()
    reference = model(inputs_embeds=reference_in).logits.float()
    reference.square().sum().backward()
    fuse_rms_norms(model)
    assert fused_norm.check("cuda", [32, 8], torch.bfloat16)
    assert "Triton" in norm_status(model)["why"]
    ours_in = embeds.clone().requires_grad_()
    ours = model(inputs_embeds=ours_in).logits.float()
    ours.square().sum().backward()
    assert float((ours - reference).norm() / reference.norm()) < 2e-2
    assert float((ours_in.grad - reference_in.grad).float().norm() / reference_in.grad.float().norm()) < 3e-2
    norm = model.model.norm
    hidden = torch.randn(3, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():  # inference (validation) keeps torch's kernel
        assert torch.equal(norm(hidden), F.rms_norm(hidden, (32,), norm.weight, norm.variance_epsilon))
    norm.weight.requires_grad_(True)  # a trained norm weight: torch's kernel, with its gradient
    norm(hidden).float().sum().backward()
    assert norm.weight.grad is not None
