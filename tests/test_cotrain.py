"""Co-training on tiny random models, in-process: arms that share a base step together in one process and
each trains exactly as it trains alone; each arm's stop, extend, validation and failure are its own."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gputwin import control, events
from gputwin.paths import ArmPaths
from gputwin.train import faults
from gputwin.train.cotrain import train_group
from gputwin.train.loop import train
from tiny import World, make_arm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("world"))


@pytest.fixture(autouse=True)
def no_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(faults.ENV_VAR, raising=False)


def log(arm: Path) -> list[events.Event]:
    result = events.read_events(arm / "events.jsonl")
    assert result.bad_lines == []
    return result.events


def losses(arm: Path) -> list[float]:
    return [e["loss"] for e in log(arm) if e.kind == events.STEP]


def pair(world: World, **b_fields: object) -> tuple:
    """Two arms that differ in rank, alpha, targets, lr, batch size and epochs; dropout 0 (each arm's dropout
    masks would come from one stream in one process)."""
    a = world.profile("generate", name="a", epochs=2, milestone_step=4)
    a = replace(a, lora=replace(a.lora, dropout=0.0))
    b = world.profile("generate", name="b", learning_rate=3e-3, batch_size=3, milestone_step=4, **b_fields)
    b = replace(b, lora=replace(b.lora, r=8, alpha=8, dropout=0.0,
                                target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")))
    return a, b


def test_each_co_trained_arm_trains_exactly_as_it_trains_alone(world: World, tmp_path: Path) -> None:
    a, b = pair(world)
    alone = [make_arm(tmp_path / "alone", p) for p in (a, b)]
    for arm in alone:
        assert train(arm) == 0
    together = [make_arm(tmp_path / "together", p) for p in (a, b)]
    assert train_group(together) == 0
    for one, two in zip(alone, together):
        first, second = losses(one), losses(two)
        assert len(first) == len(second) > 0
        assert max(abs(x - y) / abs(x) for x, y in zip(first, second)) < 1e-5, (first, second)
        assert log(two)[-1].kind == events.FINISHED
        # the milestone's validation and cooldown probe score the arm's adapter alone, as the arm alone scores
        scored = [[(e.kind, e.get("f1"), e.get("loss_last")) for e in log(arm) if e.kind in (events.VALIDATION, events.PROBE)]
                  for arm in (one, two)]
        assert len(scored[0]) == len(scored[1]) >= 2
        for (kind1, f1_1, loss1), (kind2, f1_2, loss2) in zip(*scored):
            assert kind1 == kind2 and f1_1 == f1_2 and (loss1 is None) == (loss2 is None)
            assert loss1 is None or abs(loss1 - loss2) < 1e-4 * abs(loss1)
        # the adapter saved co-trained is the one saved alone: same config, keys and (nearly) values
        final = [sorted((arm / "adapters").iterdir())[-1] for arm in (one, two)]
        configs = [json.loads((folder / "adapter_config.json").read_text()) for folder in final]
        assert configs[0] == configs[1]
        weights = [load_file(str(folder / "adapter_model.safetensors")) for folder in final]
        assert weights[0].keys() == weights[1].keys()
        for key in weights[0]:
            assert torch.allclose(weights[0][key], weights[1][key], atol=1e-5), key
    started = [e for e in log(together[0]) if e.kind == events.STARTED][0]
    assert started["shares_process_with"] == ["b"] and started["fast_paths"]["cotrain"]["on"]
    assert len(losses(together[0])) == 12 and len(losses(together[1])) == 8  # b ended first; a trained on
