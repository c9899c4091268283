"""The fused MLP (kernels/fused_mlp.py): which modules it takes, the weights it joins without copying them
twice, and the kernels' forward and backward against the module's own (a GPU, or Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from interpreter import run_interpreted
from gputwin.kernels import fused_mlp
from gputwin.kernels.fused_mlp import fusable, fused_forward, join_weights


def tiny(targets: tuple[str, ...] = ("q_proj", "v_proj"), act: str = "silu", dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, hidden_act=act)
    return get_peft_model(Qwen3ForCausalLM(config).to(dtype), LoraConfig(r=4, target_modules=list(targets)))


def mlps(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("MLP")]


def test_only_plain_silu_mlps_are_taken() -> None:
    assert all(fusable(m) for m in mlps(tiny()))
    assert not any(fusable(m) for m in mlps(tiny(targets=("q_proj", "up_proj"))))  # LoRA on the MLP
    assert not any(fusable(m) for m in mlps(tiny(act="gelu")))


def test_joined_weights_are_views_of_one_tensor_and_change_no_output() -> None:
    mlp = mlps(tiny())[0]
    x = torch.randn(3, 32)
    before = mlp(x)
    join_weights(mlp)
    joined = mlp.gate_up_weight
    assert mlp.gate_proj.weight.data_ptr() == joined.data_ptr()
    assert mlp.up_proj.weight.data_ptr() == joined.data_ptr() + 80 * 32 * joined.element_size()
    assert torch.equal(mlp(x), before)
    join_weights(mlp)  # a second FastStep over the same model: nothing changes
    assert mlp.gate_up_weight is joined


def test_on_the_cpu_no_module_is_changed() -> None:
    model = tiny()
    assert fused_mlp.fuse_mlps(model) == 0
    assert all(m.forward.__func__ is not fused_forward for m in mlps(model) if hasattr(m.forward, "__func__"))


def fused_matches_own() -> None:
    """Run under the interpreter: the fused forward of a tiny Qwen3 MLP against its own, with gradients."""
    fused_mlp.BLOCK = 32  # several blocks to a row of 80
    mlp = mlps(tiny())[0]
    x = torch.randn(2, 5, 32)
    upstream = torch.randn(2, 5, 32)
    own_in, ours_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    own = mlp(own_in)
    (own * upstream).sum().backward()
    join_weights(mlp)
    ours = fused_forward(mlp, ours_in)
    (ours * upstream).sum().backward()
    assert torch.allclose(ours, own, atol=1e-5, rtol=1e-4), (ours - own).abs().max()
    assert torch.allclose(ours_in.grad, own_in.grad, atol=1e-5, rtol=1e-4), (ours_in.grad - own_in.grad).abs().max()
    assert fused_mlp._matches_own(mlps(tiny())[1])  # the check itself passes on a module that matches


def test_the_kernels_give_the_module_s_own_output_and_gradient() -> None:
    run_interpreted("test_fused_mlp", "fused_matches_own")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels run on a GPU")
def test_on_the_gpu_every_mlp_is_fused_and_trains_as_its_own_forward() -> None:
    model = tiny(dtype=torch.bfloat16).cuda()
    x = torch.randn(1, 40, 32, device="cuda", dtype=torch.bfloat16)
    own = model.get_base_model().model.layers[0].mlp(x)
    assert fused_mlp.fuse_mlps(model) == 2
    ours = model.get_base_model().model.layers[0].mlp(x)
    assert float((ours.float() - own.float()).norm() / own.float().norm()) < 2e-2
