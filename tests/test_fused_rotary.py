"""The rotary function computes what HF's apply_rotary_pos_emb computes, forward and backward."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen3 import modeling_qwen3

from counting import count_applies

from gputwin.train.fast import FastStep

from gputwin.train.packing import answer_only_loss, pack
from gputwin.kernels.fused_rotary import RotaryFunction, apply_rotary, fused_rotary, rotary_modules


def rope_inputs(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    # q and k as HF passes them: [B, H, T, D] views of [B, T, H, D] tensors
    q = torch.randn(2, 7, 4, 16, generator=generator, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 7, 2, 16, generator=generator, dtype=dtype).transpose(1, 2).requires_grad_()
    angles = torch.rand(2, 7, 8, generator=generator, dtype=dtype) * 6
    angles = torch.cat((angles, angles), dim=-1)
    return q, k, angles.cos(), angles.sin()


def test_forward_and_backward_equal_hf() -> None:
    q, k, cos, sin = rope_inputs()
    ours = apply_rotary(q, k, cos, sin)
    upstream = [torch.randn_like(t) for t in ours]
    torch.autograd.backward(ours, upstream)
    ours_grads = [q.grad.clone(), k.grad.clone()]
    q.grad = k.grad = None
    theirs = modeling_qwen3.apply_rotary_pos_emb(q, k, cos, sin)
    torch.autograd.backward(theirs, upstream)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours_grads, [q.grad, k.grad])


def test_a_new_sin_is_not_served_from_the_last_one() -> None:
    q, k, cos, sin = rope_inputs()
    apply_rotary(q, k, cos, sin)
    q2, k2, cos2, sin2 = (t.detach() * 0.5 for t in (q, k, cos, sin))
    theirs = modeling_qwen3.apply_rotary_pos_emb(q2, k2, cos2, sin2)
    for a, b in zip(apply_rotary(q2, k2, cos2, sin2), theirs):
        torch.testing.assert_close(a, b)


def test_functions_that_compute_something_else_are_left_alone() -> None:
    def interleaved(q, k, cos, sin, unsqueeze_dim=1):  # GPT-J style pairs: not what apply_rotary computes
        def rot(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    from gputwin.kernels import fused_rotary as module

    assert module._same_as_ours(modeling_qwen3.apply_rotary_pos_emb)
    assert not module._same_as_ours(interleaved)
    q, k, cos, sin = rope_inputs()
    with pytest.raises(ValueError):
        apply_rotary(q, k, cos[..., :8], sin[..., :8])  # partial rotary: the model's own function handles it
    learned = sin.clone().requires_grad_()  # a sin that wants a gradient goes to the model's own function
    out = apply_rotary(q, k, cos, learned, fallback=modeling_qwen3.apply_rotary_pos_emb)
    out[0].sum().backward()
    assert learned.grad is not None


def test_fused_rotary_swaps_the_function_only_inside_the_block() -> None:
    config = Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = Qwen3ForCausalLM(config)
    modules = rotary_modules(model)
    assert modules == [sys.modules[modeling_qwen3.__name__]]
    original = modeling_qwen3.apply_rotary_pos_emb
    with fused_rotary(modules):
        swapped = modeling_qwen3.apply_rotary_pos_emb
        assert swapped is not original
    assert modeling_qwen3.apply_rotary_pos_emb is original
    with fused_rotary(modules):  # the same object each time (what torch.compile's guards look at)
        assert modeling_qwen3.apply_rotary_pos_emb is swapped
    with pytest.raises(RuntimeError), fused_rotary(modules):
        raise RuntimeError("a failing forward")
    assert modeling_qwen3.apply_rotary_pos_emb is original


def test_fast_steps_with_fused_rotary_follow_the_plain_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_applies(monkeypatch, RotaryFunction)
    rows = []
    generator = torch.Generator().manual_seed(2)
    for _ in range(4):
        ids = torch.randint(1, 96, (int(torch.randint(8, 30, (1,), generator=generator)),), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (len(ids) // 2) + ids[len(ids) // 2:]})
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        config = Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        model = Qwen3ForCausalLM(config)
        step = FastStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), grad_clip=1.0, fused_rope=fused)
        assert len(step.rotary_modules) == (1 if fused else 0)
        runs.append([float(step(pack(rows, bucket=16)).loss) for _ in range(3)])
        assert calls[0] == (3 * 2 * 2 if fused else 0)  # steps x layers x (q, k)
        assert answer_only_loss(model, pack(rows, bucket=16)).isfinite()
    for a, b in zip(*runs):
        assert abs(a - b) < 1e-5


def test_without_liger_kernel_or_a_gpu_the_roll_path_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from gputwin.kernels import fused_rotary as module

    assert module.triton_rope("cpu") is None or torch.cuda.is_available()
    monkeypatch.setattr(module, "TRITON", False)
    assert module.triton_rope("cuda") is None  # switched off: the roll path, whatever is installed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="liger-kernel's Triton RoPE runs on a GPU")
def test_triton_rope_on_the_gpu_computes_what_the_roll_path_does() -> None:
    """At the seed's shapes (16 query and 8 K/V heads of 128, a packed row of 512 tokens), bf16, forward and
    backward, against HF's function in fp32."""
    from gputwin.kernels.fused_rotary import liger_rope_function, triton_rope

    if liger_rope_function() is None:
        pytest.skip("liger-kernel is not installed (pip install 'gputwin[gpu]')")

    assert triton_rope("cuda") is not None, "installed, but it failed its check on this GPU"
    generator = torch.Generator(device="cuda").manual_seed(0)
    leaves = [torch.randn(1, 512, heads, 128, device="cuda", generator=generator, dtype=torch.bfloat16).requires_grad_()
              for heads in (16, 8)]
    angles = torch.rand(1, 512, 64, device="cuda", generator=generator) * 6
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    upstream = [torch.randn(1, heads, 512, 128, device="cuda", generator=generator) for heads in (16, 8)]
    out = apply_rotary(*((x * 1).transpose(1, 2) for x in leaves), cos, sin)  # the Triton kernel, in place
    sum((o.float() * u).sum() for o, u in zip(out, upstream)).backward()
    ref_leaves = [x.detach().float().requires_grad_() for x in leaves]
    ref = modeling_qwen3.apply_rotary_pos_emb(*(x.transpose(1, 2) for x in ref_leaves), cos.float(), sin.float())
    sum((o * u).sum() for o, u in zip(ref, upstream)).backward()
    for got, want in [*zip(out, ref), *((a.grad, b.grad) for a, b in zip(leaves, ref_leaves))]:
        assert float((got.float() - want.float()).norm() / want.float().norm()) < 1e-2


def test_liger_s_rope_loads_from_its_file_without_the_package_s_init(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its __init__ imports every op it has (seconds of a trainer's start-up); only ops/rope.py is loaded."""
    from gputwin.kernels import fused_rotary as module

    (tmp_path / "liger_kernel" / "ops").mkdir(parents=True)
    (tmp_path / "liger_kernel" / "__init__.py").write_text("raise RuntimeError('the package init ran')\n")
    (tmp_path / "liger_kernel" / "ops" / "rope.py").write_text("class LigerRopeFunction:\n    loaded = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "liger_kernel", raising=False)
    module.liger_rope_function.cache_clear()
    found = module.liger_rope_function()
    assert found is not None and found.loaded and "liger_kernel" not in sys.modules
    (tmp_path / "liger_kernel" / "ops" / "rope.py").write_text("import triton_that_is_not_here\n")
    monkeypatch.delitem(sys.modules, "gputwin.kernels._liger_rope", raising=False)
    module.liger_rope_function.cache_clear()
    assert module.liger_rope_function() is None  # does not load here: the roll path
    assert "gputwin.kernels._liger_rope" not in sys.modules
    module.liger_rope_function.cache_clear()  # the next test finds what is installed
