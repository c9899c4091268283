"""Graphs by shape: a shape's first step eager, its second captured, later ones replayed (train/graphs.py).

The policy is checked here on any machine; the CUDA test (run on a GPU machine) checks that a step met first
eagerly, then captured and replayed, trains exactly as a step with graphs captured ahead (prepare) does."""

from __future__ import annotations

import pytest
import torch

from gputwin.train.graphs import ShapeGraphs


def test_a_shape_runs_eagerly_only_the_first_time_it_is_met() -> None:
    graphs = ShapeGraphs(torch.device("cpu"))
    assert graphs.first_meeting((1024, 512, 4))
    assert not graphs.first_meeting((1024, 512, 4))
    assert graphs.first_meeting((1152, 512, 4))
    graphs.clear()  # a checkpoint load drops the graphs, not what the eager steps set up
    assert not graphs.first_meeting((1024, 512, 4))
    assert graphs.summary() == {"captures": 0, "capture_seconds": 0.0, "eager_steps": 2, "log": []}


def test_eager_once_runs_new_shapes_eagerly_only_until_a_graph_exists() -> None:
    graphs = ShapeGraphs(torch.device("cpu"), eager_first="once")
    assert graphs.first_meeting((1024, 512, 4)) and graphs.first_meeting((1152, 512, 4))
    graphs._graphs[(1024, 512, 4)] = object()  # what capture() leaves (a capture needs a GPU)
    assert not graphs.first_meeting((1280, 512, 4))  # captured when met
    graphs.clear()  # a checkpoint load: eager again until the next capture
    assert graphs.first_meeting((1408, 512, 4))
    assert graphs.eager_steps == 3


def test_eager_once_by_family_runs_each_family_s_first_shapes_eagerly() -> None:
    """The co-trained step's rule: a set of arms (the key's first part) runs eagerly until a graph of that set
    exists; another set of arms (one arm's cooldown probe, the arms left after one ended) starts eagerly again."""
    graphs = ShapeGraphs(torch.device("cpu"), eager_first="once", family=lambda key: key[0])
    both, alone = ("arm0", "arm1"), ("arm0",)
    assert graphs.first_meeting((both, 2048)) and graphs.first_meeting((both, 2304))
    graphs._graphs[(both, 2048)] = object()  # what capture() leaves (a capture needs a GPU)
    assert not graphs.first_meeting((both, 2560))  # captured when met
    assert graphs.first_meeting((alone, 1024))  # the probe's arm alone: its own first step, eager
    assert not graphs.first_meeting((both, 2304))  # met before
    assert graphs.eager_steps == 3


def test_without_eager_first_every_shape_is_captured_when_met() -> None:
    graphs = ShapeGraphs(torch.device("cpu"), eager_first=False)
    assert not graphs.first_meeting((1024, 512, 4))
    assert graphs.eager_steps == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_eager_first_then_captured_steps_train_as_graphs_captured_ahead() -> None:
    from test_fast_train import samples, tiny_model

    from gputwin.train.fast import FastStep, make_optimizer
    from gputwin.train.packing import pack

    batches = [samples(4, seed=s) for s in range(12)]
    packed = [pack(b, bucket=64, pad_id=0) for b in batches]

    def run(ahead: bool) -> tuple[list[float], FastStep]:
        model = tiny_model().cuda()
        step = FastStep(model, make_optimizer(model, 1e-3), grad_clip=1.0, autocast_dtype=None, eager_first=True,
                        compile=False)
        if ahead:
            step.prepare(packed)
        losses = [float(step(b, lr=1e-3).loss) for b in packed]
        return losses, step

    lazily, step = run(ahead=False)
    ahead, prepared = run(ahead=True)
    shapes = {b.shape_key for b in packed}
    assert step.graphs.eager_steps == len(shapes)
    met_twice = {k for k in shapes if sum(b.shape_key == k for b in packed) > 1}
    assert step.captures == len(met_twice) and all(not e["warm_up"] for e in step.graphs.log)
    assert prepared.captures == len(shapes) and prepared.graphs.eager_steps == 0
    assert lazily == pytest.approx(ahead, rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_eager_once_captured_when_met_trains_as_graphs_captured_ahead() -> None:
    """eager_first="once" (FastStep's default): after the first graph, shapes are captured when first met."""
    from test_fast_train import samples, tiny_model

    from gputwin.train.fast import FastStep, make_optimizer
    from gputwin.train.packing import pack

    packed = [pack(samples(4, seed=s), bucket=64, pad_id=0) for s in range(12)]

    def run(ahead: bool) -> tuple[list[float], FastStep]:
        model = tiny_model().cuda()
        step = FastStep(model, make_optimizer(model, 1e-3), grad_clip=1.0, autocast_dtype=None, compile=False)
        assert step.graphs.eager_first == "once"
        if ahead:
            step.prepare(packed)
        return [float(step(b, lr=1e-3).loss) for b in packed], step

    (lazily, step), (ahead, _) = run(ahead=False), run(ahead=True)
    keys = [b.shape_key for b in packed]
    first_capture = next(n for n, k in enumerate(keys) if k in keys[:n])
    eager = set(keys[:first_capture])  # shapes met before a graph exists
    assert step.graphs.eager_steps == len(eager)
    assert step.captures == len({k for k in keys if k not in eager or keys.count(k) > 1})
    assert lazily == pytest.approx(ahead, rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captures_without_a_device_sync_train_as_captures_after_one() -> None:
    """Lean captures (sync_captures=False: the capture stream waits for the queued work; the cache is emptied
    only after eager steps) give the steps that torch.cuda.graph's way (the default) gives."""
    from test_fast_train import samples, tiny_model

    from gputwin.train.fast import FastStep, make_optimizer
    from gputwin.train.packing import pack

    packed = [pack(samples(4, seed=s), bucket=64, pad_id=0) for s in range(12)]

    def run(sync: bool) -> tuple[list[float], FastStep]:
        torch.manual_seed(0)
        model = tiny_model().cuda()
        step = FastStep(model, make_optimizer(model, 1e-3), grad_clip=1.0, autocast_dtype=None, compile=False)
        step.graphs.sync_captures = sync
        return [float(step(b, lr=1e-3).loss) for b in packed], step

    (lean, step), (synced, _) = run(sync=False), run(sync=True)
    assert step.captures >= 2 and all(e["instantiate_seconds"] >= 0 for e in step.graphs.log)
    assert lean == pytest.approx(synced, rel=1e-4)
