"""Which of the fast engine's fused paths engage with the libraries installed here, on this device.

  python3 bench/fast_paths.py [--device cuda] [--out DIR]
Builds a small Qwen3 and a small Llama (SmolLM2's family) with LoRA on q/k/v/o, makes the trainer's
FastStep for each, runs two steps, and prints each path (rms_norm, lora, rotary, attention, cuda_graphs)
on or off with its reason, with the torch / transformers / peft versions. Writes fast_paths.json to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main() -> int:
    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from gputwin.train.engine import build_optimizer
    from gputwin.train.fast import FastStep
    from gputwin.train.packing import pack

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    families = {"qwen3": (Qwen3ForCausalLM, Qwen3Config(**shape, head_dim=32)),
                "llama": (LlamaForCausalLM, LlamaConfig(**shape))}
    rows = [{"labels": list(range(1, 40)), "input_ids": list(range(1, 80))} for _ in range(4)]
    for row in rows:
        row["labels"] = [-100] * 40 + row["input_ids"][40:]
    report = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "models": {}}
    for name, (cls, config) in families.items():
        torch.manual_seed(0)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = cls(config).to(device=device, dtype=dtype)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        # as the trainer makes it (FastEngine): no torch.compile, so the hand-fused paths are the ones on CUDA
        step = FastStep(model, build_optimizer(model, lr=1e-4, weight_decay=0.0, device=device), compile=False)
        losses = [float(step(pack(rows, bucket=16), lr=1e-4).loss) for _ in range(2)]
        report["models"][name] = {"paths": step.paths, "losses": losses, "captures": step.captures}
        print(f"\n{name} ({cls.__name__}) on {report['device']}: losses {', '.join(f'{x:.4f}' for x in losses)}")
        for path, status in step.paths.items():
            print(f"  {path:12} {'on ' if status['on'] else 'OFF'}  {status['why']}")
    print(f"\ntorch {report['torch']}, transformers {report['transformers']}, peft {report['peft']}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fast_paths.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
