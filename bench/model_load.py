"""The base model's load onto the GPU in a trainer forked warm (imports done, CUDA started just before), three ways.

    python3 bench/model_load.py --model DIR [--rounds 3] [--device cuda] [--tag h100] [--results DIR]

Each measurement runs in a fork of this process, as a warm server's trainer does: what the server imports
(gputwin.train.warm.IMPORTS) is imported before the fork, and the fork starts CUDA, then loads (the model's files are in the page cache after
the first round). Variants:
  - `gputwin`: what the trainer runs (gputwin.validate.modeling.load_base: from_pretrained on the CPU, then
    .to(device));
  - `device_map`: from_pretrained(device_map=device), the weights read straight to the device;
Each variant's parameters and buffers are checked against `gputwin`'s (same names, dtypes, devices and values).
With --data TRAIN_JSONL --tokenizer DIR, each load also runs beside the trainer's tokenising of that data (as a
trainer's start-up does when the data is not cached), in each of --beside: `thread` (a thread of the loading
process, as trainers did before) and `process` (a fork of it, gputwin.train.background.in_child: what trainers do
now), at each of --switch-intervals (seconds: Python's GIL switch interval, sys.setswitchinterval; the default is
0.005). `data s` is when the data was there, counted from the load's start.
--prepare-loading: before forking, what a warm server does before it serves (gputwin.train.warm.prepare_loading).
Prints a table and writes RESULTS/model_load_TAG.json (default bench/results/).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from gputwin.train.warm import IMPORTS, prepare_loading  # noqa: E402
from gputwin.validate import modeling  # noqa: E402

for _module in IMPORTS:  # what a warm server has imported before it forks a trainer
    importlib.import_module(_module)


def load_gputwin(model_dir: str, device: str) -> Any:
    return modeling.load_base(model_dir, task="generate", dtype=torch.bfloat16, device=device)


def load_device_map(model_dir: str, device: str) -> Any:
    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.bfloat16,
                                                device_map=device)


VARIANTS: dict[str, Callable[[str, str], Any]] = {"gputwin": load_gputwin, "device_map": load_device_map}


def fingerprint(model: Any) -> dict[str, Any]:
    """Every parameter's and buffer's dtype, device and a checksum, by name."""
    out = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        out[name] = (str(tensor.dtype), tensor.device.type, float(tensor.detach().double().sum()),
                     float(tensor.detach().double().abs().sum()))
    return out


def in_fork(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            result = work()
        except BaseException as exc:  # reported by the parent
            result = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(write, json.dumps(result).encode())
        os.close(write)
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 1 << 16):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


def measure(variant: str, model_dir: str, device: str, check: bool, interval: float = 0.005,
            data: tuple[str, str] | None = None, how: str = "thread") -> dict[str, Any]:
    def work() -> dict[str, Any]:
        sys.setswitchinterval(interval)
        begin = time.perf_counter()
        if device.startswith("cuda"):
            torch.zeros(1, device=device)
            torch.cuda.synchronize()
        cuda_s = time.perf_counter() - begin
        tokenising = beside(*data, how) if data else None
        begin = time.perf_counter()
        model = VARIANTS[variant](model_dir, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        result: dict[str, Any] = {"cuda_start_s": round(cuda_s, 3), "load_s": round(time.perf_counter() - begin, 3)}
        if tokenising is not None:
            tokenising()
            result["data_s"] = round(time.perf_counter() - begin, 3)
        if check:
            result["fingerprint"] = fingerprint(model)
        return result

    return in_fork(work)


def beside(train: str, tokenizer_dir: str, how: str) -> Callable[[], Any]:
    """The trainer's tokenising of `train` (tokcache, into a fresh folder) on a thread or in a fork, started now;
    returns what waits for its data."""
    from transformers import AutoTokenizer

    from gputwin.train import background, tokcache

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    folder = Path(tempfile.mkdtemp())

    def work() -> tokcache.TrainingData:
        return tokcache.load_training_data(train, tokenizer, base=tokenizer_dir, task="generate", max_length=512,
                                           folder=folder)

    if how == "process":
        future = background.in_child(work, "data", send=lambda one: tokcache.to_wire([one]),
                                     receive=lambda raw: tokcache.from_wire(raw)[0])
    else:
        future = background.in_background(work, "data")
    return future.result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model folder (config.json and safetensors)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--data", help="a training JSONL to tokenise beside each load (with --tokenizer)")
    parser.add_argument("--tokenizer", help="the tokenizer folder for --data")
    parser.add_argument("--switch-intervals", default="0.005", help="GIL switch intervals to run each load at")
    parser.add_argument("--beside", default="thread,process", help="where the data is tokenised: thread, process")
    parser.add_argument("--prepare-loading", action="store_true",
                        help="before forking, what a warm server does before serving (warm.prepare_loading)")
    parser.add_argument("--tag", default="local")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    data = (args.data, args.tokenizer) if args.data else None
    if args.prepare_loading:
        prepare_loading()
    intervals = [float(x) for x in args.switch_intervals.split(",")]
    ways = args.beside.split(",") if data else ["-"]
    cases = [(variant, interval, how)
             for variant in args.variants.split(",") for interval in intervals for how in ways]
    reference = measure("gputwin", args.model, args.device, check=True)  # also puts the files in the page cache
    if "error" in reference:
        raise SystemExit(f"gputwin's load failed: {reference['error']}")
    same = {}
    for variant in args.variants.split(","):
        got = measure(variant, args.model, args.device, check=True)
        same[variant] = got.get("fingerprint") == reference["fingerprint"] if "error" not in got else got["error"]
    rows: dict[tuple[str, float, str], list[dict[str, Any]]] = {case: [] for case in cases}
    for _ in range(args.rounds):
        for variant, interval, how in cases:  # alternating, so that drift touches every case alike
            rows[variant, interval, how].append(
                measure(variant, args.model, args.device, False, interval, data, how))
    print(f"{'variant':12} {'switch s':>9} {'data in':>8} {'load s (median)':>16} {'each':>24} {'data s (median)':>16}  "
          "same weights")
    summary = []
    for (variant, interval, how), runs in rows.items():
        loads = [r["load_s"] for r in runs if "load_s" in r]
        datas = [r["data_s"] for r in runs if "data_s" in r]
        row = {"variant": variant, "switch_interval_s": interval, "beside_data": bool(data), "data_in": how,
               "load_s": loads,
               "median_s": statistics.median(loads) if loads else None, "data_s": datas,
               "data_median_s": statistics.median(datas) if datas else None,
               "cuda_start_s": [r.get("cuda_start_s") for r in runs], "same_as_gputwin": same[variant],
               "errors": [r["error"] for r in runs if "error" in r]}
        summary.append(row)
        print(f"{variant:12} {interval:>9} {how:>8} {row['median_s']!s:>16} {str(loads):>24} {row['data_median_s']!s:>16}  "
              f"{same[variant]}")
    import transformers

    record = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
              else "cpu", "torch": torch.__version__, "transformers": transformers.__version__, "prepare_loading": args.prepare_loading,
              "variants": summary}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"model_load_{args.tag}.json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
