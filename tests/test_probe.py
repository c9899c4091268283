"""The cooldown probe: a side branch scored as if the schedule ended, that leaves the live arm untouched."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gputwin.core import events
from gputwin.train import probe
from gputwin.train.loop import train
from tiny import World, make_arm

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_fault")]


def run_arm(world: World, root: Path, task: str, engine: str, cooldown: int) -> list[events.Event]:
    profile = world.profile(task, epochs=2, milestone_step=5, engine=engine)
    profile = replace(profile, milestone=replace(profile.milestone, cooldown_steps=cooldown))
    arm = make_arm(root, profile)
    assert train(arm) == 0
    result = events.read_events(arm / "events.jsonl")
    assert result.bad_lines == []
    return result.events


@pytest.mark.parametrize(("task", "engine"), [("generate", "fast"), ("tag", "plain")])
def test_the_live_arm_continues_exactly_as_if_no_probe_ran(world: World, tmp_path: Path, task: str, engine: str) -> None:
    plain = run_arm(world, tmp_path / "off", task, engine, cooldown=0)
    probed = run_arm(world, tmp_path / "on", task, engine, cooldown=3)
    losses = [(e["step"], e["loss"], e["grad_norm"], e["lr"]) for e in plain if e.kind == events.STEP]
    assert losses == [(e["step"], e["loss"], e["grad_norm"], e["lr"]) for e in probed if e.kind == events.STEP]
    final = [(e["step"], e["f1"], e["precision"]) for e in plain if e.kind == events.VALIDATION]
    assert final == [(e["step"], e["f1"], e["precision"]) for e in probed if e.kind == events.VALIDATION]
    assert not [e for e in plain if e.kind == events.PROBE]
    (done,) = [e for e in probed if e.kind == events.PROBE]
    assert done["step"] == 5 and done["steps"] == 3 and done["lr_from"] > 0 and "failed" not in done.data
    assert done["train_seconds"] >= 0 and done["seconds"] >= done["train_seconds"]
    cooled = json.loads(Path(done["path"]).read_text())
    assert cooled["probe"]["steps"] == 3 and cooled["schedule"]["lr_fraction"] == 0.0
    assert cooled["schedule"]["cooled_from"]["lr_fraction"] > probe.PROBE_ABOVE
    (milestone,) = [e for e in probed if e.kind == events.VALIDATION and e["reason"] == "milestone"]
    assert milestone["schedule"]["probe_steps"] == 3 and 0 < milestone["schedule"]["decay_done"] < 1


def test_no_probe_where_the_lr_is_near_the_end_of_its_decay(world: World, tmp_path: Path) -> None:
    profile = world.profile("tag", epochs=1, batch_size=1, milestone_step=24)  # the last step: LR near 0
    arm = make_arm(tmp_path, profile)
    assert train(arm) == 0
    evs = events.read_events(arm / "events.jsonl").events
    (milestone,) = [e for e in evs if e.kind == events.VALIDATION]
    assert milestone["schedule"]["probe_steps"] == 0 and milestone["schedule"]["lr_fraction"] < probe.PROBE_ABOVE
    assert not [e for e in evs if e.kind == events.PROBE]


def test_side_branch_puts_weights_optimizer_lr_and_rng_back() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5), torch.nn.Linear(3, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    state_before = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    live = [optimizer.state[p]["exp_avg"] for p in model.parameters()]
    with probe.side_branch(model, optimizer):
        for group in optimizer.param_groups:
            group["lr"] = 0.5
        for _ in range(3):
            model(torch.randn(5, 4)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    for p, exp_avg in zip(model.parameters(), live):
        assert optimizer.state[p]["exp_avg"] is exp_avg  # restored in place: captured graphs keep their pointers
        for k, v in state_before[id(p)].items():
            assert torch.equal(optimizer.state[p][k], v)
    assert all(g["lr"] == 1e-2 for g in optimizer.param_groups)


def test_rng_after_a_side_branch_is_the_rng_before_it() -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(3)
    with probe.side_branch(model, optimizer):
        torch.randn(100)
    after = torch.randn(4)
    torch.manual_seed(3)
    assert torch.equal(after, torch.randn(4))


def test_cooldown_lr_falls_linearly_towards_zero_and_the_default_length_is_a_tenth() -> None:
    assert probe.cooldown_lrs(1.0, 4) == [1.0, 0.75, 0.5, 0.25]
    assert probe.probe_steps(None, 879) == 88 and probe.probe_steps(0, 879) == 0 and probe.probe_steps(12, 879) == 12
    assert probe.wanted(0.5, None, 879) == 88 and probe.wanted(0.05, None, 879) == 0


def test_extending_a_decayed_wsd_arm_goes_back_to_where_its_decay_began(world: World, tmp_path: Path) -> None:
    """wsd: the peak held, then a linear decay over the last half; extended after it finished, the arm
    resumes from the checkpoint kept where the decay began, holds the peak for the added epoch, then decays."""
    from gputwin.control import requests as control
    from gputwin.core.schedule import LrPlan

    profile = world.profile("tag", epochs=1, batch_size=2, warmup_steps=2, scheduler="wsd", decay_fraction=0.5)
    arm = make_arm(tmp_path, profile)
    assert train(arm) == 0
    first = events.read_events(arm / "events.jsonl").events
    steps = [e for e in first if e.kind == events.STEP]
    peak = profile.train.learning_rate
    assert len(steps) == 12 and steps[6]["lr"] == pytest.approx(peak) and steps[-1]["lr"] < 0.2 * peak  # 2 + 5 + 5
    assert (arm / "checkpoints" / "decay-start" / "step-000007").is_dir()
    control.write_request(arm / "control", control.EXTEND, epochs=1)
    assert train(arm) == 0
    evs = events.read_events(arm / "events.jsonl").events
    (extended,) = [e for e in evs if e.kind == events.EXTENDED]
    assert extended["rewound_to"] == 7 and extended["total_steps"] == 24 and extended["new_cycle"] is False
    plan = LrPlan.from_dict(extended["lr_plan"])
    assert plan.decay_start == 24 - plan.decay_steps and plan.peak_lr == peak
    later = [e for e in evs[evs.index(extended):] if e.kind == events.STEP]
    assert [e["step"] for e in later] == list(range(8, 25))
    assert all(e["lr"] == pytest.approx(peak) for e in later if e["step"] <= plan.decay_start)
    assert later[-1]["lr"] < 0.2 * peak and later[-1]["loss"] < steps[0]["loss"]
    from gputwin.core import state as st

    folded = st.fold("arm", evs)
    history = folded.loss_history.steps
    assert folded.step == 24 and history == sorted(set(history))  # the abandoned steps 8-12 are not drawn twice
