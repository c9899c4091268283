"""What the bench scripts share: the workload (Qwen3-0.6B shape, LoRA r8/alpha16 on q,k,v,o, PII-like
synthetic samples), machine facts, curve comparison and output (a printed table plus bench/out/NAME.json).

No tokenizer or weights exist offline for Qwen, so the model is random-init from its config and the
samples are seeded synthetic token ids with the task's shape: ~150-350 tokens, ~70% prompt (a fixed
instruction, then text) and ~30% answer (JSON-like syntax tokens around spans copied from the text, then
eos), loss on the answer only. The copying gives the model something to learn, so loss curves move.
"""

from __future__ import annotations

import gc
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

QWEN_CONFIG = REPO / "src" / "gputwin" / "model_configs" / "Qwen--Qwen3-0.6B.json"
OUT_DIR = REPO / "bench" / "out"
PEAK_BF16_TFLOPS = 989.0   # H200 SXM dense bf16, vendor datasheet (measured matmul ceiling here ~790)
TRAIN_FLOP_PER_TOKEN = 2.49e9  # LoRA training FLOPs per trained token for Qwen3-0.6B (the project's convention)
IGNORE_INDEX = -100


def model_config(cpu_smoke: bool) -> Any:
    """The Qwen3-0.6B config, or a tiny one of the same family for --cpu-smoke."""
    from transformers import Qwen3Config

    if cpu_smoke:
        return Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                           eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    raw = json.loads(QWEN_CONFIG.read_text(encoding="utf-8"))
    raw.pop("architectures", None)
    raw.pop("torch_dtype", None)
    return Qwen3Config(**raw)


