"""The batch-shape planner (train/shapeplan.py): every step fits its shape, merges pay for themselves, the
padding changes no loss, and the trainer plans from the very batches it then trains on."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch

from gputwin.core.encoding import IGNORE_INDEX
from gputwin.train import shapeplan
from gputwin.train.batching import Example
from gputwin.train.packing import answer_only_loss, pack
from gputwin.train.shapeplan import Buckets, Need, Shape, ShapePlan, fine_shape, merge_groups, need_of

COARSE = Buckets(128, 256)


def example(tokens: int, labels: int) -> Example:
    ids = list(range(1, tokens + 1))
    return Example(ids, [IGNORE_INDEX] * (tokens - labels) + ids[tokens - labels:], False)


def random_needs(n: int, seed: int = 0, samples: int = 4) -> list[Need]:
    rng = random.Random(seed)
    needs = []
    for _ in range(n):
        lengths = [rng.randint(150, 350) for _ in range(samples)]
        labels = sum(rng.randint(20, length // 3) for length in lengths)
        needs.append(Need(tokens=sum(lengths), labels=labels, longest=max(lengths), samples=samples))
    return needs


def total_cost(plan: ShapePlan, needs: Sequence[Need]) -> float:
    """What the steps compute, plus a capture for every distinct shape, in tokens."""
    shapes = [plan.shape_for(need) for need in needs]
    return sum(s.cost() for s in shapes) + len(set(shapes)) * plan.capture_tokens


def test_every_step_gets_a_shape_that_holds_it() -> None:
    needs = random_needs(500)
    plan = ShapePlan(COARSE)
    plan.add(needs)
    for need in needs + random_needs(100, seed=9):  # planned, and not
        shape = plan.shape_for(need)
        assert shape.holds(need), (need, shape)
        assert shape.length % 32 == 0 and shape.slots % 32 == 0


def test_the_plan_computes_less_than_the_coarse_buckets_captures_included() -> None:
    needs = random_needs(800)
    planned = ShapePlan(COARSE)
    planned.add(needs)
    coarse = ShapePlan(COARSE)  # plans nothing: every step takes its coarse bucket, as before
    assert total_cost(planned, needs) < 0.985 * total_cost(coarse, needs)
    assert len({planned.shape_for(n) for n in needs}) <= 8


def test_a_rare_shape_rides_in_a_larger_one_and_a_frequent_one_keeps_its_own() -> None:
    small, large = Need(400, 64, 200, 2), Need(900, 200, 460, 2)
    # one small step: padding it to the large shape costs less than a capture
    rare = merge_groups([large] * 50 + [small], capture_tokens=6000)
    assert rare[fine_shape(small)] == rare[fine_shape(large)]
    # a hundred small steps: padding them all costs more than a capture
    frequent = merge_groups([large] * 50 + [small] * 100, capture_tokens=6000)
    assert frequent[fine_shape(small)] == fine_shape(small) != frequent[fine_shape(large)]


def test_a_merged_shape_bounds_its_padding_segment() -> None:
    """Padding a short row up to a long one makes a long padding segment: attention's bound must cover it."""
    short, long = Need(300, 40, 120, 2), Need(1400, 40, 500, 2)
    merged = merge_groups([long] * 100 + [short], capture_tokens=1e9)[fine_shape(short)]
    assert merged.holds(short) and merged.holds(long)
    assert merged.bound >= merged.length - short.tokens


def test_steps_of_other_families_or_sample_counts_never_share_a_shape() -> None:
    plan = ShapePlan(COARSE, capture_tokens=1e9)  # captures priced out: whatever may merge does
    large = Need(1400, 300, 400, 4, ("a", "b"))
    other_family, fewer_samples = Need(500, 60, 200, 4, ("a",)), Need(500, 60, 200, 3, ("a", "b"))
    plan.add([large, other_family, fewer_samples, Need(1300, 200, 400, 4, ("a", "b"))])
    assert plan.shape_for(Need(1300, 200, 400, 4, ("a", "b"))) == plan.shape_for(large)  # merged: same kind
    assert plan.shape_for(other_family) == fine_shape(other_family)
    assert plan.shape_for(fewer_samples) == fine_shape(fewer_samples)
    assert plan.capture_for(large.kind) == 2 * plan.capture_for(other_family.kind)


