"""Co-training against separate processes: the seed's two arms on one GPU ([placement] cotrain).

In one run, on the same random-init Qwen3-0.6B (from its config), the same seeded synthetic samples and the
seed's two arms (conservative: r8/alpha16, lr 1e-4; aggressive: r12/alpha24, lr 1.5e-4; both q,k,v,o,
batch 4, warm-up 50, linear decay, clip 1.0, dropout 0.05 unless --dropout), three placements:
  separate-fast    two processes sharing the GPU, each stepping with the trainer's fast engine (today's)
  separate-plain   two processes sharing the GPU, each with the plain engine
  cotrained-fast   one process: the base once, both adapters, one pass, both arms' samples packed in one row
                   and the step a CUDA graph (gputwin.train.cotrain.GroupEngine, fast: train/cofast.py)
  cotrained-plain  the same with the plain co-trained step (padded batches stacked, eager)
  streams-fast     one process, each arm its own copy of the base and the trainer's fast engine (as a lone arm
                   runs), each arm's steps issued on a CUDA stream of its own, so the two arms' kernels may run
                   at the same time: what overlapping the arms gives, against packing them in one row
  alone-fast       one arm alone, in a process of its own with the GPU to itself
Reported: combined tokens/s of both arms over their timed steps (after warm-up; two processes are timed
over the same window, both started together), GPU memory (each process's peak reserved memory plus the
CUDA context, as NVML reports the process at its end; two processes summed), and each arm's loss curve
against its separate runs: the max relative gap of the EMA-smoothed curves over every step. Speed-up and
memory ratio are cotrained-fast's over each other row (cotrained-plain's when fast is not run).

  PYTHONPATH=src python3 bench/cotrain.py                         # GPU: 20 warm-up + 200 timed steps
  PYTHONPATH=src python3 bench/cotrain.py --dropout 0 --tag nodrop # the same maths without dropout noise
  python3 bench/cotrain.py --smoke --out DIR                      # CPU, tiny model, correctness only (tests)
Writes OUT/cotrain[-TAG].json (OUT: bench/out unless --out) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

import common
from gputwin.core.profiles import LoraSpec
from gputwin.core.schedule import lr_at, make_plan
from gputwin.train.batching import EpochBatches, Example

# The seed's arms (profiles/conservative.toml, profiles/aggressive.toml): name, r, alpha, lr, total steps.
ARMS = (("conservative", 8, 16, 1e-4, 1758), ("aggressive", 12, 24, 1.5e-4, 879))
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
BATCH, SEED, WARMUP_LR_STEPS = 4, 42, 50
VARIANTS = ("separate-fast", "separate-plain", "cotrained-fast", "cotrained-plain", "alone-fast", "streams-fast")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    from gputwin.kernels import multi_lora
    from gputwin.train import packing

    return {"smoke": args.smoke, "steps": args.steps, "warmup": args.warmup, "samples": args.samples,
            "dropout": args.dropout, "batch": BATCH, "lora_align": multi_lora.ALIGN,
            "attention_bound": "segment" if packing.BOUND_BY_SEGMENT else "row", "rope": args.rope,
            "shapes": "coarse buckets" if args.coarse else "planned (train/shapeplan.py)", "cross_entropy": args.ce, "mlp": args.mlp,
            "norm": args.norm}


def build_base(smoke: bool, device: torch.device) -> Any:
    """The random-init base, the same in every process (seeded)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if smoke else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(common.model_config(smoke), dtype=dtype, attn_implementation="sdpa")


def examples_for(args: argparse.Namespace, base: Any) -> list[Example]:
    config = base.config
    kwargs = {"min_len": 24, "max_len": 48, "mean_len": 36.0} if args.smoke else {}
    samples = common.synthetic_samples(args.samples, seed=1, vocab_size=config.vocab_size,
                                       eos_id=int(config.eos_token_id), **kwargs)
    return [Example(s["input_ids"], s["labels"], False) for s in samples]


