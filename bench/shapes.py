"""Batch shapes: what the shape plan (train/shapeplan.py) gives a run against the fixed buckets, counted.

For the trainer's data order over a run, every step's packed row under two rules:
  coarse   the fixed buckets (rows in 128 tokens, label slots in 256; a co-trained row twice those), as before
  planned  the shapes planned from the run's batches (shapeplan.ShapePlan)
Reported: distinct shapes (each one a CUDA graph capture), padding tokens and unused label slots as shares of
what the steps compute, and the cost model's total in tokens (what the steps compute plus a capture a shape).
These are counts, not timings: the same on any machine. No GPU needed.

  python bench/shapes.py                                   # the bench's synthetic samples (train_throughput's)
  python bench/shapes.py --train T.jsonl --tokenizer DIR   # a dataset, tokenised as the trainer does
  python bench/shapes.py --smoke                           # a few steps (the tests)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import common
from gputwin.train import shapeplan
from gputwin.train.batching import EpochBatches, Example
from gputwin.train.cofast import group_buckets
from gputwin.train.packing import LABEL_BUCKET, ROW_BUCKET
from gputwin.train.shapeplan import Buckets, Need, ShapePlan, need_of

BATCH = 4


def examples_of(args: argparse.Namespace) -> list[Example]:
    if args.train:
        from transformers import AutoTokenizer

        from gputwin.core.data.loading import load_dataset
        from gputwin.train.batching import encode_samples

        dataset = load_dataset(args.train)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        return encode_samples(list(getattr(dataset, "samples", dataset)), tokenizer, task="generate",
                              max_length=args.max_length)
    config = common.model_config(args.smoke)
    samples = common.synthetic_samples(args.samples, seed=args.seed, vocab_size=config.vocab_size,
                                       eos_id=int(config.eos_token_id))
    return [Example(s["input_ids"], s["labels"], False) for s in samples]


def counted(name: str, plan: ShapePlan, needs: Sequence[Need]) -> dict[str, Any]:
    shapes = [plan.shape_for(need) for need in needs]
    length, slots = sum(s.length for s in shapes), sum(s.slots for s in shapes)
    distinct = len(set(zip((n.kind for n in needs), shapes)))
    captures = sum(plan.capture_for(kind) for kind, _ in set(zip((n.kind for n in needs), shapes)))
    return {"rule": name, "steps": len(needs), "shapes": distinct,
            "padding_share": round(1 - sum(n.tokens for n in needs) / length, 4),
            "unused_slot_share": round(1 - sum(n.labels for n in needs) / slots, 4),
            "cost_tokens": round(sum(s.cost() for s in shapes) + captures)}


def rows(examples: Sequence[Example], steps: int, seed: int, arms: int) -> list[Need]:
    """The needs of `steps` steps in the trainer's data order; with arms > 1, every arm's batch in one row (the
    arms on the same data order, as the seed's two arms are)."""
    order = EpochBatches(len(examples), BATCH, seed)
    per_epoch = len(examples) // BATCH
    family = tuple(f"arm{k}" for k in range(arms)) if arms > 1 else ()
    return [need_of([examples[i] for i in order.indices(step // per_epoch, step % per_epoch)] * arms, family)
            for step in range(steps)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", help="a dataset file (else the bench's synthetic samples)")
    parser.add_argument("--tokenizer", help="the tokenizer folder for --train")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--samples", type=int, default=3516)
    parser.add_argument("--steps", default="200,879,1758", help="run lengths to plan, comma-separated")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=common.OUT_DIR)
    args = parser.parse_args(argv)
    if args.train and not args.tokenizer:
        parser.error("--train needs --tokenizer")
    if args.smoke:
        args.samples, args.steps = 64, "12"
    examples = examples_of(args)
    results = []
    for arms in (1, 2):
        for steps in (int(s) for s in args.steps.split(",")):
            needs = rows(examples, steps, args.seed, arms)
            coarse = ShapePlan(Buckets(ROW_BUCKET, LABEL_BUCKET) if arms == 1 else group_buckets)
            planned = ShapePlan(Buckets(ROW_BUCKET, LABEL_BUCKET) if arms == 1 else group_buckets)
            planned.add(needs)
            for r in (counted("coarse", coarse, needs), counted("planned", planned, needs)):
                results.append({"arms": arms, **r})
    data = "synthetic (train_throughput's)" if not args.train else str(args.train)
    path = common.write_json(args.out, f"shapes{'-' + args.tag if args.tag else ''}", {
        "bench": "shapes", "data": data, "examples": len(examples), "batch": BATCH,
        "model": {"capture_tokens": shapeplan.CAPTURE_TOKENS, "slot_tokens": shapeplan.SLOT_TOKENS,
                  "row_step": shapeplan.ROW_STEP, "slot_step": shapeplan.SLOT_STEP}, "results": results})
    common.print_table(f"batch shapes, {data} ({len(examples)} samples, batch {BATCH}) -> {path}", results,
                       ["arms", "steps", "rule", "shapes", "padding_share", "unused_slot_share", "cost_tokens"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
