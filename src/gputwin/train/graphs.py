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

Captures ahead (capture_ahead): a capture records work and runs none, so while the device runs the steps
already issued it idles. A shape the trainer knows it will meet (its planned steps, train/shapeplan.py) is
captured in a thread of the graphs' own while this thread goes on replaying other shapes: the recording's tenth
of a second leaves the critical path. One capture at a time; whatever else touches the model or the device's
capture state (an eager step, a capture here, clearing, a validation, a checkpoint load) waits for it first
(wait(); the engines' quiesce()). Only shapes whose set-up is done are captured ahead (a shape met, or a family
with a graph under eager_first "once"). An ahead capture that fails turns them off for the run, said in the
log; the shape is then captured when met, as before. Steps that draw random numbers (LoRA dropout) are never
captured ahead: beginning a capture resets the random stream's offset that the graphs replaying meanwhile
read, so their dropout masks would no longer be the run's own (ahead_status; refuse_ahead).

Each capture is logged (`log`): the shape, its seconds (and of them, the wait for the device and the cache,
the recording and the graph's instantiation), whether it ran ahead, and the memory reserved after it, so a
bench can show where a run's captures and its memory went.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import torch

AHEAD = True  # captures ahead (capture_ahead) for new ShapeGraphs; benches switch it off to compare
AHEAD_WHY = "planned shapes captured in a thread of their own while earlier steps replay"
AHEAD_OFF_WHY = "off (graphs.AHEAD): each shape captured when met"


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
        # captures ahead: one thread, one capture at a time (the key and its future), off after a failure
        self.ahead_on, self.ahead_captures, self.ahead_waited = AHEAD, 0, 0.0
        self.ahead_why = AHEAD_WHY if AHEAD else AHEAD_OFF_WHY
        self._ahead: tuple[Hashable, Future[Captured]] | None = None
        self._worker: ThreadPoolExecutor | None = None
        self._thread_ready = False  # the worker thread's cuBLAS handles and workspaces exist

    def get(self, key: Hashable) -> Captured | None:
        """The graph of this shape; one being captured ahead is waited for."""
        if self._ahead is not None and self._ahead[0] == key:
            self.wait()
        return self._graphs.get(key)

    def has(self, key: Hashable) -> bool:
        """A graph of this shape exists or is being captured (never waits)."""
        return key in self._graphs or (self._ahead is not None and self._ahead[0] == key)

    def first_meeting(self, key: Hashable) -> bool:
        """True when this step should run eagerly: the shape has not been met before (and is met now)."""
        if not self.eager_first or key in self._met:
            return False
        self.wait()  # a capture ahead may give the family its graph; an eager step must not run beside one
        if self.eager_first == "once" and self._family_has_graph(key):
            return False
        self._met.add(key)
        self.eager_steps += 1
        self._eager_since_capture = True
        return True

    def _family_has_graph(self, key: Hashable) -> bool:
        return any(self.family(k) == self.family(key) for k in self._graphs)

    def clear(self) -> None:
        """Drop the graphs (they point at optimizer state that a checkpoint load replaced); the shapes stay met,
        since the set-up their eager steps did still holds."""
        self.wait()
        self._graphs.clear()

    # -- captures ahead

    def refuse_ahead(self, why: str) -> None:
        """No captures ahead in this run, and why (the engine's `fast_paths`)."""
        self.ahead_on, self.ahead_why = False, why

    def may_capture_ahead(self, key: Hashable) -> bool:
        """This shape could be captured now, ahead of meeting it: its set-up is done, nothing is being
        captured, and no ahead capture has failed."""
        if not self.ahead_on or self.busy() or key in self._graphs:
            return False
        return not self.eager_first or key in self._met or (self.eager_first == "once" and self._family_has_graph(key))

    def busy(self) -> bool:
        """A capture ahead is running."""
        return self._ahead is not None and not self._ahead[1].done()

    def capture_ahead(self, key: Hashable, static: Callable[[], Any], body: Callable[[Any], Any]) -> bool:
        """Start capturing body(static()) under `key` in the graphs' thread and return at once (False: not
        now, may_capture_ahead). static() makes the graph's input on the device, in that thread (a copy from
        pageable memory waits for the steps queued before it). Until it is waited for, this thread may only
        replay graphs and do host work."""
        if not self.may_capture_ahead(key):
            return False
        if self._ahead is not None:
            self.wait()  # a finished one: collect it (its error, if it failed)
            if not self.ahead_on:
                return False
        self._worker = self._worker or ThreadPoolExecutor(max_workers=1, thread_name_prefix="gputwin-capture")
        self._ahead = (key, self._worker.submit(self._capture_in_thread, key, static, body))
        return True

    def wait(self) -> None:
        """Wait for the capture ahead, if one runs; one that failed turns captures ahead off (logged)."""
        if self._ahead is None:
            return
        key, future = self._ahead
        began = time.perf_counter()
        try:
            future.result()
        except Exception as exc:  # the shape is captured when met instead, as without captures ahead
            self.refuse_ahead(f"a capture ahead failed ({type(exc).__name__}); shapes captured when met since")
            self.log.append({"shape": repr(key), "ahead": True, "failed": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"gputwin: capturing a step shape ahead failed ({type(exc).__name__}: {exc}); shapes are captured "
                  "when met from now on", file=sys.stderr)
        finally:
            self._ahead = None
            self.ahead_waited += time.perf_counter() - began

    def _capture_in_thread(self, key: Hashable, static: Callable[[], Any], body: Callable[[Any], Any]) -> Captured:
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, 0.001))  # the replaying thread gets the interpreter back soon
        try:
            with torch.cuda.device(self.device):
                started = time.perf_counter()
                self._stream = self._stream or torch.cuda.Stream(self.device)
                if not self._thread_ready:  # this thread's library handles, made outside any capture
                    with torch.cuda.stream(self._stream):
                        for dtype in (torch.float32, torch.bfloat16, torch.float16):
                            x = torch.ones(16, 16, device=self.device, dtype=dtype)
                            torch.nn.functional.linear(x, x, x[0]).matmul(x)
                    self._stream.synchronize()
                    self._thread_ready = True
                inputs = static()
                captured = self._record(key, inputs, body, started=started, waited=time.perf_counter(),
                                        warm_up=False, ahead=True)
            self.ahead_captures += 1
            return captured
        finally:
            sys.setswitchinterval(switch)

    def capture(self, key: Hashable, static: Any, body: Callable[[Any], Any],
                warm_up: Callable[[], None] | None = None) -> Captured:
        """Capture body(static) under `key`. warm_up (which must leave the model as it was) runs first on a side
        stream, for a shape no eager step has met."""
        self.wait()  # one capture at a time
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
        self._stream = self._stream or torch.cuda.Stream(self.device)
        self._stream.wait_stream(current)
        captured = self._record(key, static, body, started=started, waited=waited, warm_up=warm_up is not None)
        current.wait_stream(self._stream)
        return captured

    def _record(self, key: Hashable, static: Any, body: Callable[[Any], Any], *, started: float, waited: float,
                warm_up: bool, ahead: bool = False) -> Captured:
        """Capture body(static) on the captures' stream into the graphs' pool, and log it."""
        recording = time.perf_counter()
        self._stream = self._stream or torch.cuda.Stream(self.device)
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
        self._pool = self._pool or graph.pool()
        captured = self._graphs[key] = Captured(graph, static, outputs)
        self._met.add(key)
        seconds = time.perf_counter() - started
        self.captures += 1
        self.capture_seconds += seconds
        self.log.append({"shape": repr(key), "seconds": round(seconds, 3), "warm_up": warm_up, "ahead": ahead,
                         "wait_seconds": round(recording - waited, 3),  # the device synchronised, the cache emptied
                         "record_seconds": round(recorded - recording, 3),
                         "instantiate_seconds": round(time.perf_counter() - recorded, 3),
                         "reserved_gib": round(torch.cuda.memory_reserved(self.device) / 2**30, 2),
                         "allocated_gib": round(torch.cuda.memory_allocated(self.device) / 2**30, 2)})
        return captured

    def summary(self) -> dict[str, Any]:
        """Counts and times for a bench's or an event's record."""
        return {"captures": self.captures, "capture_seconds": round(self.capture_seconds, 2),
                "captures_ahead": self.ahead_captures, "ahead_waited_seconds": round(self.ahead_waited, 3),
                "eager_steps": self.eager_steps, "log": self.log}


