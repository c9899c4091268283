"""Graphs by shape: a shape's first step eager, its second captured, later ones replayed (train/graphs.py).

The policy is checked here on any machine; the CUDA test (run on a GPU machine) checks that a step met first
eagerly, then captured and replayed, trains exactly as a step with graphs captured ahead (prepare) does."""

from __future__ import annotations

import pytest
import torch

from gputwin.train.graphs import AheadCaptures, ShapeGraphs, ahead_status


def test_a_shape_runs_eagerly_only_the_first_time_it_is_met() -> None:
    graphs = ShapeGraphs(torch.device("cpu"))
    assert graphs.first_meeting((1024, 512, 4))
    assert not graphs.first_meeting((1024, 512, 4))
    assert graphs.first_meeting((1152, 512, 4))
    graphs.clear()  # a checkpoint load drops the graphs, not what the eager steps set up
    assert not graphs.first_meeting((1024, 512, 4))
    assert graphs.summary() == {"captures": 0, "capture_seconds": 0.0, "captures_ahead": 0, "ahead_waited_seconds": 0.0,
                                "eager_steps": 2, "log": []}


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


def test_a_shape_is_captured_ahead_only_once_its_set_up_is_done() -> None:
    """Ahead of meeting it, a shape may be captured once an eager step has done its set-up: the shape itself
    met (eager_first each), or its family's first graph made (eager_first "once")."""
    each = ShapeGraphs(torch.device("cpu"), eager_first=True)
    assert not each.may_capture_ahead((1024, 4))
    each.first_meeting((1024, 4))
    assert each.may_capture_ahead((1024, 4)) and not each.may_capture_ahead((1152, 4))

    once = ShapeGraphs(torch.device("cpu"), eager_first="once", family=lambda key: key[0])
    once.first_meeting(("both", 2048))
    assert once.may_capture_ahead(("both", 2048)) and not once.may_capture_ahead(("both", 2304))
    once._graphs[("both", 2048)] = object()  # what a capture leaves
    assert not once.may_capture_ahead(("both", 2048))  # captured already
    assert once.may_capture_ahead(("both", 2304)) and not once.may_capture_ahead(("alone", 1024))
    once.ahead_on = False  # after a capture ahead failed: shapes are captured when met
    assert not once.may_capture_ahead(("both", 2304))


def test_steps_that_draw_random_numbers_are_never_captured_ahead() -> None:
    """Beginning a capture resets the random stream's offset that graphs replaying meanwhile read: a model
    with dropout keeps capturing each shape when met, and its fast paths say why."""
    from peft import LoraConfig, get_peft_model
    from test_fast_train import tiny_model

    from gputwin.train.fast import FastStep, make_optimizer

    assert ahead_status(tiny_model())[0]  # LoRA dropout 0
    base = tiny_model().get_base_model()
    dropping = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj"]),
                              adapter_name="dropping")
    on, why = ahead_status(dropping)
    assert not on and "dropout" in why
    step = FastStep(dropping, make_optimizer(dropping, 1e-3), grad_clip=1.0, autocast_dtype=None, cuda_graphs=False)
    assert not step.graphs.ahead_on and not step.paths["captures_ahead"]["on"]


class Row:
    def __init__(self, key: tuple) -> None:
        self.shape_key = key