def build_model(config: Any, *, device: torch.device, dtype: torch.dtype, seed: int, lora_r: int = 8,
                lora_alpha: int = 16, lora_b_std: float = 0.0) -> Any:
    """Random-init causal LM with LoRA on q,k,v,o (peft keeps the adapter in fp32), seeded: the same
    seed gives the same model. lora_b_std > 0 gives the adapter a non-zero effect (peft starts B at 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(base, lora)
    if lora_b_std > 0:
        generator = torch.Generator(device="cpu").manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * lora_b_std)
    return model.to(device)


def _log_uniform_ids(n: int, low: int, high: int, generator: torch.Generator) -> list[int]:
    """Token ids with a Zipf-like (log-uniform) frequency: a few common, many rare, like real text."""
    u = torch.rand(n, generator=generator)
    return (low + torch.exp(u * math.log(high - low)).long() - 1).clamp(low, high - 1).tolist()


def synthetic_samples(n: int, *, seed: int, vocab_size: int, eos_id: int, min_len: int = 150, max_len: int = 350,
                      mean_len: float = 250.0) -> list[dict[str, list[int]]]:
    """n samples of {input_ids, labels}: prompt = instruction + text (labels masked), answer = JSON-like
    tokens around copied text spans, then eos."""
    generator = torch.Generator().manual_seed(seed)
    low, high = min(16, vocab_size // 8), vocab_size
    syntax = list(range(3, 3 + 6))  # stand-ins for '[{"type":', '"value":"', '"},', ']' and friends
    instruction = _log_uniform_ids(max(4, min_len // 5), low, high, generator)
    spread = (max_len - min_len) / 4
    samples = []
    for _ in range(n):
        length = int(min(max_len, max(min_len, round(mean_len + spread * float(torch.randn(1, generator=generator))))))
        prompt_len = int(round(length * (0.65 + 0.1 * float(torch.rand(1, generator=generator)))))
        text = _log_uniform_ids(prompt_len - len(instruction), low, high, generator)
        prompt = (instruction + text)[:prompt_len]
        answer: list[int] = [syntax[0]]
        while len(answer) < length - prompt_len - 1:
            span = int(torch.randint(2, 7, (1,), generator=generator))
            at = int(torch.randint(0, max(1, len(text) - span), (1,), generator=generator))
            answer += [syntax[1 + len(answer) % 3]] + text[at:at + span] + [syntax[4]]
        answer = answer[:length - prompt_len - 1] + [eos_id]
        samples.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer,
                        "prompt_len": len(prompt)})
    return samples


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> dict[str, float] | None:
    if device.type != "cuda":
        return None
    return {"allocated": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "reserved": round(torch.cuda.max_memory_reserved(device) / 2**30, 2)}


def memory_now_gib(device: torch.device) -> dict[str, float] | None:
    """What torch holds on the device at this moment (not the peak)."""
    if device.type != "cuda":
        return None
    return {"allocated": round(torch.cuda.memory_allocated(device) / 2**30, 2),
            "reserved": round(torch.cuda.memory_reserved(device) / 2**30, 2)}


def reset_memory(device: torch.device) -> None:
    gc.collect()  # the previous variant's model and graphs
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def machine_info(device: torch.device) -> dict[str, Any]:
    import peft
    import transformers

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "transformers": transformers.__version__,
                            "peft": peft.__version__, "device": str(device), "cpu_count": os.cpu_count()}
    try:
        from torch.nn.attention.varlen import varlen_attn

        info["varlen_attn"] = str(inspect.signature(varlen_attn))
    except ImportError:
        info["varlen_attn"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=True)
            info["nvidia_smi"] = out.stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"unavailable: {exc}"
    return info


def ema(values: Sequence[float], alpha: float = 0.9) -> list[float]:
    """Exponential moving average (bias-corrected, so the first points are not pulled towards 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = alpha * avg + (1 - alpha) * v
        out.append(avg / (1 - alpha**i))
    return out


def curve_gap(reference: Sequence[float], other: Sequence[float], alpha: float = 0.9) -> dict[str, float]:
    """How far two loss curves are apart: max relative gap of the EMA-smoothed curves, and of the raw ones."""
    n = min(len(reference), len(other))
    if n == 0:
        return {}
    ref_s, oth_s = ema(reference[:n], alpha), ema(other[:n], alpha)
    smooth = max(abs(a - b) / abs(a) for a, b in zip(ref_s, oth_s))
    raw = [abs(a - b) / abs(a) for a, b in zip(reference[:n], other[:n])]
    return {"steps": n, "ema_alpha": alpha, "max_rel_gap_ema": smooth, "max_rel_gap_raw": max(raw),
            "mean_rel_gap_raw": sum(raw) / n}


def profile_kernels(device: Any, steps: Any, repeats: int) -> dict[str, Any] | None:
    """kernel_summary of `steps()` (`repeats` steps) under torch.profiler, kernels only (CPU operations would
    count them again), with the wall time a step took meanwhile; None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        steps()
        synchronize(device)
        wall = time.perf_counter() - started
    summary = kernel_summary(prof, repeats)
    summary["wall_ms_per_step"] = round(wall * 1000 / repeats, 2)
    summary["gpu_ms_per_step"] = round(sum(summary["ms_by_kind"].values()), 2)
    return summary


def kernel_summary(prof: Any, repeats: int = 1) -> dict[str, Any]:
    """GPU time and kernel count by kind (per repeat) and the costliest kernels, from a torch.profiler run."""
    kinds: dict[str, list[float]] = {}
    top = []
    for event in prof.key_averages():
        micros = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if not micros:
            continue
        name = event.key.lower()
        kind = ("attention" if "flash" in name or "fmha" in name or "attention" in name else
                "gemm" if any(k in name for k in ("gemm", "xmma", "cutlass", "nvjet")) else
                "triton (fused)" if "triton" in name else "other")
        bucket = kinds.setdefault(kind, [0.0, 0])
        bucket[0] += micros / 1000 / repeats
        bucket[1] += event.count / repeats
        top.append((micros, event.key[:90], event.count))
    top.sort(reverse=True)
    return {"ms_by_kind": {k: round(v[0], 3) for k, v in kinds.items()},
            "kernels_by_kind": {k: round(v[1]) for k, v in kinds.items()},
            "top": [{"kernel": k, "ms": round(m / 1000 / repeats, 3), "calls": c / repeats} for m, k, c in top[:15]]}


def write_json(out_dir: Path, name: str, data: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return "-" if value is None else str(value)

    table = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    sys.stdout.flush()
