"""Training throughput: the plain stack (HF Trainer + PEFT) against the fast path, same data and settings.

Every variant trains the same seeded model on the same batches in the same order (4 samples a step,
AdamW lr 1e-4 with linear decay, clip 1.0, bf16 autocast over bf16 weights, fp32 LoRA):
  baseline               transformers Trainer, dynamic padding, sdpa, no gradient checkpointing
  lean-padded            a plain loop (no Trainer), the same padded batches, fused AdamW
  packed                 + one packed row a step (varlen attention) + lm_head/CE at label positions only
  packed+graphs          + the whole step captured as a CUDA graph per padded shape
  packed+graphs+plan     the same on the shapes the engine plans for these batches (its padding), all captured first
  packed+compile+graphs  + torch.compile'd decoder layers inside the graphs
  engine                 the trainer's fast engine (graphs) as its loop drives it, each loss read a step late
  engine+compile         the same with train.compile on (torch.compile'd decoder layers inside the graphs)
  engine+eagereach       the engine with every shape's first step eager and its second captured (before 2026-12-07;
                         the engine now runs eagerly only until its first graph, then captures shapes when met)
  engine+coarse          the engine without its shape plan: every step's row and label slots in the fixed buckets
                         (128 tokens, 256 slots) as before 2026-12-07 (train/shapeplan.py)
  engine+torchce, packed+graphs+torchce  the engine / the bench step with torch's cross-entropy over fp32 logits,
                         as before 2026-12-07 (not the Triton kernels of kernels/fused_ce.py)
  engine+hfmlp, packed+graphs+hfmlp  the same with the model's own MLP forward (not kernels/fused_mlp.py's)
  engine+torchnorm                  the engine with torch's rms_norm kernel (not kernels/fused_norm.py's Triton kernels)
  engine+torchdropgrad   the engine with x's gradient through the LoRA dropout as torch's GEMM and addcmul (not the
                         Triton kernel of kernels/lora_dropout_grad.py)
  engine+readlast        the engine with every loss read after the last step (as the bench-only step reads them),
                         not one step late as the trainer reads them
  engine+leancapture     the engine with lean captures: no device sync before a capture, the allocator's cache
                         emptied only after eager steps (graphs.ShapeGraphs.sync_captures = False)
  packed+graphs+lorapercall  the bench step with each LoRA layer casting A and B itself (before the adapter copies)
Reported: tokens/s over non-padding tokens after warm-up, MFU (2.49 GFLOP a token, 989 TFLOP/s peak),
peak memory, the time spent compiling/capturing, and each loss curve's gap to the baseline's.

  PYTHONPATH=src python3 bench/train_throughput.py              # GPU, 200 steps
  python3 bench/train_throughput.py --cpu-smoke                 # tiny model on CPU: correctness only
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import common
import gaps
from gputwin.train.fast import FastStep, make_optimizer
from gputwin.train.packing import pack
from gputwin.train.shapeplan import need_of

VARIANTS = ("baseline", "packed+graphs", "packed+graphs+plan", "packed+compile+graphs", "packed", "lean-padded", "engine", "packed+graphs+hfnorm",
            "packed+graphs+peftlora", "packed+graphs+hfrope", "packed+graphs+rollrope", "engine+rollrope",
            "engine+compile", "engine+eagereach", "engine+leancapture", "packed+graphs+lorapercall", "engine+coarse", "engine+readlast",
            "engine+torchce", "packed+graphs+torchce", "engine+hfmlp", "packed+graphs+hfmlp",
            "engine+torchnorm", "engine+torchdropgrad")
BATCH = 4


def linear_lr(base: float, steps: int, step: int) -> float:
    """transformers' linear schedule without warm-up: the lr of 0-based step `step`."""
    return base * max(0.0, (steps - step) / max(1, steps))


