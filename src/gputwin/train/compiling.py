"""train.compile: whether an arm's decoder layers go through torch.compile, and where the compiler's caches live.

Compiled layers fuse the many small kernels of a step (norms, rotary embeddings, LoRA's dropout and adds,
the MLP's activation) that the CUDA-graph step still runs one by one, so a step takes less time
(bench/RESULTS.md, "Compiled decoder layers"). The price is a compilation in each trainer process before its
first compiled step: long the first time on a machine, short once the compiler's on-disk caches (Inductor's
FX graph and AOT autograd caches, its Triton kernels) hold this layer. The caches live in the logs folder's
`.cache/inductor` (unless TORCHINDUCTOR_CACHE_DIR names another place), so they outlast /tmp and reboots.

"on" compiles on a GPU, "off" never. "auto" compiles when the run is expected to win its compilation back:
the steps it plans times the time compiling saves a step (SAVED_S_PER_TOKEN, measured, times the tokens of
a step) against what a compilation is expected to cost: what it cost the last time for this layer on this
machine (a record beside the cache, written after each compilation), or COLD_S where none is recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Measured on one H100 (bench/RESULTS.md, "Compiled decoder layers"), Qwen3-0.6B at the seed's settings: the
# compilation of a trainer process with empty caches (53.5 s before the first step, about 13 s more as new
# shapes came), and what a compiled step saves a token against the CUDA-graph step (17.2 -> 14.8 ms a step of
# 998 tokens). With warm caches a compilation still cost 39 s there: the record gives that figure once one ran.
COLD_S = 66.0
SAVED_S_PER_TOKEN = 2.4e-6


@dataclass(frozen=True)
class Decision:
    on: bool
    why: str
    expected_s: float | None = None  # what the compilation is expected to cost
    saves_s: float | None = None  # what it is expected to save over the planned steps
    cache: Path | None = None  # the compiler's cache folder (use_cache) and this layer's key in it
    key: str | None = None

    def status(self) -> dict[str, Any]:
        """The started event's fast_paths.compile."""
        return {"on": self.on, "why": self.why}


def cache_folder(logs_root: Path) -> Path:
    return logs_root / ".cache" / "inductor"


def use_cache(logs_root: Path) -> Path:
    """Point the compiler's caches at the logs folder (an explicit TORCHINDUCTOR_CACHE_DIR stays); before
    torch._inductor reads its configuration, i.e. before the first compilation."""
    folder = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_folder(logs_root))))
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def layer_key(model_config: dict[str, Any], lora: dict[str, Any], dtype: str, device_name: str,
              torch_version: str) -> str:
    """What a compiled layer depends on: the model's shape, the adapter's, the dtype, the GPU and torch."""
    text = json.dumps({"model": {k: v for k, v in sorted(model_config.items()) if not k.startswith("_")},
                       "lora": lora, "dtype": dtype, "device": device_name, "torch": torch_version},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _record_path(cache: Path, key: str) -> Path:
    return cache / "gputwin" / f"{key}.json"


def recorded_seconds(cache: Path, key: str) -> float | None:
    """What the last compilation of this layer cost here, if one was recorded (a bad record counts as none)."""
    try:
        seconds = json.loads(_record_path(cache, key).read_text(encoding="utf-8"))["seconds"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(seconds) if isinstance(seconds, (int, float)) and seconds >= 0 else None


def record(cache: Path, key: str, seconds: float) -> None:
    path = _record_path(cache, key)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"seconds": round(seconds, 2), "at": time.time()}), encoding="utf-8")
    os.replace(tmp, path)


def decide(mode: str, *, on_gpu: bool, engine: str, steps: int, tokens_per_step: float,
           recorded_s: float | None) -> Decision:
    """Whether to compile: mode is train.compile; steps the run plans; recorded_s: recorded_seconds()."""
    if mode == "off":
        return Decision(False, "off (train.compile)")
    if engine != "fast":
        return Decision(False, f"the {engine} engine runs eagerly; compiling is the fast engine's")
    if not on_gpu:
        return Decision(False, "compiled layers are for a GPU; off on this device")
    if mode == "on":
        return Decision(True, "on (train.compile)", expected_s=recorded_s)
    expected = COLD_S if recorded_s is None else recorded_s
    saves = steps * tokens_per_step * SAVED_S_PER_TOKEN
    cost = (f"a compilation costs ~{expected:.0f} s here (" +
            ("the last one on this machine)" if recorded_s is not None else "the first on this machine)"))
    if saves > expected:
        return Decision(True, f"auto: {steps} steps save ~{saves:.0f} s; {cost}", expected, saves)
    return Decision(False, f"auto: {steps} steps would save ~{saves:.0f} s; {cost}", expected, saves)


def follow(engine: Any, decision: Decision) -> None:
    """The engine's started-event status says why it compiles or not, and a compiling engine's first compiled
    step's seconds are recorded for the next decision here."""
    paths = getattr(engine, "paths", None)
    if isinstance(paths, dict) and "compile" in paths:
        paths["compile"] = decision.status()
    if decision.on and decision.cache is not None and decision.key is not None and hasattr(engine, "on_compiled"):
        cache, key = decision.cache, decision.key
        engine.on_compiled = lambda seconds: record(cache, key, seconds)