def test_a_step_nobody_planned_takes_a_planned_shape_when_that_is_cheaper_than_a_capture() -> None:
    plan = ShapePlan(COARSE)
    plan.add([Need(1000, 300, 300, 4)] * 50)
    planned = plan.shape_for(Need(1000, 300, 300, 4))
    assert plan.shape_for(Need(990, 290, 300, 4)) == planned  # a little more padding than its own
    far = Need(300, 40, 100, 4)  # would pad ~700 tokens a step: its coarse bucket instead
    assert plan.shape_for(far) == COARSE(far) == Shape(384, 256, 512)
    assert plan.shape_for(Need(310, 40, 100, 4)) == COARSE(far)


def test_with_nothing_planned_every_step_takes_its_coarse_bucket_as_before() -> None:
    needs = random_needs(300)
    plan = ShapePlan(COARSE)
    assert [plan.shape_for(n) for n in needs] == [COARSE(n) for n in needs]


def test_planning_again_keeps_every_shape_already_given() -> None:
    needs = random_needs(300)
    plan = ShapePlan(COARSE)
    plan.add(needs)
    before = [plan.shape_for(n) for n in needs]
    plan.add(needs[:40] + random_needs(50, seed=3))  # a probe over the run's next batches, an extension
    assert [plan.shape_for(n) for n in needs] == before


def test_need_of_counts_labels_as_pack_does() -> None:
    batch = [example(30, 10), example(12, 12), example(7, 1)]
    need = need_of(batch)
    packed = pack(batch, shape=fine_shape(need))
    assert (need.tokens, need.labels, need.longest, need.samples) == (49, packed.n_label_tokens, 30, 3)
    assert packed.n_tokens == 49 and packed.length == 64 and packed.label_index.shape[0] == 32


def test_pack_refuses_a_shape_that_does_not_hold_the_batch() -> None:
    batch = [example(40, 10), example(40, 10)]
    with pytest.raises(ValueError, match="does not hold"):
        pack(batch, shape=Shape(80, 32, 512))  # no room for the padding token
    with pytest.raises(ValueError, match="does not hold"):
        pack(batch, shape=Shape(96, 16, 512))  # too few label slots


def test_the_padding_a_plan_adds_changes_no_loss() -> None:
    from test_fast_train import samples, tiny_model

    model = tiny_model()
    batch = samples(4, seed=5)
    own = fine_shape(need_of([Example(s["input_ids"], s["labels"], False) for s in batch]))
    wider = Shape(own.length + 96, own.slots + 64, 512)
    with torch.no_grad():
        losses = [float(answer_only_loss(model, pack(batch, shape=shape))) for shape in (own, wider)]
        losses.append(float(answer_only_loss(model, pack(batch))))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) == pytest.approx(losses[2], rel=1e-5)


def test_planning_a_seed_sized_run_takes_milliseconds_not_seconds() -> None:
    """Not a timing assertion: a bound on the work (pairs looked at), which a quadratic-per-merge loop breaks."""
    needs = random_needs(1758, seed=7)
    calls = 0
    real = shapeplan.fitted

    def counted(*args: Any, **kwargs: Any) -> Shape:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    shapeplan.fitted = counted
    try:
        merge_groups(needs)
    finally:
        shapeplan.fitted = real
    fines = len({fine_shape(n) for n in needs})
    assert calls <= fines * fines * 2 + 2 * len(needs)


# ---------------------------------------------------------------- the trainer plans from its own batches


