"""bench/gaps.py: the device's idle gaps in a Chrome trace, and the host work that launched what came after."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gaps  # noqa: E402


def kernel(ts: float, dur: float, correlation: int, name: str = "k") -> dict:
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}}


def launch(ts: float, correlation: int, name: str = "cudaGraphLaunch") -> dict:
    return {"cat": "cuda_runtime", "name": name, "ts": ts, "dur": 2.0, "args": {"correlation": correlation}}


def label(ts: float, dur: float, name: str) -> dict:
    return {"cat": "user_annotation", "name": name, "ts": ts, "dur": dur}


def test_gaps_are_counted_once_and_named_by_the_label_that_launched_the_next_work() -> None:
    events = [
        label(0, 10, "step"), launch(1, 1), kernel(5, 100, 1, "a"),
        kernel(50, 20, 9, "overlapping"),  # inside a's span: no gap, no busy time counted twice
        label(100, 80, "read"), label(180, 30, "collate"),
        label(210, 10, "step"), launch(212, 2), kernel(215, 50, 2, "b"),  # idle 105..215, launched late
        launch(230, 3), kernel(268, 10, 3, "c"),  # 265..268: 3 us, under the threshold
        label(300, 5, "other"),  # not asked for: not a label
    ]
    out = gaps.device_gaps(events, labels=("step", "read", "collate"), min_us=5.0)
    assert out["busy_us"] == 100 + 50 + 10 and out["span_us"] == 278 - 5 and out["idle_us"] == 273 - 160
    assert out["gaps"] == 1
    (gap,) = out["largest"]
    assert gap["gap_us"] == 110 and gap["before"] == "a" and gap["after"] == "b"
    assert gap["label"] == "step" and gap["launched_by"] == "cudaGraphLaunch"
    assert gap["launch_after_idle_us"] == 212 - 105 and gap["label_when_idle"] == "read"
    assert out["idle_by_label"] == {"step / cudaGraphLaunch": {"us": 110.0, "gaps": 1}}


def test_a_trace_without_device_work_has_no_gaps() -> None:
    assert gaps.device_gaps([label(0, 5, "step")], labels=("step",))["gaps"] == 0
