"""CUDA graphs of a whole training step, one per batch shape, all drawing on one memory pool.

Shared by the fast engine's step (fast.FastStep) and the co-trained arms' step (cofast.GroupFastStep).

When a step meets a shape for the first time it runs eagerly: a real step that trains, and that does the lazy
set-up a capture must not meet (optimizer state, library handles, the kernels' choices for that shape). The
second time the shape comes, the step is captured, with no warm-up step of its own, and every later time it is
replayed. A shape met once costs one eager step (a few times a replay) instead of a warm-up, a capture and an
instantiation (about 0.6 s for the seed's co-trained row on an H100, bench/RESULTS.md). capture() with a warm-up
is for capturing shapes before they are met (FastStep.prepare).

eager_first="once" runs eagerly only until the first graph exists: after that, a new shape is captured the
first time it is met and replayed for that same step. It saves one eager step (a few times a replay) for each
shape after the first, and suits a step whose set-up is not per shape: one arm's step (fast.FastStep), whose
optimizer state exists after its first step, unless its layers are compiled (a new shape may compile them
again, which must not happen inside a capture). `family` narrows "the first graph" to the first of the key's
family: the co-trained step (cofast.GroupFastStep) runs eagerly the first step of each set of arms (their
optimizers' state, the adapters' layout constants), and captures that set's later new shapes when met.

A capture runs on a stream of the graphs' own, after the device is synchronised and the allocator's cache
emptied, as torch.cuda.graph does it; `sync_captures = False` (lean) only makes that stream wait for the queued
work and empties the cache only after eager steps (bench/train_throughput.py's `engine+leancapture`).

Each capture is logged (`log`): the shape, its seconds (and of them, the wait for the device and the cache,
the recording and the graph's instantiation) and the memory reserved after it, so a bench can show where a
run's captures and its memory went.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch


@dataclass
class Captured:
    graph: Any         # torch.cuda.CUDAGraph
    inputs: Any        # the static device batch the graph reads: copy each step's batch into it
    outputs: Any       # what the captured body returned: read (clone) after each replay


class ShapeGraphs:
    """The graphs of one step function, by shape key; eager_first: run a shape eagerly the first time it is met
    ("each" or True), only until a first graph of its family exists ("once"), or never (False).
    family(key): what a key shares its set-up with (default: every key, one family)."""

    def __init__(self, device: torch.device, *, eager_first: bool | str = True,
                 family: Callable[[Hashable], Hashable] | None = None) -> None:
        self.device, self.eager_first = device, eager_first
        self.family = family or (lambda key: None)
        self._graphs: dict[Hashable, Captured] = {}
        self._met: set[Hashable] = set()
        self._pool: Any = None
        self.captures, self.capture_seconds, self.eager_steps = 0, 0.0, 0
        self._stream: Any = None  # the captures' stream, one for all (as torch.cuda.graph's default)
        self._eager_since_capture = True  # eager blocks cached since the last capture: emptied before the next
        # True (as torch.cuda.graph does it): synchronise the device and empty the allocator's cache before every
        # capture. False (lean): the capture stream only waits for the work already queued, and the cache is
        # emptied only after eager steps; not yet shown faster (bench/RESULTS.md), so not the default
        self.sync_captures = True
        self.log: list[dict[str, Any]] = []

    def get(self, key: Hashable) -> Captured | None:
        return self._graphs.get(key)

    def first_meeting(self, key: Hashable) -> bool:
        """True when this step should run eagerly: the shape has not been met before (and is met now)."""
        if not self.eager_first or key in self._met:
            return False
        if self.eager_first == "once" and any(self.family(k) == self.family(key) for k in self._graphs):
            return False
        self._met.add(key)
        self.eager_steps += 1
        self._eager_since_capture = True
        return True

    def clear(self) -> None:
        """Drop the graphs (they point at optimizer state that a checkpoint load replaced); the shapes stay met,
        since the set-up their eager steps did still holds."""
        self._graphs.clear()

    def capture(self, key: Hashable, static: Any, body: Callable[[Any], Any],
                warm_up: Callable[[], None] | None = None) -> Captured:
        """Capture body(static) under `key`. warm_up (which must leave the model as it was) runs first on a side
        stream, for a shape no eager step has met."""
        started = time.perf_counter()
        current = torch.cuda.current_stream(self.device)
        if warm_up is not None:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                warm_up()
            current.wait_stream(side)
            self._eager_since_capture = True
        waited = time.perf_counter()
        if self.sync_captures:  # as torch.cuda.graph does it
            torch.cuda.synchronize(self.device)
        if self._eager_since_capture or self.sync_captures:  # eager blocks: the graph allocates from its own pool
            torch.cuda.empty_cache()
            self._eager_since_capture = False
        recording = time.perf_counter()
        self._stream = self._stream or torch.cuda.Stream(self.device)
        self._stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(self._stream):
            graph.capture_begin(*((self._pool,) if self._pool is not None else ()), capture_error_mode="thread_local")
            try:
                outputs = body(static)
            except BaseException:
                with contextlib.suppress(RuntimeError):  # the capture's own error, after the one that matters
                    graph.capture_end()
                raise
            recorded = time.perf_counter()
            graph.capture_end()
        current.wait_stream(self._stream)
        self._pool = self._pool or graph.pool()
        captured = self._graphs[key] = Captured(graph, static, outputs)
        self._met.add(key)
        seconds = time.perf_counter() - started
        self.captures += 1
        self.capture_seconds += seconds
        self.log.append({"shape": repr(key), "seconds": round(seconds, 3), "warm_up": warm_up is not None,
                         "wait_seconds": round(recording - waited, 3),  # the device synchronised, the cache emptied
                         "record_seconds": round(recorded - recording, 3),
                         "instantiate_seconds": round(time.perf_counter() - recorded, 3),
                         "reserved_gib": round(torch.cuda.memory_reserved(self.device) / 2**30, 2),
                         "allocated_gib": round(torch.cuda.memory_allocated(self.device) / 2**30, 2)})
        return captured

    def summary(self) -> dict[str, Any]:
        """Counts and times for a bench's or an event's record."""
        return {"captures": self.captures, "capture_seconds": round(self.capture_seconds, 2),
                "eager_steps": self.eager_steps, "log": self.log}
