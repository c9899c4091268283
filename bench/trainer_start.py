"""A trainer's start-up, code against code: `python -m gputwin.train ARM` as a fresh process, from its start to its
`started` event, the tokenised-data cache emptied before each start (the data is tokenised every time).

    python3 bench/trainer_start.py --model DIR --train F --test F [--src old=DIR] [--device cpu|0]
                                   [--rounds 3] [--tag T] [--results DIR]

Each code (this checkout's `src`, named `new`, and every --src NAME=DIR: another checkout's `src`, e.g. from
`git archive REV src | tar -x -C DIR`) starts the same one-arm profile (the seed's conservative arm: r8/alpha16,
q/k/v/o, batch 4, max_length 512, the fast engine) in turn, round after round, so drift touches each alike.
Reported per code, median over the rounds: seconds to the `started` event (process start included) and the
trainer's own start-up phases (its `startup_seconds`: data beside model, lora and engine; total their wall time).
Prints a table and writes RESULTS/trainer_start_TAG.json (default bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from gputwin.core.profiles import DataSpec, LoraSpec, MilestoneSpec, ModelSpec, Profile, TrainSpec  # noqa: E402

PHASES = ("imports", "tokenizer", "data", "model", "lora", "engine", "data_wait", "total")


def profile(model: Path, train: Path, test: Path, device: int | None) -> Profile:
    return Profile(name="arm", model=ModelSpec(base=str(model), task="generate", dtype="auto"),
                   lora=LoraSpec(r=8, alpha=16, dropout=0.05, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
                   train=TrainSpec(learning_rate=1e-4, batch_size=4, epochs=1, max_length=512, warmup_steps=50,
                                   scheduler="linear", seed=7, engine="fast", compile="off"),
                   data=DataSpec(train=str(train), test=str(test)),
                   milestone=MilestoneSpec(step=879, sample_size=500, sample_seed=1), device=device)


def start_once(src: Path, arm_profile: Profile, work: Path, wait_s: float) -> dict[str, Any]:
    """One fresh trainer on an empty cache, killed once it has said `started`."""
    shutil.rmtree(work, ignore_errors=True)
    arm = work / "logs" / "bench" / arm_profile.name
    arm.mkdir(parents=True)
    (arm / "profile.json").write_text(json.dumps(arm_profile.to_dict(), indent=2), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(src), GPUTWIN_WARM="off")
    began = time.perf_counter()
    with open(arm / "stderr.log", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gputwin.train", str(arm)], env=env, cwd=work,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        while time.perf_counter() - began < wait_s and proc.poll() is None:
            for line in (arm / "events.jsonl").read_text().splitlines() if (arm / "events.jsonl").exists() else ():
                event = json.loads(line)
                if event.get("kind") == "started":
                    return {"started_s": round(time.perf_counter() - began, 3), **event["startup_seconds"]}
            time.sleep(0.02)
        return {"error": f"no started event (exit {proc.poll()}): {(arm / 'stderr.log').read_text()[-1500:]}"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a model folder (weights and tokenizer)")
    parser.add_argument("--train", type=Path, required=True, help="training data (JSONL)")
    parser.add_argument("--test", type=Path, required=True, help="test data (JSONL)")
    parser.add_argument("--src", action="append", default=[], metavar="NAME=DIR", help="another code to start")
    parser.add_argument("--device", default="cpu", help="cpu, or a GPU index")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--wait", type=float, default=300, help="seconds to wait for a `started` event")
    parser.add_argument("--tag", default="local")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    codes = {"new": REPO / "src", **{n: Path(d).resolve() for n, d in (s.split("=", 1) for s in args.src)}}
    arm_profile = profile(args.model.resolve(), args.train.resolve(), args.test.resolve(),
                          None if args.device == "cpu" else int(args.device))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in codes}
    with tempfile.TemporaryDirectory(prefix="gputwin-trainer-start-") as tmp:
        for _ in range(args.rounds):
            for name, src in codes.items():
                runs[name].append(start_once(src, arm_profile, Path(tmp) / name, args.wait))
    errors = [r["error"] for rs in runs.values() for r in rs if "error" in r]
    if errors:
        raise SystemExit("a trainer did not start:\n" + errors[0])
    columns = ("started_s", *PHASES)
    medians = {name: {c: statistics.median(float(r[c]) for r in rs) for c in columns if all(c in r for r in rs)}
               for name, rs in runs.items()}
    print(f"{'code':10}" + "".join(f"{c:>11}" for c in columns) + "   (seconds, median of " + f"{args.rounds})")
    for name, row in medians.items():
        print(f"{name:10}" + "".join(f"{row[c]:>11.3f}" if c in row else f"{'-':>11}" for c in columns))
    import torch
    import transformers

    record = {"command": " ".join(sys.argv), "device": args.device if args.device == "cpu" else
              torch.cuda.get_device_name(int(args.device)), "cores": os.cpu_count(), "torch": torch.__version__,
              "transformers": transformers.__version__, "codes": {n: str(p) for n, p in codes.items()},
              "medians": medians, "runs": runs}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"trainer_start_{args.tag}.json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
