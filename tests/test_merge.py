"""merged_adapter: the active LoRA folded into copies of the base weights, the originals untouched."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen3Config, Qwen3ForCausalLM

from gputwin.validate.fastgen import greedy_generate
from gputwin.validate.merge import merged_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    model = get_peft_model(Qwen3ForCausalLM(config).to(dtype),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS))
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=2, lora_dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    return model.eval()


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "base_layer.weight" in n}


IDS = torch.tensor([[5, 9, 2, 33, 17, 8, 41, 3]])


@pytest.mark.parametrize("adapter", ["default", "other"])
def test_merged_forward_equals_the_unmerged_one_and_the_base_comes_back_as_it_was(adapter: str) -> None:
    model = tiny()
    model.set_adapter(adapter)
    before = base_weights(model)
    saved = {n: p.detach().clone() for n, p in before.items()}
    with torch.no_grad():
        expected = model(IDS).logits
        with merged_adapter(model) as layers:
            assert layers == 8  # 2 layers x q, k, v, o
            merged = model(IDS).logits
            assert all(a is not b for a, b in zip(before.values(), base_weights(model).values()))
        after = model(IDS).logits
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, expected)
    for name, param in base_weights(model).items():
        assert param is before[name] and torch.equal(param, saved[name])
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))


def test_the_fast_decoder_gives_the_same_tokens_merged() -> None:
    model = tiny(1)
    prompts = [[3, 7, 9], [11, 2, 5, 8, 13, 21], [4]]
    unmerged = greedy_generate(model, prompts, max_new_tokens=12, eos_ids=[], pad_id=0)
    with merged_adapter(model):
        merged = greedy_generate(model, prompts, max_new_tokens=12, eos_ids=[], pad_id=0)
    assert merged == unmerged


def test_bf16_base_weights_are_not_changed_by_a_merge_and_unmerge() -> None:
    """peft's merge_adapter + unmerge_adapter round W twice in bf16; this leaves W's tensor alone."""
    model = tiny(2, torch.bfloat16)
    saved = {n: p.detach().clone() for n, p in base_weights(model).items()}
    with merged_adapter(model):
        pass
    assert all(torch.equal(p, saved[n]) for n, p in base_weights(model).items())
    model.merge_adapter()
    model.unmerge_adapter()
    assert not all(torch.equal(p, saved[n]) for n, p in base_weights(model).items())  # why this module exists


def test_an_error_inside_restores_the_weights() -> None:
    model = tiny()
    before = base_weights(model)
    with pytest.raises(RuntimeError, match="boom"), merged_adapter(model):
        raise RuntimeError("boom")
    assert all(p is before[n] for n, p in base_weights(model).items())
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))


def test_disabled_adapters_and_a_model_without_lora_are_left_alone() -> None:
    model = tiny()
    with model.disable_adapter(), merged_adapter(model) as layers:
        assert layers == 0
    with merged_adapter(model.get_base_model().model.layers[0].mlp) as layers:
        assert layers == 0