def collate_padded(samples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Dynamic padding (right) to the longest sample of the batch, as DataCollatorForSeq2Seq does."""
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), common.IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _summary(name: str, losses: list[float], tokens: int, seconds: float, steps_timed: int,
             device: torch.device, **extra: Any) -> dict[str, Any]:
    tokens_per_s = tokens / seconds if seconds > 0 else 0.0
    return {"variant": name, "tokens_per_s": tokens_per_s, "step_ms": 1000 * seconds / max(1, steps_timed),
            "mfu_pct": 100 * tokens_per_s * common.TRAIN_FLOP_PER_TOKEN / (common.PEAK_BF16_TFLOPS * 1e12),
            "timed_steps": steps_timed, "timed_tokens": tokens, "timed_seconds": seconds,
            "peak_memory_gib": common.peak_memory_gib(device), "losses": losses, **extra}


# ---------------------------------------------------------------- variants


def run_baseline(model: Any, batches: list[list[dict]], args: argparse.Namespace, device: torch.device) -> dict:
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    samples = [s for batch in batches for s in batch]
    losses: list[torch.Tensor] = []
    clock: dict[str, float] = {}

    class Ordered(Trainer):
        """The given sample order (the fast variants see the same batches), each step's loss kept."""

        def _get_train_sampler(self, *unused: Any, **also_unused: Any) -> Any:
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, *a: Any, **kw: Any) -> Any:
            loss = super().compute_loss(*a, **kw)
            losses.append((loss[0] if isinstance(loss, tuple) else loss).detach())
            return loss

    class Clock(TrainerCallback):
        def on_step_end(self, targs: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == args.warm_steps:
                common.synchronize(device)
                clock["start"] = time.perf_counter()

        def on_train_end(self, targs: Any, state: Any, control: Any, **kw: Any) -> None:
            common.synchronize(device)
            clock["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=BATCH, max_steps=len(batches), learning_rate=args.lr,
            lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            bf16=device.type == "cuda", use_cpu=device.type != "cuda", logging_steps=10**9, save_strategy="no",
            report_to="none", disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
            optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch", seed=args.seed)
        trainer = Ordered(model=model, args=targs, train_dataset=samples,
                          data_collator=lambda items: collate_padded(items, args.pad_id), callbacks=[Clock()])
        trainer.train()
    tokens = sum(len(s["input_ids"]) for batch in batches[args.warm_steps:] for s in batch)
    return _summary("baseline", torch.stack(losses).float().tolist(), tokens, clock["end"] - clock["start"],
                    len(batches) - args.warm_steps, device)


def run_lean_padded(model: Any, batches: list[list[dict]], args: argparse.Namespace, device: torch.device) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    losses, tokens, start = [], 0, 0.0
    for step, samples in enumerate(batches):
        if step == args.warm_steps:
            common.synchronize(device)
            start = time.perf_counter()
        if step >= args.warm_steps:
            tokens += sum(len(s["input_ids"]) for s in samples)
        batch = {k: v.to(device, non_blocking=True) for k, v in collate_padded(samples, args.pad_id).items()}
        for group in optimizer.param_groups:
            group["lr"] = linear_lr(args.lr, len(batches), step)
        with _autocast(device):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    common.synchronize(device)
    return _summary("lean-padded", torch.stack(losses).float().tolist(), tokens, time.perf_counter() - start,
                    len(batches) - args.warm_steps, device)


def _run_fast(name: str, *, compile: bool, graphs: bool, fused_norms: bool | None = None,
              fused_lora: bool | None = None, fused_rope: bool | None = None, fused_mlp: bool | None = None,
              lora_copies: bool = True, planned: bool = False) -> Callable[..., dict]:
    """planned: each batch packed to the shape the trainer's engine plans for it (FastEngine.plan), not to the
    bench's row bucket: the same shapes and padding as `engine`, every shape captured before the clock."""
    def run(model: Any, batches: list[list[dict]], args: argparse.Namespace, device: torch.device) -> dict:
        packer = _planned_packer(batches, args) if planned else (
            lambda samples: pack(samples, bucket=args.bucket, pad_id=args.pad_id))
        optimizer = make_optimizer(model, args.lr)
        on_cuda = device.type == "cuda"  # --cpu-smoke runs the same code without compile and graphs
        step_fn = FastStep(model, optimizer, compile=compile and on_cuda, cuda_graphs=graphs and on_cuda,
                           grad_clip=1.0, fused_norms=fused_norms, fused_lora=fused_lora,
                           fused_rope=fused_rope, lora_copies=lora_copies, fused_mlp=fused_mlp)
        started = time.perf_counter()
        shapes = {}
        for samples in batches:  # every shape once: graphs (and compilation) before the clock starts
            packed = packer(samples)
            shapes.setdefault(packed.shape_key, packed)
        captured = step_fn.prepare(shapes.values())
        common.synchronize(device)
        prepare_s = time.perf_counter() - started
        losses, norms, tokens, start = [], [], 0, 0.0
        for step, samples in enumerate(batches):
            if step == args.warm_steps:
                common.synchronize(device)
                start = time.perf_counter()
            packed = packer(samples)
            if step >= args.warm_steps:
                tokens += packed.n_tokens
            result = step_fn(packed, lr=linear_lr(args.lr, len(batches), step))
            losses.append(result.loss)
            norms.append(result.grad_norm)
        common.synchronize(device)
        elapsed, total = time.perf_counter() - start, time.perf_counter() - started
        extra = {"kernel_profile": _profile(step_fn, batches[:5], args, device)} if args.profile else {}
        if args.trace:
            extra["gaps"] = gaps.trace(device, lambda: [step_fn(packer(s), lr=args.lr) for s in batches[:20]],
                                       (), Path(args.out) / f"trace-{name}.json.gz", 20)
        padded = sum(packer(s).length for s in batches)
        real = sum(len(x["input_ids"]) for s in batches for x in s)
        return _summary(name, torch.stack(losses).float().tolist(), tokens, elapsed, len(batches) - args.warm_steps,
                        device, prepare_seconds=prepare_s, graphs_captured=captured, shapes=len(shapes),
                        all_steps_seconds=total, shapes_planned=planned,
                        grad_norms=torch.stack(norms).float().tolist(), bucket=args.bucket, **extra,
                        attention_backend=step_fn.attention_backend, padding_share=1 - real / padded,
                        fused_norms=step_fn.fused_norms, fused_lora=step_fn.fused_lora, fused_mlps=step_fn.fused_mlps,
                        fused_rope=len(step_fn.rotary_modules))
    return run


def _planned_packer(batches: list[list[dict]], args: argparse.Namespace) -> Callable[[list[dict]], Any]:
    """pack() to the shapes FastEngine plans for these batches (gputwin.train.shapeplan, the engine's buckets)."""
    from gputwin.train.batching import Example
    from gputwin.train.fast import FastEngine

    plan = FastEngine.new_plan()
    examples = {id(batch): [Example(s["input_ids"], s["labels"], False) for s in batch] for batch in batches}
    plan.add(need_of(examples[id(batch)]) for batch in batches)

    def packer(samples: list[dict]) -> Any:
        batch = examples[id(samples)]
        return pack(batch, pad_id=args.pad_id, shape=plan.shape_for(need_of(batch)))
    return packer


def run_engine(model: Any, batches: list[list[dict]], args: argparse.Namespace, device: torch.device,
               compile: bool | None = None, eager_each: bool = False, sync_captures: bool = True,
               plan: bool = True, read_lag: int = 1) -> dict:
    """The fast engine as the trainer loop drives it (gputwin.train.engine.make_engine("fast")): graphs
    captured as new shapes come, each step's loss read after the next step is issued; then the NaN path
    the trainer's fault hook exercises: the step must raise NonFiniteLoss and change no weight.
    compile: the engine's train.compile setting (None: the trainer's default); eager_each: every shape's first
    step eager, its second captured (graphs.ShapeGraphs eager_first=True), as before the engine's "once";
    sync_captures=False: lean captures (no device sync before a capture; graphs.ShapeGraphs.sync_captures);
    plan=False: no shape plan (the trainer tells its engine the batches to come; without, the coarse buckets).
    read_lag: steps issued after a step before its loss is read (the trainer's 1; a large one reads the losses at
    the end, as the bench-only step does)."""
    from gputwin.train.batching import Example
    from gputwin.train.engine import NonFiniteLoss, build_optimizer, make_engine

    dtype = next(p.dtype for p in model.parameters() if not p.requires_grad)
    optimizer = build_optimizer(model, lr=args.lr, weight_decay=0.0, device=device)
    engine = make_engine("fast", model, optimizer, device=device, model_dtype=dtype, grad_clip=1.0, pad_id=args.pad_id,
                         compile=compile)
    if eager_each:
        engine.fast.graphs.eager_first = True
    engine.fast.graphs.sync_captures = sync_captures
    examples = [[Example(s["input_ids"], s["labels"], False) for s in batch] for batch in batches]
    losses, tokens, start, first_step = [], 0, 0.0, 0.0
    common.synchronize(device)
    first = time.perf_counter()
    if plan:  # as the trainer does before its first step (Trainer.plan_shapes)
        engine.plan(examples)
    waiting: collections.deque = collections.deque()  # issued steps whose loss is not read yet
    for step, batch in enumerate(examples):
        if step == args.warm_steps:  # the clock starts with the device idle, as the bench step's does
            losses.extend(outcome.result().loss for outcome in waiting)
            waiting.clear()
            common.synchronize(device)
            start = time.perf_counter()
        if step >= args.warm_steps:
            tokens += sum(e.n_tokens for e in batch)
        waiting.append(engine.step(engine.collate(batch), linear_lr(args.lr, len(batches), step)))
        if step == 0:
            first_step = time.perf_counter() - first  # compiling, where the engine compiles
        while len(waiting) > read_lag:
            losses.append(waiting.popleft().result().loss)
    losses.extend(outcome.result().loss for outcome in waiting)
    elapsed, total = time.perf_counter() - start, time.perf_counter() - first
    packed = [engine.collate(batch) for batch in examples]  # the rows the steps ran on
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        params[0].fill_(float("nan"))
    kept = [p.detach().clone() for p in params[1:]]
    raised = False
    try:
        engine.step(engine.collate(examples[0]), args.lr).result()
    except NonFiniteLoss:
        raised = True
    unchanged = all(torch.equal(a, b) for a, b in zip(params[1:], kept))
    extra = {"kernel_profile": _profile_engine(engine, examples[:20], args, device)} if args.profile else {}
    if args.trace:
        extra["gaps"] = _trace_engine(engine, examples[:20], args, device)
    return _summary("engine", losses, tokens, elapsed, len(batches) - args.warm_steps, device, **extra,
                    engine=type(engine).__name__, all_steps_seconds=total, first_step_seconds=first_step,
                    compiled=bool(getattr(getattr(engine, "fast", None), "use_compile", False)),
                    captures=getattr(getattr(engine, "fast", None), "captures", 0),
                    shapes_planned=plan, capture_log=getattr(getattr(getattr(engine, "fast", None), "graphs", None), "log", []), padding_share=1 - sum(b.n_tokens for b in packed) / sum(b.length for b in packed),
                    label_slot_share=sum(b.n_label_tokens for b in packed) / sum(b.label_index.shape[0] for b in packed),
                    eager_steps=getattr(getattr(getattr(engine, "fast", None), "graphs", None), "eager_steps", 0),
                    nan_step_raised=raised,
                    nan_step_left_weights_unchanged=unchanged)


def _profile(step_fn: FastStep, batches: list[list[dict]], args: argparse.Namespace,
             device: torch.device) -> dict[str, Any] | None:
    """Where a step's GPU time goes: kernel time by kind over a few more steps (after the timed ones)."""
    return common.profile_kernels(
        device, lambda: [step_fn(pack(s, bucket=args.bucket, pad_id=args.pad_id), lr=args.lr) for s in batches],
        len(batches))


def _profile_engine(engine: Any, batches: list[list[Any]], args: argparse.Namespace,
                    device: torch.device) -> dict[str, Any] | None:
    """The same for the engine as the trainer drives it (each loss read once the next step is issued): GPU time
    a step against the wall time a step, so idle gaps between its steps show as their difference. Runs after the
    NaN check, so on weights reset to finite values (the GPU time a step does not depend on them)."""
    with torch.no_grad():
        for p in engine.fast.params:
            p.nan_to_num_(0.0)

    def steps() -> None:
        pending = None
        for batch in batches:
            outcome = engine.step(engine.collate(batch), args.lr)
            if pending is not None:
                pending.result()
            pending = outcome
        pending.result()
    return common.profile_kernels(device, steps, len(batches))


def _trace_engine(engine: Any, batches: list[list[Any]], args: argparse.Namespace,
                  device: torch.device) -> dict[str, Any] | None:
    """Idle gaps of the device over 20 steps as the trainer drives them (bench/gaps.py), each host part labelled:
    which of collate, step and read kept the device waiting. Weights reset to finite values, as for the profile."""
    with torch.no_grad():
        for p in engine.fast.params:
            p.nan_to_num_(0.0)
    record = torch.profiler.record_function

    def steps() -> None:
        pending = None
        for batch in batches:
            with record("collate"):
                packed = engine.collate(batch)
            with record("step"):
                outcome = engine.step(packed, args.lr)
            if pending is not None:
                with record("read"):
                    pending.result()
            pending = outcome
        pending.result()
    return gaps.trace(device, steps, ("collate", "step", "read"), Path(args.out) / "trace-engine.json.gz", len(batches))


def _switched_off(switch: str, runner: Callable[..., dict]) -> Callable[..., dict]:
    """The runner with one of gputwin.kernels' switches off for its run ("fused_rotary.TRITON": the roll path,
    not liger-kernel's Triton RoPE; "fused_mlp.ENABLED": the model's own MLP; "fused_ce.ENABLED": torch's
    cross-entropy over fp32 logits; "fused_norm.ENABLED": torch's rms_norm kernel; "lora_dropout_grad.ENABLED":
    torch's GEMM and addcmul for x's gradient through the LoRA dropout)."""
    import importlib

    module_name, name = switch.split(".")

    def run(*args: Any) -> dict:
        module = importlib.import_module(f"gputwin.kernels.{module_name}")
        setattr(module, name, False)
        try:
            return runner(*args)
        finally:
            setattr(module, name, True)
    return run


RUNNERS: dict[str, Callable[..., dict]] = {
    "baseline": run_baseline,
    "lean-padded": run_lean_padded,
    "packed": _run_fast("packed", compile=False, graphs=False),
    "packed+graphs": _run_fast("packed+graphs", compile=False, graphs=True),
    "packed+graphs+plan": _run_fast("packed+graphs+plan", compile=False, graphs=True, planned=True),
    "packed+graphs+hfnorm": _run_fast("packed+graphs+hfnorm", compile=False, graphs=True, fused_norms=False),
    "packed+graphs+peftlora": _run_fast("packed+graphs+peftlora", compile=False, graphs=True, fused_lora=False),
    "packed+graphs+hfrope": _run_fast("packed+graphs+hfrope", compile=False, graphs=True, fused_rope=False),
    "packed+compile+graphs": _run_fast("packed+compile+graphs", compile=True, graphs=True),
    "engine": run_engine,
    "engine+rollrope": _switched_off("fused_rotary.TRITON", run_engine),
    "engine+compile": lambda *a: run_engine(*a, compile=True),
    "engine+eagereach": lambda *a: run_engine(*a, eager_each=True),
    "engine+leancapture": lambda *a: run_engine(*a, sync_captures=False),
    "engine+coarse": lambda *a: run_engine(*a, plan=False),
    "engine+readlast": lambda *a: run_engine(*a, read_lag=1 << 30),
    "engine+torchce": _switched_off("fused_ce.ENABLED", run_engine),
    "engine+hfmlp": _switched_off("fused_mlp.ENABLED", run_engine),
    "engine+torchnorm": _switched_off("fused_norm.ENABLED", run_engine),
    "engine+torchdropgrad": _switched_off("lora_dropout_grad.ENABLED", run_engine),
    "packed+graphs+hfmlp": _run_fast("packed+graphs+hfmlp", compile=False, graphs=True, fused_mlp=False),
    "packed+graphs+torchce": _switched_off("fused_ce.ENABLED", _run_fast("packed+graphs+torchce", compile=False,
                                                                          graphs=True)),
    "packed+graphs+lorapercall": _run_fast("packed+graphs+lorapercall", compile=False, graphs=True, lora_copies=False),
    "packed+graphs+rollrope": _switched_off("fused_rotary.TRITON", _run_fast("packed+graphs+rollrope", compile=False,
                                                                             graphs=True)),
}


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, a few steps (correctness only)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (200; smoke 6)")
    parser.add_argument("--warm-steps", type=int, default=None, help="steps before the clock starts (10; smoke 2)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {VARIANTS}; NAME@64 runs NAME with bucket 64")
    parser.add_argument("--baseline-json", default=None,
                        help="take the baseline from this earlier train_throughput.json (same steps and seed)")
    parser.add_argument("--bucket", type=int, default=128, help="packed row length multiple")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--profile", action="store_true", help="kernel time by kind over 5 extra steps (GPU)")
    parser.add_argument("--trace", action="store_true",
                        help="the device's idle gaps over 20 extra steps, by host part, and a Chrome trace (GPU)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=str(common.OUT_DIR), help="folder for train_throughput.json")
    args = parser.parse_args(argv)
    args.steps = args.steps or (6 if args.cpu_smoke else 200)
    args.warm_steps = args.warm_steps if args.warm_steps is not None else (2 if args.cpu_smoke else 10)
    if args.cpu_smoke:
        args.bucket = min(args.bucket, 32)
    unknown = {v.partition("@")[0] for v in args.variants.split(",")} - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    return args


def _earlier_baseline(path: str, settings: dict[str, Any]) -> dict[str, Any]:
    earlier = json.loads(Path(path).read_text(encoding="utf-8"))
    for key in ("steps", "warm_steps", "batch", "lr", "seed", "mean_sample_tokens"):
        if earlier["settings"].get(key) != settings[key]:
            raise SystemExit(f"{path}: settings.{key} is {earlier['settings'].get(key)}, this run has {settings[key]}")
    base = next(r for r in earlier["results"] if r["variant"] == "baseline")
    return {**base, "reused_from": path}


def _compare(results: list[dict[str, Any]]) -> None:
    """Speed-up and loss-curve gap of every finished variant against the baseline."""
    base = next((r for r in results if r["variant"] == "baseline" and "losses" in r), None)
    for r in results:
        if base is not None and "losses" in r:
            r["speedup_vs_baseline"] = r["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None
            r["loss_gap_vs_baseline"] = common.curve_gap(base["losses"], r["losses"])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    config = common.model_config(args.cpu_smoke)
    args.pad_id = 0
    lengths = dict(min_len=20, max_len=60, mean_len=40.0) if args.cpu_smoke else {}
    samples = common.synthetic_samples(args.steps * BATCH, seed=args.seed, vocab_size=config.vocab_size,
                                       eos_id=int(config.eos_token_id), **lengths)
    batches = [samples[i * BATCH:(i + 1) * BATCH] for i in range(args.steps)]
    results: list[dict[str, Any]] = []
    settings = {"steps": args.steps, "warm_steps": args.warm_steps, "batch": BATCH, "bucket": args.bucket,
                "lr": args.lr, "seed": args.seed, "peak_tflops_bf16": common.PEAK_BF16_TFLOPS,
                "flop_per_token": common.TRAIN_FLOP_PER_TOKEN,
                "mean_sample_tokens": sum(len(s["input_ids"]) for s in samples) / len(samples)}
    machine = common.machine_info(device)
    if args.baseline_json:
        results.append(_earlier_baseline(args.baseline_json, settings))
    for name in args.variants.split(","):
        runner, _, bucket = name.partition("@")
        common.reset_memory(device)
        model = common.build_model(config, device=device, dtype=dtype, seed=args.seed)
        model.train()
        print(f"[{name}] {args.steps} steps ...", flush=True)
        try:
            run_args = argparse.Namespace(**{**vars(args), "bucket": int(bucket) if bucket else args.bucket})
            results.append({**RUNNERS[runner](model, batches, run_args, device), "variant": name})
        except Exception as exc:  # a variant that fails is reported, and the others still run
            traceback.print_exc()
            results.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"})
        del model
        _compare(results)
        r = results[-1]
        print(f"[{name}] tokens/s {r.get('tokens_per_s', 0):,.0f}  x{r.get('speedup_vs_baseline') or 0:.2f}  "
              f"{r.get('error', '')}", flush=True)
        path = common.write_json(Path(args.out), "train_throughput", {
            "bench": "train_throughput", "cpu_smoke": args.cpu_smoke, "machine": machine, "settings": settings,
            "results": results})  # after every variant: a run cut short keeps what it measured
    rows = [{**r, "gap_ema": (r.get("loss_gap_vs_baseline") or {}).get("max_rel_gap_ema"),
             "mem_gib": (r.get("peak_memory_gib") or {}).get("allocated"), "error": r.get("error", "")[:60]}
            for r in results]
    common.print_table(f"training throughput ({device}, {args.steps} steps, batch {BATCH}) -> {path}", rows,
                       ["variant", "tokens_per_s", "step_ms", "mfu_pct", "speedup_vs_baseline", "gap_ema", "captures", "padding_share",
                        "mem_gib", "prepare_seconds", "attention_backend", "error"])
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
