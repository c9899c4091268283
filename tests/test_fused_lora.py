"""Fused LoRA layers compute what peft's LoRA Linear computes, forward and backward, and step for step."""

from __future__ import annotations

import collections

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen3Config, Qwen3ForCausalLM

from counting import count_applies

from gputwin.kernels import fused_lora
from gputwin.train.fast import FastStep
from gputwin.train.packing import answer_only_loss, pack
from gputwin.kernels.fused_lora import LoraLinearFunction, fuse_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_model(*, dropout: float = 0.0, alpha: int = 12, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    model = get_peft_model(Qwen3ForCausalLM(config), LoraConfig(r=4, lora_alpha=alpha, lora_dropout=dropout,
                                                                target_modules=TARGETS))
    with torch.no_grad():  # a non-zero adapter, so LoRA takes part in every check
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model


def batch(seed: int = 1) -> object:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(4):
        ids = torch.randint(1, 96, (int(torch.randint(8, 30, (1,), generator=generator)),), generator=generator).tolist()
        cut = len(ids) * 2 // 3
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return pack(rows, bucket=16)


def loss_and_grads(model: torch.nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    loss = answer_only_loss(model, batch())
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_layers_give_peft_loss_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    plain_loss, plain = loss_and_grads(tiny_model())
    model = tiny_model()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fuse_lora(model) == 2 * len(TARGETS)
    assert fuse_lora(model) == 2 * len(TARGETS)  # again: nothing wrapped twice
    calls = count_applies(monkeypatch, LoraLinearFunction)
    fused_loss, fused = loss_and_grads(model)
    assert calls[0] == 2 * len(TARGETS)
    assert abs(fused_loss - plain_loss) < 1e-5
    for name, grad in plain.items():
        torch.testing.assert_close(fused[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    state_after = model.state_dict()  # what checkpoints save is untouched
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_function_matches_autograd_of_the_same_maths(dropout: float, with_bias: bool) -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(12, 16, dtype=torch.float64)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True) if with_bias else None
    lora_a = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    leaves = [t for t in (x, bias, lora_a, lora_b) if t is not None]
    torch.manual_seed(7)
    out = LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, 1.5, dropout)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    fused = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    torch.manual_seed(7)  # the same draw gives the same mask
    flat = x.reshape(-1, 16)
    dropped = torch.native_dropout(flat, dropout, True)[0] if dropout else flat
    expected = flat @ weight.t() + 1.5 * (dropped @ lora_a.t()) @ lora_b.t()
    if bias is not None:
        expected = expected + bias
    expected = expected.view(2, 5, 12)
    torch.testing.assert_close(out, expected)
    expected.backward(upstream)
    for got, t in zip(fused, leaves):
        torch.testing.assert_close(got, t.grad)


def test_inputs_without_gradients_get_none_and_adapters_still_learn() -> None:
    x = torch.randn(6, 16)
    lora_a = torch.randn(4, 16, requires_grad=True)
    lora_b = torch.randn(12, 4, requires_grad=True)
    LoraLinearFunction.apply(x, torch.randn(12, 16), None, lora_a, lora_b, 2.0, 0.0).sum().backward()
    assert x.grad is None and lora_a.grad is not None and lora_b.grad is not None


def test_dropout_runs_only_in_training_mode_and_keeps_the_expected_scale() -> None:
    model = tiny_model(dropout=0.5)
    fuse_lora(model)
    layer = next(m for m in model.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A"))
    x = torch.ones(4000, 64)
    model.eval()
    reference = type(layer).forward(layer, x)
    torch.testing.assert_close(layer(x), reference)  # eval: no dropout, same as peft
    model.train()
    torch.manual_seed(0)
    trained = layer(x)
    assert not torch.allclose(trained, reference)
    base = layer.base_layer(x)
    # dropout keeps the adapter's share in expectation: mean over many rows close to the eval output's
    torch.testing.assert_close((trained - base).mean(0), (reference - base).mean(0), rtol=0.1, atol=0.02)


def test_calls_it_does_not_cover_run_peft_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    fuse_lora(model)
    calls = count_applies(monkeypatch, LoraLinearFunction)
    layer = next(m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    x = torch.randn(3, 64)
    with model.disable_adapter():
        torch.testing.assert_close(layer(x), layer.base_layer(x))
    # bf16 inputs to fp32 adapters without autocast: peft runs the adapter in fp32, and so must we
    model_bf16 = tiny_model().to(torch.bfloat16)
    for name, param in model_bf16.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    fuse_lora(model_bf16)
    layer_bf16 = next(m for m in model_bf16.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    xb = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(layer_bf16(xb), type(layer_bf16).forward(layer_bf16, xb))
    layer.merge()
    merged = layer(x)
    layer.unmerge()
    torch.testing.assert_close(merged, type(layer).forward(layer, x), rtol=1e-5, atol=1e-5)
    assert calls[0] == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast in x's dtype: fused
        layer_bf16(xb)
    assert calls[0] == 1


def test_layers_peft_handles_differently_are_left_alone() -> None:
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    dora = get_peft_model(Qwen3ForCausalLM(config), LoraConfig(r=4, use_dora=True, target_modules=TARGETS))
    assert fuse_lora(dora) == 0
    assert fused_lora.dropout_p(torch.nn.AlphaDropout(0.1)) is None


def test_fast_steps_with_fused_lora_follow_the_unfused_steps() -> None:
    runs = []
    for fused in (False, True):
        model = tiny_model(seed=4)
        params = [p for p in model.parameters() if p.requires_grad]
        step = FastStep(model, torch.optim.AdamW(params, lr=1e-2), grad_clip=1.0, fused_lora=fused)
        assert step.fused_lora == (2 * len(TARGETS) if fused else 0)
        runs.append([float(step(batch(seed)).loss) for seed in range(4)])
    for a, b in zip(*runs):
        assert abs(a - b) < 1e-5



def _ops_in_a_step(step: FastStep, packed: object) -> collections.Counter:
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: collections.Counter = collections.Counter()

    class Census(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN202
            seen[func.__name__.split(".")[0]] += 1
            return func(*args, **(kwargs or {}))

    with Census():
        step(packed)
    return seen


def test_adapter_copies_train_as_per_call_casts_do() -> None:
    """The fused layers take A and s*B from one buffer made at the start of the step: the same losses and
    adapters as when each layer casts and scales for itself."""
    runs = []
    for copies in (False, True):
        model = tiny_model(seed=5, dropout=0.1)
        params = [p for p in model.parameters() if p.requires_grad]
        step = FastStep(model, torch.optim.AdamW(params, lr=1e-2), grad_clip=1.0, fused_lora=True, lora_copies=copies)
        assert len(step.adapter_copies) == (2 * len(TARGETS) if copies else 0)
        torch.manual_seed(11)  # the same dropout masks
        runs.append(([float(step(batch(seed)).loss) for seed in range(4)],
                     {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    (per_call, adapters_a), (copied, adapters_b) = runs
    assert copied == pytest.approx(per_call, rel=1e-6)
    for name, value in adapters_a.items():
        torch.testing.assert_close(adapters_b[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_adapter_copies_save_two_casts_and_a_scaling_a_layer_in_bf16() -> None:
    """Under bf16 autocast with fp32 adapters (the trainer's case) each fused layer cast A and B and scaled
    its share itself: three operations a layer, against two a step for the copies."""
    census = []
    for copies in (False, True):
        model = tiny_model(seed=5).to(torch.bfloat16)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        params = [p for p in model.parameters() if p.requires_grad]
        step = FastStep(model, torch.optim.AdamW(params, lr=1e-3), grad_clip=1.0, fused_lora=True,
                        autocast_dtype=torch.bfloat16, lora_copies=copies)
        step(batch(1))
        census.append(_ops_in_a_step(step, batch(2)))
    before, after = census
    assert sum(before.values()) - sum(after.values()) == 3 * 2 * len(TARGETS) - 2, (before - after, after - before)


def test_adapter_copies_are_read_only_inside_fresh_and_follow_the_parameters() -> None:
    model = tiny_model(seed=6)
    fuse_lora(model)
    copies = fused_lora.AdapterCopies(model)
    layer = next(m for m in model.modules() if type(m) is fused_lora.lora_layer_type())
    x = torch.randn(3, layer.base_layer.in_features)
    expected = type(layer).forward(layer, x)  # peft's own
    with copies.fresh(torch.float32):
        torch.testing.assert_close(layer(x), expected)
        with torch.no_grad():
            layer.lora_B["default"].weight.mul_(2.0)  # an update inside the step is not seen: copies are per step
        stale = layer(x)
    torch.testing.assert_close(stale, expected)
    assert fused_lora._COPIES is None  # outside, every call casts the parameters as they are
    torch.testing.assert_close(layer(x), type(layer).forward(layer, x))
    with copies.fresh(torch.float32):
        torch.testing.assert_close(layer(x), type(layer).forward(layer, x))  # the next step's copies
    with copies.fresh(None):  # no compute dtype: the layers cast for themselves
        assert fused_lora._COPIES is None
    assert not copies.ready(None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_adapter_copies_in_captured_bf16_steps_follow_per_call_casts() -> None:
    losses = []
    for copies in (False, True):
        model = tiny_model(seed=7).to(torch.bfloat16).cuda()
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()  # fp32 adapters on a bf16 base, as the trainer has them
        params = [p for p in model.parameters() if p.requires_grad]
        step = FastStep(model, torch.optim.AdamW(params, lr=1e-3, fused=True), grad_clip=1.0, compile=False,
                        lora_copies=copies)
        assert step.use_graphs and step.fused_lora and step.autocast_dtype == torch.bfloat16
        losses.append([float(step(batch(seed % 3), lr=1e-3).loss) for seed in range(9)])
        assert step.captures >= 1
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
