"""Validation speed: 500 greedy generations, naive transformers generate against gputwin.validate.fastgen.

The workload of one milestone validation: 500 PII-like prompts (~100-250 tokens), 64 new tokens each
(forced: no eos, so both sides do the same work), Qwen3-0.6B shape in bf16 with an unmerged LoRA whose
B matrices are non-zero (so the adapter changes the output).
  naive        model.generate, batches of 32 (length-sorted, left-padded), dynamic cache, unmerged LoRA
  fast cold    greedy_generate, first call: kernel checks, CUDA graph capture, everything
  fast warm    greedy_generate again (what later validations cost)
  fast+stop    warm, with a stop callback looked at every 8 steps (the cost of early stopping's checks)
  fast b128    warm, batches of 128 instead of all at once
  fast prefill 4k  warm, prompts prefilled in chunks of 4k tokens instead of 16k
  fast merged  cold and warm, with the LoRA folded into copies of the base weights for the call
               (gputwin.validate.merge, which the validator uses; the merge is inside the time)
  fast merged, no sharing  the same, every row prefilling and caching its own copy of the prompts' shared
               start (the synthetic prompts start with a 30-token instruction)
  fast merged, every slot  the shared start kept once, but each decode step reading every cache slot of
               every row, masked (before flash_decode: on CUDA in bf16 a step reads only each row's filled slots)
--instruction-tokens K puts K more shared tokens before every prompt (and every training sample of 'trained').
K = 145 makes the shared start 175 tokens, the length of the validator's instruction with the seed's tokenizer.
Outputs are compared with the naive ones row by row (identical rows, identical tokens); a second naive
run with another batch size on a subset shows how often bf16 noise alone changes a greedy output.

  PYTHONPATH=src python3 bench/validation_speed.py        # GPU
  python3 bench/validation_speed.py --cpu-smoke           # tiny model on CPU: correctness only
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import common
from gputwin.validate.fastgen import greedy_generate
from gputwin.validate.merge import merged_adapter


def naive_generate(model: Any, prompts: Sequence[list[int]], *, batch_size: int, new_tokens: int,
                   pad_id: int, device: torch.device) -> list[list[int]]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              eos_token_id=None, pad_token_id=pad_id)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for r, i in enumerate(out[:, width:].tolist()):
            results[rows[r]] = i
    return results


def agreement(reference: Sequence[list[int]], other: Sequence[list[int]]) -> dict[str, float]:
    """Identical rows, identical tokens (position by position), and where rows first differ."""
    same_rows = sum(a == b for a, b in zip(reference, other))
    total = sum(len(a) for a in reference)
    same_tokens = sum(x == y for a, b in zip(reference, other) for x, y in zip(a, b))
    firsts = [next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
              for a, b in zip(reference, other) if a != b]
    return {"rows": len(reference), "identical_rows": same_rows, "identical_rows_pct": 100 * same_rows / len(reference),
            "identical_tokens_pct": 100 * same_tokens / max(1, total),
            "first_difference_mean": sum(firsts) / len(firsts) if firsts else None}


def divergence_margins(model: Any, prompts: Sequence[list[int]], reference: Sequence[list[int]],
                       other: Sequence[list[int]], device: torch.device, typical_rows: int = 32) -> dict[str, Any]:
    """Is each difference a near-tie? At the first token where `other` leaves `reference`, the reference
    model's gap between its top two logits (one unpadded forward over prompt + the shared prefix), against
    the same gap at every generated position of rows where both agree (how decided greedy choices usually are)."""
    def gaps_after(ids: list[int], positions: int) -> torch.Tensor:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -positions:].float()
        top = logits.topk(2, dim=-1).values
        return (top[:, 0] - top[:, 1]).cpu()

    at_divergence, second_choice = [], 0
    for prompt, a, b in zip(prompts, reference, other):
        if a == b:
            continue
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if k >= min(len(a), len(b)):
            continue
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prompt + a[:k]], device=device)).logits[0, -1].float()
        top = logits.topk(2)
        at_divergence.append(float(top.values[0] - top.values[1]))
        second_choice += int(b[k] in top.indices.tolist())
    agreeing = [(p, a) for p, a, b in zip(prompts, reference, other) if a == b][:typical_rows]
    typical = torch.cat([gaps_after(p + a[:-1], len(a)) for p, a in agreeing]) if agreeing else torch.zeros(0)

    def quantiles(values: torch.Tensor) -> dict[str, float] | None:
        if values.numel() == 0:
            return None
        q = torch.quantile(values, torch.tensor([0.01, 0.1, 0.5, 0.9]))
        return {"min": float(values.min()), "p1": float(q[0]), "p10": float(q[1]), "median": float(q[2]),
                "p90": float(q[3]), "max": float(values.max())}

    divergence = torch.tensor(at_divergence)
    return {"differing_rows": len(at_divergence), "other_took_a_top2_token": second_choice,
            "gap_at_divergence": quantiles(divergence), "gap_typical": quantiles(typical),
            "typical_positions_at_or_below_max_divergence_gap_pct":
                100 * float((typical <= divergence.max()).float().mean()) if len(at_divergence) and typical.numel() else None}


def _train_adapter(model: Any, config: Any, args: argparse.Namespace, device: torch.device,
                   instruction: list[int]) -> int:
    """A few hundred fast steps (lr 1e-3) on synthetic samples behind the same instruction as the prompts,
    so greedy choices have clear margins."""
    from gputwin.train.fast import FastStep, make_optimizer
    from gputwin.train.packing import pack

    lengths = dict(min_len=20, max_len=60, mean_len=40.0) if args.cpu_smoke else {}
    data = common.synthetic_samples(4 * args.train_steps, seed=args.seed + 100, vocab_size=config.vocab_size,
                                    eos_id=int(config.eos_token_id), **lengths)
    ignored = [common.IGNORE_INDEX] * len(instruction)
    data = [{"input_ids": instruction + d["input_ids"], "labels": ignored + d["labels"],
             "prompt_len": len(instruction) + d["prompt_len"]} for d in data]
    model.train()
    step = FastStep(model, make_optimizer(model, 1e-3), compile=False)
    for i in range(args.train_steps):
        step(pack(data[4 * i:4 * i + 4], pad_id=0))
    common.synchronize(device)
    return args.train_steps


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    common.synchronize(device)
    started = time.perf_counter()
    out = fn()
    common.synchronize(device)
    return out, time.perf_counter() - started


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU (correctness only)")
    parser.add_argument("--n", type=int, default=None, help="prompts (500; smoke 12)")
    parser.add_argument("--new-tokens", type=int, default=None, help="forced new tokens (64; smoke 10)")
    parser.add_argument("--naive-batch", type=int, default=32)
    parser.add_argument("--noise-subset", type=int, default=None, help="prompts in the agreement checks (64)")
    parser.add_argument("--profile", action="store_true", help="kernel time by kind of one warm merged call (GPU)")
    parser.add_argument("--train-steps", type=int, default=None, help="adapter training for 'trained' (300; smoke 4)")
    parser.add_argument("--sections", default="naive,fast,agreement,trained",
                        help="naive: generate on all prompts; fast: greedy_generate variants (compared with naive "
                             "when it ran); agreement: naive b32 / naive b16 / fast on a subset, in bf16 and fp32; "
                             "trained: the same on a subset with an adapter trained first")
    parser.add_argument("--instruction-tokens", type=int, default=None,
                        help="more shared tokens before every prompt, like the validator's instruction (0; smoke 20)")
    parser.add_argument("--lora-b-std", type=float, default=0.02, help="random LoRA B scale (0: adapter is a no-op)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=str(common.OUT_DIR))
    args = parser.parse_args(argv)
    args.n = args.n or (12 if args.cpu_smoke else 500)
    args.new_tokens = args.new_tokens or (10 if args.cpu_smoke else 64)
    args.noise_subset = args.noise_subset or (6 if args.cpu_smoke else 64)
    args.train_steps = args.train_steps or (4 if args.cpu_smoke else 300)
    if args.instruction_tokens is None:
        args.instruction_tokens = 20 if args.cpu_smoke else 0
    if args.cpu_smoke:
        args.naive_batch = min(args.naive_batch, 5)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    config = common.model_config(args.cpu_smoke)
    pad = 0
    lengths = dict(min_len=20, max_len=60, mean_len=40.0) if args.cpu_smoke else {}
    samples = common.synthetic_samples(args.n, seed=args.seed, vocab_size=config.vocab_size,
                                       eos_id=int(config.eos_token_id), **lengths)
    instruction = torch.randint(1, config.vocab_size, (args.instruction_tokens,),
                                generator=torch.Generator().manual_seed(args.seed + 1)).tolist()
    prompts = [instruction + s["input_ids"][:s["prompt_len"]] for s in samples]
    model = common.build_model(config, device=device, dtype=dtype, seed=args.seed, lora_b_std=args.lora_b_std)
    model.eval()
    model.generation_config.eos_token_id = None  # forced length: both sides generate every token
    model.generation_config.pad_token_id = pad
    fast = dict(max_new_tokens=args.new_tokens, eos_ids=(), pad_id=pad)
    rows: list[dict[str, Any]] = []
    outputs: dict[str, list[list[int]]] = {}
    machine = common.machine_info(device)
    settings = {"n": args.n, "new_tokens": args.new_tokens, "naive_batch": args.naive_batch,
                "lora_b_std": args.lora_b_std, "seed": args.seed, "noise_subset": args.noise_subset,
                "instruction_tokens": args.instruction_tokens,
                "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts)}

    def write_report() -> Path:
        naive_s = next((r["seconds"] for r in rows if r["variant"] == "naive" and "seconds" in r), None)
        for r in rows:
            if naive_s and "seconds" in r and r["prompts"] == args.n:
                r["speedup_vs_naive"] = naive_s / r["seconds"]
            if "seconds" in r:
                r["samples_per_s"] = r["prompts"] / r["seconds"]
        return common.write_json(Path(args.out), "validation_speed", {
            "bench": "validation_speed", "cpu_smoke": args.cpu_smoke, "machine": machine, "settings": settings,
            "results": rows})

    def measure(name: str, fn: Callable[[], list[list[int]]], references: Sequence[str] = ("naive",),
                **extra: Any) -> None:
        print(f"[{name}] ...", flush=True)
        common.reset_memory(device)
        try:
            out, seconds = timed(device, fn)
        except Exception as exc:  # reported; the other measurements still run
            traceback.print_exc()
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"})
            return
        outputs[name] = out
        row = {"variant": name, "prompts": len(out), "seconds": seconds,
               "peak_memory_gib": common.peak_memory_gib(device), **extra}
        for reference in references:
            if reference in outputs:
                row["vs_" + reference.replace(" ", "_")] = agreement(outputs[reference][:len(out)], out)
        rows.append(row)
        print(f"[{name}] {seconds:.2f} s  " + "  ".join(
            f"{k}: {v['identical_rows_pct']:.1f}% rows" for k, v in row.items() if k.startswith("vs_")), flush=True)
        write_report()

    sections = set(args.sections.split(","))
    if "naive" in sections:
        measure("naive", lambda: naive_generate(model, prompts, batch_size=args.naive_batch,
                                                new_tokens=args.new_tokens, pad_id=pad, device=device),
                references=(), batch=args.naive_batch)
    if "fast" in sections:
        warm_stats: dict[str, float] = {}
        measure("fast cold", lambda: greedy_generate(model, prompts, **fast))
        measure("fast warm", lambda: greedy_generate(model, prompts, stats=warm_stats, **fast))
        rows[-1]["stats"] = warm_stats
        measure("fast+stop", lambda: greedy_generate(model, prompts, stop=lambda ids: False, **fast))
        measure("fast b128", lambda: greedy_generate(model, prompts, batch_size=128, **fast))
        measure("fast prefill 4k", lambda: greedy_generate(model, prompts, prefill_tokens=4096, **fast))
        def merged(share_prefix: bool = True, stats: dict[str, float] | None = None,
                   flash: bool | None = None) -> list[list[int]]:
            with merged_adapter(model):  # what the validator runs (gputwin.validate.predict), merge included
                return greedy_generate(model, prompts, share_prefix=share_prefix, stats=stats, flash=flash, **fast)

        measure("fast merged cold", merged)
        merged_stats: dict[str, float] = {}
        measure("fast merged warm", lambda: merged(stats=merged_stats))
        rows[-1]["stats"] = merged_stats
        copies_stats: dict[str, float] = {}
        measure("fast merged, no sharing", lambda: merged(False, copies_stats),
                references=("naive", "fast merged warm"))
        rows[-1]["stats"] = copies_stats
        every_slot_stats: dict[str, float] = {}
        measure("fast merged, every slot", lambda: merged(stats=every_slot_stats, flash=False),
                references=("naive", "fast merged warm"))
        rows[-1]["stats"] = every_slot_stats
        if args.profile and device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            for variant, share in (("fast merged warm", True), ("fast merged, no sharing", False)):
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    merged(share)
                    common.synchronize(device)
                row = next((r for r in rows if r["variant"] == variant and "error" not in r), None)
                if row is not None:
                    row["kernel_profile_of_a_warm_call"] = common.kernel_summary(prof)
    if "agreement" in sections:  # on a subset: how much of a mismatch is bf16 noise, and fp32 equality
        subset = prompts[:args.noise_subset]
        naive_half = max(1, args.naive_batch // 2)
        measure("subset naive", lambda: naive_generate(model, subset, batch_size=args.naive_batch,
                                                       new_tokens=args.new_tokens, pad_id=pad, device=device),
                references=(), batch=args.naive_batch)
        measure("subset naive b16", lambda: naive_generate(model, subset, batch_size=naive_half,
                                                           new_tokens=args.new_tokens, pad_id=pad, device=device),
                references=("subset naive",), batch=naive_half)
        measure("subset fast", lambda: greedy_generate(model, subset, **fast),
                references=("subset naive", "subset naive b16"))
        fp32 = common.build_model(config, device=device, dtype=torch.float32, seed=args.seed,
                                  lora_b_std=args.lora_b_std).eval()
        fp32.generation_config.eos_token_id = None
        measure("subset fp32 naive", lambda: naive_generate(fp32, subset, batch_size=args.naive_batch,
                                                            new_tokens=args.new_tokens, pad_id=pad, device=device),
                references=(), batch=args.naive_batch)
        measure("subset fp32 fast", lambda: greedy_generate(fp32, subset, prefill_tokens=2048, **fast),
                references=("subset fp32 naive",))
        del fp32
    if "trained" in sections:  # a confident model: the adapter trained on the synthetic task first
        trained = common.build_model(config, device=device, dtype=dtype, seed=args.seed)
        settings["trained_steps"] = _train_adapter(trained, config, args, device, instruction)
        trained.eval()
        trained.generation_config.eos_token_id = None
        subset = prompts[:args.noise_subset]
        measure("trained naive", lambda: naive_generate(trained, subset, batch_size=args.naive_batch,
                                                        new_tokens=args.new_tokens, pad_id=pad, device=device),
                references=(), batch=args.naive_batch)
        measure("trained naive b16", lambda: naive_generate(trained, subset, batch_size=max(1, args.naive_batch // 2),
                                                            new_tokens=args.new_tokens, pad_id=pad, device=device),
                references=("trained naive",))
        measure("trained fast", lambda: greedy_generate(trained, subset, **fast),
                references=("trained naive", "trained naive b16"))
        for name in ("trained naive b16", "trained fast"):  # where they leave the reference: near-ties?
            row = next((r for r in rows if r["variant"] == name and "error" not in r), None)
            if row is not None and "trained naive" in outputs:
                row["margins_vs_trained_naive"] = divergence_margins(trained, subset, outputs["trained naive"],
                                                                     outputs[name], device)
                print(f"[{name}] margins: {row['margins_vs_trained_naive']}", flush=True)
        write_report()

    path = write_report()
    def versus(r: dict[str, Any]) -> dict[str, Any]:
        return next((v for k, v in r.items() if k.startswith("vs_")), {})

    table = [{**r, "identical_pct": versus(r).get("identical_rows_pct"), "tokens_pct": versus(r).get("identical_tokens_pct"),
              "mem_gib": (r.get("peak_memory_gib") or {}).get("allocated"), "error": r.get("error", "")[:60]}
             for r in rows]
    common.print_table(f"validation of {args.n} prompts x {args.new_tokens} new tokens ({device}) -> {path}", table,
                       ["variant", "prompts", "seconds", "speedup_vs_naive", "samples_per_s", "identical_pct", "tokens_pct",
                        "mem_gib", "error"])
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