def ahead(examples: Sequence[Example], batches: EpochBatches, per_epoch: int, steps: int) -> list[list[Example]]:
    """The examples of steps 1..steps, in the data order the bench steps them."""
    return [[examples[i] for i in batches.indices(index // per_epoch, index % per_epoch)] for index in range(steps)]


def lora_spec(arm: tuple[Any, ...], dropout: float) -> LoraSpec:
    _, r, alpha, _, _ = arm
    return LoraSpec(r=r, alpha=alpha, dropout=dropout, target_modules=TARGETS)


def schedule(arm: tuple[Any, ...]) -> Any:
    _, _, _, lr, total = arm
    return make_plan(lr, WARMUP_LR_STEPS, "linear", total, 0.1)


def graphs_of(step: Any) -> dict[str, Any]:
    """The step's graph captures: count, seconds, eager first steps and each capture's log (none on CPU)."""
    graphs = getattr(step, "graphs", None)
    if graphs is None:  # the CPU, or a step from before graphs.py
        return {"captures": getattr(step, "captures", 0), "capture_seconds": round(getattr(step, "capture_seconds", 0.0), 2),
                "eager_steps": 0, "graph_log": []}
    summary = graphs.summary()
    return {"captures": summary["captures"], "capture_seconds": summary["capture_seconds"],
            "eager_steps": summary["eager_steps"], "graph_log": summary["log"]}


def captures_cell(result: dict[str, Any]) -> str:
    """"13 (8.0)": a row's graph captures and their seconds (the arms' summed for separate processes)."""
    parts = [result] if "captures" in result else list(result["arms"].values())
    return f"{sum(p['captures'] for p in parts)} ({sum(p['capture_seconds'] for p in parts):.1f})"


def process_memory_gib(device: torch.device) -> dict[str, float] | None:
    """Peak reserved by torch, and what NVML says this process holds now (context included)."""
    peak = common.peak_memory_gib(device)
    if peak is None:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory:
                peak["nvml_process"] = round(proc.usedGpuMemory / 2**30, 2)
    except Exception:  # noqa: BLE001 - no NVML (or no per-process figures in a VM): torch's figure stays
        pass
    return peak


def wait_for_file(path: Path, limit_s: float = 900.0) -> None:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path}")
        time.sleep(0.005)


# ---------------------------------------------------------------- one arm alone (a worker process)


def arm_engine(args: argparse.Namespace, arm: tuple[Any, ...], engine: str, device: torch.device) -> tuple[Any, Any]:
    """A base of its own with the arm's adapter, and the trainer's engine over it: (base, engine)."""
    from peft import get_peft_model

    from gputwin.train.engine import build_optimizer, make_engine
    from gputwin.train.multilora import lora_config

    base = build_base(args.smoke, device)
    torch.manual_seed(SEED)  # the adapter's initialisation, as the trainer and the co-trained group do it
    model = get_peft_model(base, lora_config(lora_spec(arm, args.dropout))).to(device)
    model.train()
    optimizer = build_optimizer(model, lr=arm[3], weight_decay=0.0, device=device)
    return base, make_engine(engine, model, optimizer, device=device, model_dtype=base.dtype, grad_clip=1.0, pad_id=0)


def worker(args: argparse.Namespace) -> int:
    """One arm in a process of its own with the trainer's engine; steps in the trainer's way (each step's
    loss read after the next is issued). Warm-up, then `ready`, then the timed steps once `go` exists."""
    device = torch.device("cpu" if args.smoke else "cuda")
    arm = next(a for a in ARMS if a[0] == args.arm)
    base, engine = arm_engine(args, arm, args.engine, device)
    examples = examples_for(args, base)
    batches, plan = EpochBatches(len(examples), BATCH, SEED), schedule(arm)
    per_epoch = len(examples) // BATCH
    if not args.coarse and hasattr(engine, "plan"):  # the trainer plans its shapes before its first step
        engine.plan(ahead(examples, batches, per_epoch, args.warmup + args.steps))
    losses: list[float] = []
    pending = None
    tokens = 0
    t0 = 0.0
    warm_memory = None
    common.reset_memory(device)
    for step in range(1, args.warmup + args.steps + 1):
        if step == args.warmup + 1:  # the timed window starts together with the other process
            if pending is not None:
                losses.append(pending.result().loss)
                pending = None
            common.synchronize(device)
            warm_memory = common.memory_now_gib(device)
            Path(args.ready).touch()
            wait_for_file(Path(args.go))
            t0 = time.time()
        index = step - 1
        chosen = [examples[i] for i in batches.indices(index // per_epoch, index % per_epoch)]
        outcome = engine.step(engine.collate(chosen), lr_at(step, plan))
        if pending is not None:
            losses.append(pending.result().loss)
        pending = outcome
        if step > args.warmup:
            tokens += sum(e.n_tokens for e in chosen)
    losses.append(pending.result().loss)
    common.synchronize(device)
    t1 = time.time()
    step = getattr(engine, "fast", None)
    result = {"arm": args.arm, "engine": engine.name, "losses": losses, "tokens": tokens, "t0": t0, "t1": t1,
              "memory_gib": process_memory_gib(device), "memory_after_warmup_gib": warm_memory,
              **graphs_of(step)}

    def more(step: int) -> None:
        index = step - 1
        chosen = [examples[i] for i in batches.indices(index // per_epoch, index % per_epoch)]
        engine.step(engine.collate(chosen), lr_at(step, plan)).result()

    if args.profile:
        result["kernels"] = kernel_profile(device, more, args.warmup + args.steps - 4)
    Path(args.result).write_text(json.dumps(result))
    return 0


def separate(args: argparse.Namespace, engine: str, work: Path, arms: Sequence[tuple[Any, ...]] = ARMS,
             variant: str = "separate") -> dict[str, Any]:
    """Both arms in processes of their own, sharing the device, timed over the same window (`arms`: one arm
    alone, with the device to itself)."""
    procs, files = [], []
    go = work / f"go-{engine}"
    for arm in arms:
        ready, result = work / f"ready-{engine}-{arm[0]}", work / f"result-{engine}-{arm[0]}.json"
        for f in (ready, result, go):
            f.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "worker", "--arm", arm[0], "--engine", engine, "--ready", str(ready),
               "--go", str(go), "--result", str(result), *passthrough(args)]
        procs.append(subprocess.Popen(cmd))
        files.append((ready, result))
    for ready, _ in files:
        wait_for_file(ready)
    go.touch()
    for proc in procs:
        if proc.wait() != 0:
            raise RuntimeError(f"a {engine} worker failed (exit {proc.returncode})")
    results = [json.loads(result.read_text()) for _, result in files]
    window = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    memory = [r["memory_gib"] for r in results]
    return {"variant": f"{variant}-{engine}", "engine": results[0]["engine"],
            "tokens_per_s": round(sum(r["tokens"] for r in results) / window, 1),
            "arms": {r["arm"]: {"losses": r["losses"], "tokens_per_s_alone_window": round(r["tokens"] / (r["t1"] - r["t0"]), 1),
                                "captures": r["captures"], "capture_seconds": r["capture_seconds"],
                                "eager_steps": r["eager_steps"], "graph_log": r["graph_log"], "memory_gib": r["memory_gib"],
                                "memory_after_warmup_gib": r["memory_after_warmup_gib"], "kernels": r.get("kernels")}
                     for r in results},
            "memory_gib": _sum_memory(memory)}


def _sum_memory(memory: Sequence[dict[str, float] | None]) -> dict[str, float] | None:
    if any(m is None for m in memory):
        return None
    keys = set.intersection(*(set(m) for m in memory if m is not None))
    return {k: round(sum(m[k] for m in memory if m is not None), 2) for k in sorted(keys)}


# ---------------------------------------------------------------- both arms in one process


def cotrained(args: argparse.Namespace, fast: bool) -> dict[str, Any]:
    """Both arms in one process, stepped the trainer's way (each step's figures read after the next is issued)."""
    from gputwin.train.cotrain import GroupEngine
    from gputwin.train.engine import build_optimizer
    from gputwin.train.multilora import ArmView, SharedModel

    device = torch.device("cpu" if args.smoke else "cuda")
    common.reset_memory(device)
    base = build_base(args.smoke, device)
    examples = examples_for(args, base)
    shared = SharedModel(base, [(lora_spec(arm, args.dropout), SEED) for arm in ARMS])
    shared.model.to(device).train()
    engine = GroupEngine(shared, device=device, model_dtype=base.dtype, pad_id=0, fast=fast)
    views = [ArmView(shared, name) for name in shared.names]
    for arm, view in zip(ARMS, views):
        engine.join(view, build_optimizer(view, lr=arm[3], weight_decay=0.0, device=device), 1.0)
    batches, plans = EpochBatches(len(examples), BATCH, SEED), [schedule(arm) for arm in ARMS]
    per_epoch = len(examples) // BATCH
    if not args.coarse:  # the group plans its rows before its first step (cotrain.Group.plan_shapes)
        engine.plan([[(view.adapter, chosen) for view in views]
                     for chosen in ahead(examples, batches, per_epoch, args.warmup + args.steps)])
    losses: dict[str, list[float]] = {arm[0]: [] for arm in ARMS}
    tokens, t0 = 0, time.time()
    pending: dict[str, Any] = {}
    loaded_memory, warm_memory = common.memory_now_gib(device), None

    def read() -> None:
        for arm, view in zip(ARMS, views):
            if view.adapter in pending:
                losses[arm[0]].append(pending.pop(view.adapter).result().loss)

    for step in range(1, args.warmup + args.steps + 1):
        if step == args.warmup + 1:
            read()
            common.synchronize(device)
            warm_memory = common.memory_now_gib(device)
            t0 = time.time()
        index = step - 1
        chosen = [examples[i] for i in batches.indices(index // per_epoch, index % per_epoch)]
        out = engine.step([(view.adapter, chosen, lr_at(step, plan)) for view, plan in zip(views, plans)])
        read()
        pending = dict(out)
        if step > args.warmup:
            tokens += len(ARMS) * sum(e.n_tokens for e in chosen)
    read()
    common.synchronize(device)
    window = time.time() - t0
    result = {"variant": f"cotrained-{'fast' if fast else 'plain'}", "engine": engine.name,
              "tokens_per_s": round(tokens / window, 1),
              "arms": {name: {"losses": curve} for name, curve in losses.items()},
              "memory_gib": process_memory_gib(device), "memory_loaded_gib": loaded_memory,
              "memory_after_warmup_gib": warm_memory, **graphs_of(engine.packed_step)}

    def more(step: int) -> None:
        index = step - 1
        chosen = [examples[i] for i in batches.indices(index // per_epoch, index % per_epoch)]
        for outcome in engine.step([(view.adapter, chosen, lr_at(step, plan)) for view, plan in zip(views, plans)]).values():
            outcome.result()

    if args.profile:
        result["kernels"] = kernel_profile(device, more, args.warmup + args.steps - 4)
    return result


def streams(args: argparse.Namespace) -> dict[str, Any]:
    """Both arms in one process, each with its own base copy and fast engine, stepped the trainer's way, each
    arm's steps on a CUDA stream of its own (the CPU: one after the other)."""
    device = torch.device("cpu" if args.smoke else "cuda")
    common.reset_memory(device)
    runs = []
    for arm in ARMS:
        base, engine = arm_engine(args, arm, "fast", device)
        runs.append((arm, engine, torch.cuda.Stream(device) if device.type == "cuda" else None))
    examples = examples_for(args, base)
    batches, plans = EpochBatches(len(examples), BATCH, SEED), [schedule(arm) for arm in ARMS]
    per_epoch = len(examples) // BATCH
    if not args.coarse:
        for _, engine, _ in runs:
            engine.plan(ahead(examples, batches, per_epoch, args.warmup + args.steps))
    losses: dict[str, list[float]] = {arm[0]: [] for arm in ARMS}
    pending: dict[str, Any] = {}
    tokens, t0 = 0, time.time()
    loaded_memory, warm_memory = common.memory_now_gib(device), None

    def read(name: str) -> None:
        if name in pending:
            losses[name].append(pending.pop(name).result().loss)

    for step in range(1, args.warmup + args.steps + 1):
        if step == args.warmup + 1:
            for arm in ARMS:
                read(arm[0])
            common.synchronize(device)
            warm_memory = common.memory_now_gib(device)
            t0 = time.time()
        index = step - 1
        chosen = [examples[i] for i in batches.indices(index // per_epoch, index % per_epoch)]
        for (arm, engine, stream), plan in zip(runs, plans):
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                outcome = engine.step(engine.collate(chosen), lr_at(step, plan))
            read(arm[0])
            pending[arm[0]] = outcome
        if step > args.warmup:
            tokens += len(ARMS) * sum(e.n_tokens for e in chosen)
    for arm in ARMS:
        read(arm[0])
    common.synchronize(device)
    window = time.time() - t0
    graphs = [graphs_of(getattr(engine, "fast", None)) for _, engine, _ in runs]
    return {"variant": "streams-fast", "engine": runs[0][1].name, "tokens_per_s": round(tokens / window, 1),
            "arms": {arm[0]: {"losses": losses[arm[0]], **g} for (arm, _, _), g in zip(runs, graphs)},
            "memory_gib": process_memory_gib(device), "memory_loaded_gib": loaded_memory,
            "memory_after_warmup_gib": warm_memory}


def kernel_profile(device: torch.device, step: Any, first: int, repeats: int = 5) -> dict[str, Any] | None:
    """GPU time by kernel kind over `repeats` more steps from step `first` on (the batches of the last timed
    steps again, whose shapes have graphs), with the wall time a step took meanwhile: kernels' time well
    under the wall time means the GPU waits for the host."""
    return common.profile_kernels(device, lambda: [step(first + k) for k in range(repeats)], repeats)


# ---------------------------------------------------------------- operations a step (CPU, no timing)

# aten ops that only describe a tensor (no kernel runs for them on a GPU)
METADATA_OPS = {"view", "_unsafe_view", "t", "transpose", "expand", "as_strided", "slice", "select", "detach",
                "split", "split_with_sizes", "unsqueeze", "squeeze", "permute", "reshape", "alias", "unbind",
                "_reshape_alias", "lift_fresh", "empty", "empty_strided", "empty_like", "new_empty",
                "new_empty_strided", "is_nonzero", "_local_scalar_dense", "size", "stride",
                "scalar_tensor"}  # a Python scalar wrapped as a CPU tensor: a kernel argument on a GPU


def count_ops(step: Any) -> int:
    """aten operations dispatched by one call of `step` (forward, backward, clipping, AdamW), metadata-only
    ones left out: on a GPU each launches a kernel, and a step at this size is bound by their number."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func.__name__.split(".")[0] not in METADATA_OPS:
                self.n += 1
            return func(*args, **(kwargs or {}))

    with Counter() as counter:
        step()
    return counter.n


def ops(args: argparse.Namespace) -> dict[str, Any]:
    """Operations a step, on the CPU with the fast paths a GPU step takes (fused RMSNorm, rotary, LoRA, AdamW):
    one arm's fast step, and both arms co-trained with the multi-LoRA layers and with the masked fallback.
    The model: Qwen3-0.6B's layer count and structure at toy widths (the count does not depend on width)."""
    from peft import get_peft_model

    from gputwin.kernels.decoder import fuse_rms_norms
    from gputwin.kernels.fused_rotary import rotary_modules
    from gputwin.train import multilora
    from gputwin.train.cofast import GroupFastStep, pack_group
    from gputwin.train.cotrain import Member
    from gputwin.train.fast import FastStep
    from gputwin.train.packing import LABEL_BUCKET, pack

    def build_optimizer(model: Any, lr: float) -> torch.optim.AdamW:  # fused, as on a GPU (one kernel a step)
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0,
                                 fused=True)

    device = torch.device("cpu")
    layers = 2 if args.smoke else common.model_config(False).num_hidden_layers
    config = common.model_config(True)
    config.num_hidden_layers, config.layer_types = layers, [config.layer_types[0]] * layers

    def base() -> Any:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")

    samples = common.synthetic_samples(2 * BATCH, seed=1, vocab_size=config.vocab_size, eos_id=2, min_len=24,
                                       max_len=48, mean_len=36.0)
    examples = [Example(s["input_ids"], s["labels"], False) for s in samples]
    rows: list[dict[str, Any]] = []

    torch.manual_seed(SEED)
    model = get_peft_model(base(), multilora.lora_config(lora_spec(ARMS[0], args.dropout)))
    model.train()
    single = FastStep(model, build_optimizer(model, 1e-4), grad_clip=1.0,
                      autocast_dtype=None, cuda_graphs=False, compile=False, fused_norms=True, fused_lora=True,
                      fused_rope=True)
    batch = pack(examples[:BATCH], pad_id=0, label_bucket=LABEL_BUCKET)
    single(batch, lr=1e-4)  # lazy set-up outside the count
    rows.append({"step": "one arm alone (fast engine)", "ops": count_ops(lambda: single(batch, lr=1e-4))})

    for name, fusable in (("co-trained, multi-LoRA layers", multilora.fusable), ("co-trained, masked layers", lambda _: False)):
        shared = multilora.SharedModel(base(), [(lora_spec(arm, args.dropout), SEED) for arm in ARMS])
        shared.model.train()
        fuse_rms_norms(shared.model)
        members = {}
        for adapter, arm in zip(shared.names, ARMS):
            view = multilora.ArmView(shared, adapter)
            members[adapter] = Member(adapter, view.trainable(), build_optimizer(view, arm[3]), 1.0)
        group = GroupFastStep(shared, members, device=device, autocast_dtype=None)
        group.rotary = rotary_modules(shared.model)  # as on a GPU
        work = pack_group([(adapter, examples[i * BATCH:(i + 1) * BATCH]) for i, adapter in enumerate(shared.names)],
                          pad_id=0)
        multilora.fusable, kept = fusable, multilora.fusable
        try:
            group(work, [1e-4, 1.5e-4])
            rows.append({"step": name, "ops": count_ops(lambda: group(work, [1e-4, 1.5e-4]))})
        finally:
            multilora.fusable = kept
    alone = rows[0]["ops"]
    for row in rows:
        row["per layer"] = round(row["ops"] / layers, 1)
        row["vs 2 steps alone"] = round(row["ops"] / (2 * alone), 3)
    return {"layers": layers, "dropout": args.dropout, "rows": rows}


# ---------------------------------------------------------------- the run


def passthrough(args: argparse.Namespace) -> list[str]:
    out = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--samples", str(args.samples),
           "--dropout", str(args.dropout)]
    return (out + (["--smoke"] if args.smoke else []) + (["--profile"] if args.profile else [])
            + (["--row-bound"] if args.row_bound else []) + (["--coarse"] if args.coarse else []) + ["--rope", args.rope, "--ce", args.ce, "--mlp", args.mlp, "--norm", args.norm,
                                                  "--dropout-grad", args.dropout_grad])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", nargs="?", default="run", choices=["run", "ops", "worker"])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, few steps: correctness only")
    parser.add_argument("--steps", type=int, help="timed steps (default 200; 6 with --smoke)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 20; 2 with --smoke)")
    parser.add_argument("--samples", type=int, help="synthetic samples (default 3516, the seed's; 48 with --smoke)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout of both arms (the seed's 0.05)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--tag", default="", help="names the result file cotrain-TAG.json")
    parser.add_argument("--profile", action="store_true", help="GPU time by kernel kind over 5 more steps (CUDA)")
    parser.add_argument("--rope", choices=["triton", "roll"], default="triton",
                        help="rotary embeddings: liger-kernel's Triton RoPE where installed and checked, or the roll path")
    parser.add_argument("--row-bound", action="store_true",
                        help="attention's segment bound from the row's length (packing.BOUND_BY_SEGMENT off), as before")
    parser.add_argument("--mlp", choices=["fused", "hf"], default="fused",
                        help="the MLP: kernels/fused_mlp.py's where checked, or the model's own forward")
    parser.add_argument("--norm", choices=["triton", "torch"], default="triton",
                        help="frozen RMSNorms: kernels/fused_norm.py's Triton kernels where checked, or torch's rms_norm")
    parser.add_argument("--dropout-grad", choices=["triton", "torch"], default="triton",
                        help="x's gradient through the LoRA dropout: kernels/lora_dropout_grad.py's kernel where "
                        "checked, or torch's GEMM and addcmul")
    parser.add_argument("--ce", choices=["triton", "torch"], default="triton",
                        help="cross-entropy: the Triton kernels of kernels/fused_ce.py where checked, or torch's over fp32 logits")
    parser.add_argument("--coarse", action="store_true",
                        help="no shape plan: rows in the fixed buckets, as before 2026-12-07 (train/shapeplan.py)")
    parser.add_argument("--lora-align", type=int, default=None,
                        help="pad the co-trained adapters' columns to a multiple of this (kernels/multi_lora.py ALIGN)")
    parser.add_argument("--out", type=Path, default=common.OUT_DIR)
    for name in ("arm", "engine", "ready", "go", "result"):  # a worker's own
        parser.add_argument(f"--{name}")
    args = parser.parse_args(argv)
    args.steps = args.steps or (6 if args.smoke else 200)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.smoke else 20)
    args.samples = args.samples or (48 if args.smoke else 3516)
    return args


def configure(args: argparse.Namespace) -> None:
    """The A/B switches, in this process (a worker gets them passed on)."""
    from gputwin.kernels import fused_ce, fused_mlp, fused_norm, fused_rotary, lora_dropout_grad, multi_lora
    from gputwin.train import packing

    fused_rotary.TRITON = args.rope == "triton"
    fused_ce.ENABLED = args.ce == "triton"
    fused_mlp.ENABLED = args.mlp == "fused"
    fused_norm.ENABLED = args.norm == "triton"
    lora_dropout_grad.ENABLED = args.dropout_grad == "triton"
    if args.lora_align is not None:
        multi_lora.ALIGN = args.lora_align
    packing.BOUND_BY_SEGMENT = not args.row_bound


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure(args)
    if args.stage == "worker":
        return worker(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage == "ops":
        counted = ops(args)
        path = args.out / (f"cotrain-ops-{args.tag}.json" if args.tag else "cotrain-ops.json")
        path.write_text(json.dumps({**counted, "machine": common.machine_info(torch.device("cpu"))}, indent=2))
        common.print_table(f"aten operations a step, CPU, {counted['layers']} layers (each a GPU kernel)",
                           counted["rows"], ["step", "ops", "per layer", "vs 2 steps alone"])
        print(f"wrote {path}")
        return 0
    wanted = [v for v in args.variants.split(",") if v]
    results = []
    for variant in wanted:
        print(f"-- {variant}", flush=True)
        if variant.startswith("cotrained-"):
            results.append(cotrained(args, fast=variant == "cotrained-fast"))
        elif variant == "streams-fast":
            results.append(streams(args))
        elif variant.startswith("alone-"):
            results.append(separate(args, variant.removeprefix("alone-"), args.out, ARMS[:1], "alone"))
        else:
            results.append(separate(args, variant.removeprefix("separate-"), args.out))
    by_name = {r["variant"]: r for r in results}
    together = by_name.get("cotrained-fast") or by_name.get("cotrained-plain")
    for r in results:
        if together is not None and r is not together:
            r["cotrained_speedup"] = round(together["tokens_per_s"] / r["tokens_per_s"], 3)
            memory, ours = r.get("memory_gib"), together.get("memory_gib")
            if memory and ours:
                key = "nvml_process" if "nvml_process" in memory and "nvml_process" in ours else "reserved"
                r["cotrained_memory_ratio"] = round(ours[key] / memory[key], 3)
                r["memory_ratio_from"] = key
            r["curve_gap_to_cotrained"] = {arm: common.curve_gap(r["arms"][arm]["losses"], together["arms"][arm]["losses"])
                                           for arm in r["arms"]}
    device = torch.device("cpu" if args.smoke else "cuda")
    record = {"settings": settings(args), "machine": common.machine_info(device), "results": results}
    path = args.out / (f"cotrain-{args.tag}.json" if args.tag else "cotrain.json")
    path.write_text(json.dumps(record, indent=2))
    rows = [{"variant": r["variant"], "tokens/s": r["tokens_per_s"], "speedup": r.get("cotrained_speedup", "-"),
             "memory GiB": (r.get("memory_gib") or {}).get("nvml_process", (r.get("memory_gib") or {}).get("reserved", "-")),
             "mem ratio": r.get("cotrained_memory_ratio", "-"), "captures (s)": captures_cell(r),
             "max EMA gap": max((g["max_rel_gap_ema"] for g in r.get("curve_gap_to_cotrained", {}).values()), default="-")}
            for r in results]
    common.print_table(f"co-trained against separate processes (speedup, memory ratio: {together['variant'] if together else '-'}"
                       " / this row)", rows,
                       ["variant", "tokens/s", "speedup", "memory GiB", "mem ratio", "captures (s)", "max EMA gap"])
    for r in results:
        for who, part in ([(r["variant"], r)] + [(f"{r['variant']} {a}", v) for a, v in r["arms"].items()]):
            k = part.get("kernels")
            if k:
                print(f"{who}: a step {k['wall_ms_per_step']} ms wall, {k['gpu_ms_per_step']} ms of kernels: "
                      + ", ".join(f"{kind} {ms} ms ({k['kernels_by_kind'][kind]})" for kind, ms in k["ms_by_kind"].items()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