def ahead_status(model: torch.nn.Module) -> tuple[bool, str]:
    """Whether the planned shapes of this model's steps may be captured ahead, and why (fast_paths)."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return False, ("off: the step draws random numbers (dropout), and beginning a capture beside replaying graphs "
                       "would shift their dropout masks; each shape captured when met")
    return AHEAD, AHEAD_WHY if AHEAD else AHEAD_OFF_WHY


class AheadCaptures:
    """The graphs a trainer's planned steps need and do not have yet, each with the first step that needs it,
    in the order the steps come. After each step it issues, the engine calls next(): the first of them not
    captured starts capturing ahead (ShapeGraphs.capture_ahead), unless one already is.

    batch_of(step) packs a step as the engine will (its shape_key names its graph); start(batch) starts its
    capture ahead, False where it cannot yet (the set-up of that shape's family is not done)."""

    def __init__(self, graphs: ShapeGraphs, batch_of: Callable[[Any], Any], start: Callable[[Any], bool]) -> None:
        self.graphs, self.batch_of, self.start = graphs, batch_of, start
        self.queue: deque[tuple[Hashable, Any]] = deque()

    def replan(self, firsts: Sequence[tuple[Hashable, Any]]) -> None:
        """A new plan's first steps (shapeplan.ShapePlan.first_uses) go first: a probe's steps run next, and an
        extension's plan holds every step left. The steps it does not name stay queued after them."""
        keys = {key for key, _ in firsts}
        self.queue = deque([*firsts, *(item for item in self.queue if item[0] not in keys)])

    def next(self) -> None:
        if not self.graphs.ahead_on:
            self.queue.clear()
            return
        while self.queue and not self.graphs.busy():
            batch = self.batch_of(self.queue[0][1])
            if self.graphs.has(batch.shape_key):
                self.queue.popleft()
                continue
            if self.start(batch):
                self.queue.popleft()
            return
