"""Where the device waits: idle gaps between kernels in a torch.profiler Chrome trace, and what the host did.

`trace(device, steps, labels, out)` runs `steps()` under torch.profiler (CPU and CUDA activities), writes the
trace gzipped to `out`, and returns `device_gaps` of it. `device_gaps(events)` is pure (a trace's
"traceEvents"): the device's busy intervals are its kernels, copies and memsets; a gap is the time between two
busy intervals. For each gap it names the host work that launched the work after it (the runtime call with the
same correlation id, and the innermost of the caller's `record_function` labels open at that call) and how long
after the gap began the host issued that call: a launch that comes late means the host kept the device waiting.
"""

from __future__ import annotations

import bisect
import gzip
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def device_gaps(events: Iterable[dict[str, Any]], labels: Sequence[str] = (), min_us: float = 5.0,
                top: int = 12) -> dict[str, Any]:
    """Idle time of the device between its first and last work, by the host label that launched what came next."""
    events = list(events)
    device = sorted((e for e in events if e.get("cat") in DEVICE_CATS and "dur" in e), key=lambda e: e["ts"])
    if not device:
        return {"busy_us": 0.0, "span_us": 0.0, "idle_us": 0.0, "gaps": 0, "idle_by_label": {}, "largest": []}
    runtime = {e["args"]["correlation"]: e for e in events
               if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    spans = sorted(((e["ts"], e["ts"] + e.get("dur", 0.0), e["name"]) for e in events
                    if e.get("cat") == "user_annotation" and e.get("name") in labels), key=lambda s: s[0])
    starts = [s[0] for s in spans]

    def label_at(ts: float) -> str:
        """The innermost (latest begun) label open at ts on the host, else "-"."""
        i = bisect.bisect_right(starts, ts)
        for begin, end, name in reversed(spans[max(0, i - 64):i]):
            if begin <= ts <= end:
                return name
        return "-"

    gaps, busy_end, busy, last = [], device[0]["ts"], 0.0, device[0]
    for event in device:
        end = event["ts"] + event["dur"]
        if event["ts"] - busy_end >= min_us:
            launch = runtime.get(event.get("args", {}).get("correlation"))
            gaps.append({
                "gap_us": round(event["ts"] - busy_end, 1),
                "before": last["name"][:60], "after": event["name"][:60],
                "launched_by": launch["name"] if launch else "?",
                "label": label_at(launch["ts"]) if launch else "?",
                # > 0: the call came after the device had gone idle (the host was late)
                "launch_after_idle_us": round(launch["ts"] - busy_end, 1) if launch else None,
                "label_when_idle": label_at(busy_end),
            })
        busy += max(0.0, end - max(event["ts"], busy_end))
        if end >= busy_end:
            busy_end, last = end, event
    span = busy_end - device[0]["ts"]
    by_label: dict[str, list[float]] = {}
    for gap in gaps:
        entry = by_label.setdefault(f"{gap['label']} / {gap['launched_by']}", [0.0, 0])
        entry[0] += gap["gap_us"]
        entry[1] += 1
    return {"busy_us": round(busy, 1), "span_us": round(span, 1), "idle_us": round(span - busy, 1),
            "gaps": len(gaps),
            "idle_by_label": {k: {"us": round(v[0], 1), "gaps": v[1]}
                              for k, v in sorted(by_label.items(), key=lambda kv: -kv[1][0])},
            "largest": sorted(gaps, key=lambda g: -g["gap_us"])[:top]}


def trace(device: Any, steps: Callable[[], None], labels: Sequence[str], out: Path, repeats: int) -> dict[str, Any] | None:
    """`steps()` (`repeats` steps) under torch.profiler with CPU and CUDA activities: the gzipped Chrome trace at
    `out`, and device_gaps with figures a step. None off CUDA."""
    if device.type != "cuda":
        return None
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        steps()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        data = json.loads(raw.read_text(encoding="utf-8"))
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt", encoding="utf-8") as f:
        json.dump(data, f)
    gaps = device_gaps(data.get("traceEvents", []), labels)
    gaps.update(trace=str(out), wall_ms_per_step=round(wall * 1000 / repeats, 3),
                idle_ms_per_step=round(gaps["idle_us"] / 1000 / repeats, 3),
                busy_ms_per_step=round(gaps["busy_us"] / 1000 / repeats, 3))
    return gaps
