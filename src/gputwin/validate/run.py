"""Validation: the same seeded held-out sample for every arm -> predicted entities -> entity-level P/R/F1.

`validate` is what the trainer calls in-process at the milestone with its live model; `cmd_validate` is
`gputwin validate` on a saved adapter or model. Both give the same result dict (written as JSON), so a
milestone result and a later re-validation can be compared field by field.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any, Sequence

from ..core.data import Sample, load_dataset
from ..core.errors import UserError
from .load import load_for_validation, read_meta, resolve_device
from .predict import model_device, predict

__all__ = ["select_samples", "validation_samples", "predict", "validate", "load_for_validation", "cmd_validate", "format_result"]

SCHEMA = 1


def select_samples(dataset: Any, sample_size: int, seed: int) -> tuple[list[int], list[Sample]]:
    """Sorted indices into dataset.samples and those samples: a pure function of (size of the set, size, seed),
    so every arm validated with the same seed sees exactly the same samples. sample_size <= 0 or > len: all."""
    total = len(dataset.samples)
    if sample_size <= 0 or sample_size >= total:
        indices = list(range(total))
    else:
        indices = sorted(random.Random(seed).sample(range(total), sample_size))
    return indices, [dataset.samples[i] for i in indices]


def validation_samples(test_path: str | Path, sample_size: int, seed: int) -> tuple[list[int], list[Sample]]:
    """The seeded held-out sample of test_path that validate() scores (indices into the file, and the samples)."""
    return select_samples(load_dataset(test_path), sample_size, seed)


def _model_name(model: Any) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "")
    return f"{type(model).__name__}({name})" if name else type(model).__name__


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Readers (UI, report) never see half a file: write beside it, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, ensure_ascii=False, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # (a full disk): no half-written file left to hold its space
        tmp.unlink(missing_ok=True)
        raise


def validate(model: Any, tokenizer: Any, *, task: str, test_path: str | Path, sample_size: int, seed: int,
             label_names: Sequence[str] | None = None, device: Any = "cpu", step: int | None = None,
             arm: str | None = None, out_path: Path | None = None, max_length: int = 512,
             batch_size: int = 0, decoder: str = "fast", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Predict on the seeded sample of test_path and score it; the result (with `extra`'s fields) is
    also written to out_path."""
    from ..core.metrics import evaluate

    started = time.perf_counter()
    indices, samples = validation_samples(test_path, sample_size, seed)
    preds, info = predict(model, tokenizer, samples, task=task, label_names=label_names, device=device,
                          batch_size=batch_size, max_length=max_length, decoder=decoder)
    metrics = evaluate([list(s.entities) for s in samples], preds, texts=[s.text for s in samples],
                       indices=indices, use_spans=False)
    result: dict[str, Any] = dict(metrics)
    result.update(
        schema=SCHEMA,
        arm=arm,
        step=step,
        task=task,
        test_data=str(test_path),
        sample_seed=seed,
        sample_indices=indices,
        n=len(samples),
        unparsable=info["unparsable"],
        unparsable_outputs=[{"index": indices[u["position"]], "output": u["output"]}
                            for u in info.get("unparsable_outputs", [])],
        truncated=info.get("truncated", 0),
        seconds=round(time.perf_counter() - started, 3),
        predict_seconds=info["seconds"],
        # generation's room and use, and where its seconds went
        **{k: info[k] for k in ("max_new_tokens", "generated_tokens", "phases", "decoder_missed") if k in info},
        batches=info["batches"],
        batch_size=info["batch_size"],
        decoder=info.get("decoder"),
        device=str(device),
        model=_model_name(model),
        **(extra or {}),
    )
    if out_path is not None:
        write_json_atomic(Path(out_path), result)
    return result


# ---------------------------------------------------------------- gputwin validate


def _pct(x: Any) -> str:
    return f"{100 * x:5.1f}" if isinstance(x, (int, float)) else "    -"


def format_result(result: dict[str, Any]) -> str:
    """The terminal table: overall and per-type precision/recall/F1, then what else went on."""
    rows = [("TYPE", "P %", "R %", "F1 %", "GOLD", "TP", "FP", "FN")]
    for etype, m in sorted(result.get("per_type", {}).items()):
        rows.append((etype, _pct(m.get("precision")), _pct(m.get("recall")), _pct(m.get("f1")),
                     str(m.get("support", "")), str(m.get("tp", "")), str(m.get("fp", "")), str(m.get("fn", ""))))
    gold = result.get("tp", 0) + result.get("fn", 0)
    rows.append(("overall", _pct(result.get("precision")), _pct(result.get("recall")), _pct(result.get("f1")),
                 str(gold), str(result.get("tp", "")), str(result.get("fp", "")), str(result.get("fn", ""))))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        if k == len(rows) - 1:
            lines.append("  ".join("-" * w for w in widths))
        lines.append("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))))
    lines.append("")
    lines.append(f"macro F1 {_pct(result.get('macro_f1')).strip()}%   samples {result.get('n')}   "
                 f"unparsable {result.get('unparsable')}   truncated {result.get('truncated', 0)}   "
                 f"{result.get('seconds', 0):.1f} s ({result.get('task')}, {result.get('device')})")
    return "\n".join(lines)


def cmd_validate(args: Any) -> int:
    """`gputwin validate --model DIR --test-data FILE ...`: prints the table, writes --json."""
    if args.sample_size < 1:
        raise UserError(f"--sample-size {args.sample_size}: expected a positive number of samples",
                        hint="e.g. --sample-size 500 (a number above the test set size takes all samples)")
    if args.batch_size < 0:
        raise UserError(f"--batch-size {args.batch_size}: expected 0 (automatic) or a positive number")
    max_length = getattr(args, "max_length", 0)
    if max_length < 0 or 0 < max_length < 8:
        raise UserError(f"--max-length {max_length}: expected 0 (from the adapter) or at least 8 tokens",
                        hint="use the max_length the arms validate with, e.g. --max-length 512")
    model_dir = Path(args.model).expanduser()
    if not model_dir.is_dir():  # before anything heavy is imported
        raise UserError(f"--model {model_dir}: no such folder",
                        hint="give an adapter folder (adapter_config.json) or a model folder (config.json)")
    test_path = Path(args.test_data).expanduser()
    load_dataset(test_path)  # a bad test file fails before a model is loaded
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the table is the output; no weight-loading bars on stderr
    device = resolve_device(args.device)
    model, tokenizer, task, label_names = load_for_validation(args.model, base=args.base, task=args.task,
                                                              device=device)
    max_length = max_length or int(read_meta(args.model).get("max_length") or 512)
    result = validate(model, tokenizer, task=task, test_path=test_path, sample_size=args.sample_size,
                      seed=args.seed, label_names=label_names, device=model_device(model), max_length=max_length,
                      batch_size=args.batch_size, decoder=args.decoder)
    result["model_dir"] = str(Path(args.model).expanduser())
    if args.json_out:
        write_json_atomic(Path(args.json_out), result)
    print(format_result(result))
    if args.json_out:
        print(f"result written to {args.json_out}")
    return 0