def test_ahead_captures_start_in_the_order_the_steps_come_and_skip_shapes_with_graphs() -> None:
    graphs = ShapeGraphs(torch.device("cpu"), eager_first=False)
    started: list[tuple] = []

    def start(row: Row) -> bool:  # graphs.capture_ahead's part: the capture is left as done at once
        started.append(row.shape_key)
        graphs._graphs[row.shape_key] = object()
        return True

    ahead = AheadCaptures(graphs, Row, start)
    ahead.replan([("a", (1024,)), ("b", (1152,)), ("c", (1280,))])
    graphs._graphs[(1152,)] = object()  # met and captured before its turn
    ahead.next()
    ahead.next()
    assert started == [(1024,), (1280,)] and not ahead.queue
    # a probe's plan: its steps first, then what the last plan left, each once
    ahead.replan([("d", (1408,)), ("e", (1536,))])
    ahead.replan([("f", (1664,)), ("d", (1408,))])
    assert [key for key, _ in ahead.queue] == ["f", "d", "e"]
    graphs.ahead_on = False
    ahead.next()
    assert not ahead.queue and started[-1] == (1280,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_steps_whose_graphs_were_captured_ahead_in_a_thread_train_as_graphs_captured_when_met() -> None:
    """The trainer's engine with its planned shapes captured in the graphs' thread while earlier steps replay,
    against the same engine capturing each shape when met: the same losses, captures ahead made, and nothing
    captured twice; with LoRA dropout the engine captures nothing ahead and its losses are those of the rule
    without captures ahead."""
    from peft import LoraConfig, get_peft_model
    from test_fast_train import samples
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from gputwin.train.batching import Example
    from gputwin.train.engine import build_optimizer
    from gputwin.train.fast import FastEngine

    batches = [[Example(s["input_ids"], s["labels"], False) for s in samples(4, seed=k, high=120)]
               for k in range(40)]

    def run(ahead: bool, dropout: float = 0.0) -> tuple[list[float], dict]:
        torch.manual_seed(0)
        model = get_peft_model(Qwen3ForCausalLM(Qwen3Config(
            vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256)), LoraConfig(
            r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])).cuda()
        optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.0, device=torch.device("cuda"))
        engine = FastEngine(model, optimizer, device=torch.device("cuda"), model_dtype=torch.float32,
                            grad_clip=1.0, pad_id=0)
        engine.fast.graphs.ahead_on = ahead and engine.fast.graphs.ahead_on
        engine.shapes.capture_tokens = 40  # captures priced low: several shapes for these small rows
        engine.plan(batches)
        torch.manual_seed(1)
        losses, pending = [], None
        for batch in batches:  # as the trainer steps: a step's loss read once the next one is issued
            outcome = engine.step(engine.collate(batch), 1e-3)
            if pending is not None:
                losses.append(pending.result().loss)
            pending = outcome
        losses.append(pending.result().loss)
        engine.quiesce()
        return losses, engine.fast.graphs.summary()

    (when_met, met), (ahead, early) = run(ahead=False), run(ahead=True)
    assert early["captures_ahead"] >= 2 and met["captures_ahead"] == 0
    keys = [entry["shape"] for entry in early["log"]]
    assert len(keys) == len(set(keys)) and not any("failed" in entry for entry in early["log"])
    assert ahead == pytest.approx(when_met, rel=1e-5)
    (dropped_met, _), (dropped, refused) = run(ahead=False, dropout=0.1), run(ahead=True, dropout=0.1)
    assert refused["captures_ahead"] == 0 and dropped == pytest.approx(dropped_met, rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_eager_first_then_captured_steps_train_as_graphs_captured_ahead() -> None:
    from test_fast_train import samples, tiny_model

    from gputwin.train.fast import FastStep, make_optimizer
    from gputwin.train.packing import pack

    batches = [samples(4, seed=s) for s in range(12)]
    packed = [pack(b, bucket=64, pad_id=0) for b in batches]

    def run(ahead: bool) -> tuple[list[float], FastStep]:
        model = tiny_model().cuda()
        step = FastStep(model, make_optimizer(model, 1e-3), grad_clip=1.0, autocast_dtype=None, eager_first=True)
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
        step = FastStep(model, make_optimizer(model, 1e-3), grad_clip=1.0, autocast_dtype=None)
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
        step = FastStep(model, make_optimizer(model, 1e-3), grad_clip=1.0, autocast_dtype=None)
        step.graphs.sync_captures = sync
        return [float(step(b, lr=1e-3).loss) for b in packed], step

    (lean, step), (synced, _) = run(sync=False), run(sync=True)
    assert step.captures >= 2 and all(e["instantiate_seconds"] >= 0 for e in step.graphs.log)
    assert lean == pytest.approx(synced, rel=1e-4)