class RecordingEngine:
    """The trainer's engine, recording what it was told to plan and what it then collated."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.name, self.paths = engine, engine.name, engine.paths
        self.planned: list[list[Any]] = []
        self.collated: list[list[Any]] = []

    def plan(self, batches: Any) -> None:
        batches = [list(b) for b in batches]
        self.planned.extend(batches)
        self.engine.plan(batches)

    def collate(self, examples: Any) -> Any:
        self.collated.append(list(examples))
        return self.engine.collate(examples)

    def step(self, batch: Any, lr: float) -> Any:
        return self.engine.step(batch, lr)


def test_the_trainer_plans_exactly_the_batches_it_then_trains_on(world: Any, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from gputwin.train import setup
    from gputwin.train.loop import train
    from tiny import make_arm

    engines: list[RecordingEngine] = []
    real = setup.make_engine

    def recording(*args: Any, **kwargs: Any) -> RecordingEngine:
        engines.append(RecordingEngine(real(*args, **kwargs)))
        return engines[-1]

    monkeypatch.setattr(setup, "make_engine", recording)
    arm = make_arm(tmp_path, world.profile("generate", engine="fast", epochs=2))
    assert train(arm) == 0
    (engine,) = engines
    assert len(engine.planned) == 12 and engine.planned == engine.collated


@pytest.mark.parametrize("extend", [False, True])
def test_co_trained_arms_plan_the_rows_they_then_step(world: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       extend: bool) -> None:
    """The group plans its joint rows (both arms while both have steps, then the one left) and each arm's
    cooldown probe its own; every row stepped was planned, and nothing else was."""
    from collections import Counter

    from gputwin.train.cotrain import GroupEngine, train_group
    from test_cotrain import pair
    from tiny import make_arm

    planned: list[tuple] = []
    stepped: list[tuple] = []

    def row(work: Any) -> tuple:
        return tuple((adapter, tuple(id(e) for e in examples)) for adapter, examples, *_ in work)

    real_step = GroupEngine.step
    # each row with the plan it was planned in and stepped from: the group's (None) or a probe's own
    monkeypatch.setattr(GroupEngine, "plan", lambda self, steps, shapes=None: planned.extend(
        (row(w), id(shapes) if shapes is not None else None) for w in steps))
    monkeypatch.setattr(GroupEngine, "step", lambda self, work, shapes=None: (
        stepped.append((row(work), id(shapes) if shapes is not None else None)), real_step(self, work, shapes))[1])
    arms = [make_arm(tmp_path, p) for p in pair(world)]
    if extend:  # arm a gets one more epoch at its step 2: the group plans the rows that adds
        from gputwin.control import requests as control
        from gputwin.core.paths import ArmPaths
        from test_cotrain import at_step

        at_step(monkeypatch, {("a", 2): lambda t: control.write_request(ArmPaths(arms[0]).control, control.EXTEND,
                                                                         epochs=1, by="test")})
    assert train_group(arms) == 0
    assert len({len(r) for r, _ in stepped}) == 2  # two-arm rows, then rows of the arm with an epoch left (and probes)
    assert set(planned) >= set(stepped)  # every row stepped was planned first, in the plan it was stepped from
    probe_rows = [r for r, plan in stepped if plan is not None]  # a cooldown probe's rows: planned on their own
    assert probe_rows and all(len(r) == 1 for r in probe_rows)
    if not extend:
        assert Counter(planned) == Counter(stepped)  # and nothing else was
    else:  # the added epoch's rows were among them: a trained 12 + 6 steps
        from test_cotrain import log

        assert [e["step"] for e in log(arms[0]) if e.kind == "finished"] == [18]


def test_the_shapes_bench_counts_both_rules(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench" / "shapes.py"
    done = subprocess.run([sys.executable, str(bench), "--smoke", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "shapes.json").read_text())["results"]
    assert {(r["arms"], r["rule"]) for r in results} == {(1, "coarse"), (1, "planned"), (2, "coarse"), (2, "planned")}
    for arms in (1, 2):
        coarse, planned = (next(r for r in results if r["arms"] == arms and r["rule"] == rule)
                           for rule in ("coarse", "planned"))
        assert planned["cost_tokens"] <= coarse["cost_tokens"] and planned["unused_slot_share"] < coarse["unused_slot_share"]
