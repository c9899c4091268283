"""The fast step's fused paths engage with the installed transformers and peft, and step aside (saying
why) where a library computes something else. If a release changes its code so that a check no longer
recognises it, test_every_fused_path_engages fails on that version and names the path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from gputwin.faces.cli import main
from gputwin.train.modelshape import fast_paths
from gputwin.kernels import fastpaths
from gputwin.kernels.decoder import fuse_rms_norms
from gputwin.train.fast import FastStep
from gputwin.kernels.fused_lora import fuse_lora

REPO = Path(__file__).resolve().parents[1]


def tiny_lora_model() -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return get_peft_model(Qwen3ForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def fused_step(model: nn.Module) -> FastStep:
    params = [p for p in model.parameters() if p.requires_grad]
    return FastStep(model, torch.optim.AdamW(params, lr=1e-3), fused_norms=True, fused_lora=True, fused_rope=True)


def test_every_fused_path_engages() -> None:
    step = fused_step(tiny_lora_model())
    off = {name: s["why"] for name, s in step.paths.items() if name in ("rms_norm", "lora", "rotary") and not s["on"]}
    assert not off, f"fused paths that no longer engage with the installed libraries: {off}"
    assert step.fused_norms == 2 * 4 + 1 and step.fused_lora == 2 * 2 and len(step.rotary_modules) == 1


def test_paths_say_why_they_are_off_on_a_cpu() -> None:
    model = tiny_lora_model()
    step = FastStep(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3))
    assert set(step.paths) == {"rms_norm", "lora", "rotary", "mlp", "attention", "cross_entropy", "cuda_graphs", "compile"}
    assert not any(s["on"] for s in step.paths.values())
    assert "CUDA" in step.paths["rotary"]["why"] and "mask" in step.paths["attention"]["why"]
    assert "torch" in step.paths["cross_entropy"]["why"]
    json.dumps(step.paths)  # it goes into the started event as it is


class ShiftedNorm(nn.Module):
    """Gemma's form: scaled by (1 + weight), not by weight."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.zeros(hidden)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)


ShiftedNorm.__name__ = "ShiftedRMSNorm"


def test_an_rms_norm_that_computes_otherwise_keeps_its_forward() -> None:
    model = nn.Sequential(ShiftedNorm(8))
    assert not fastpaths.rms_norm_matches(ShiftedNorm)
    assert fuse_rms_norms(model) == 0 and "forward" not in vars(model[0])
    off = fastpaths.norm_status(model)
    assert not off["on"] and "ShiftedRMSNorm computes something else" in off["why"]


def test_a_peft_whose_lora_computes_otherwise_keeps_its_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft.tuners.lora.layer import Linear

    original = Linear.forward
    monkeypatch.setattr(Linear, "forward", lambda self, x, *a, **k: original(self, x, *a, **k) * 2)
    fastpaths.lora_matches_peft.cache_clear()
    try:
        assert fuse_lora(tiny_lora_model()) == 0
        off = fastpaths.lora_status()
        assert not off["on"] and "computes something else" in off["why"]
    finally:
        fastpaths.lora_matches_peft.cache_clear()


def test_a_modeling_module_whose_rotary_computes_otherwise_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.models.qwen3 import modeling_qwen3

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):  # noqa: ANN001, ANN202 - the HF signature
        return q * cos.unsqueeze(unsqueeze_dim), k * cos.unsqueeze(unsqueeze_dim)

    monkeypatch.setattr(modeling_qwen3, "apply_rotary_pos_emb", interleaved)
    off = fastpaths.rotary_status(tiny_lora_model())
    assert not off["on"] and "modeling_qwen3.apply_rotary_pos_emb computes something else" in off["why"]


def test_check_shows_the_fast_paths_of_the_seed_model(capsys: pytest.CaptureFixture[str]) -> None:
    """Qwen3-0.6B's structure (bundled config, meta device) against the installed libraries."""
    assert main(["check", str(REPO / "profiles/conservative.toml"), "--json"]) == 0
    arm = json.loads(capsys.readouterr().out)["arms"][0]
    assert {name: s["on"] for name, s in arm["fast_paths"].items()} == {"rms_norm": True, "lora": True, "rotary": True,
                                                                          "mlp": True}
    assert main(["check", str(REPO / "profiles/seed.toml")]) == 0
    out = capsys.readouterr().out
    assert "rms_norm, lora," in out and "rotary, mlp on" in out and "fast paths: checked against transformers" in out


def test_lora_on_the_mlp_keeps_the_module_s_own_forward_and_says_so() -> None:
    off = fastpaths.mlp_status(tiny_lora_model(), ("q_proj", "up_proj", "down_proj"))
    assert not off["on"] and off["why"] == "LoRA on down_proj, up_proj: the MLP keeps its own forward"
    assert fastpaths.mlp_status(tiny_lora_model(), ("q_proj", "v_proj"))["on"]


def test_check_says_which_rotary_kernel_a_gpu_arm_would_take(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A GPU arm: liger-kernel's Triton RoPE where it is installed (checked on the GPU at start), else the
    roll path and how to get the kernel; `check` runs no kernel for it."""
    from gputwin.kernels import fused_rotary

    for installed, expected in ((None, "pip install 'gputwin[gpu]'"), (object(), "Triton RoPE, once checked on the GPU")):
        monkeypatch.setattr(fused_rotary, "liger_rope_function", lambda found=installed: found)
        assert main(["check", str(REPO / "profiles/conservative.toml"), "--json"]) == 0  # device = 0
        assert expected in json.loads(capsys.readouterr().out)["arms"][0]["fast_paths"]["rotary"]["why"]


def test_check_says_a_tag_arm_trains_with_the_plain_engine() -> None:
    from gputwin.core.profiles import load_any

    demo = load_any([str(REPO / "src/gputwin/demo_profiles/demo.toml")])
    for arm in demo.arms:
        assert fast_paths(arm) == {"fast_engine": {
            "on": False, "why": "the fast engine trains decoders for the generate task; tag arms use the plain engine"}}
