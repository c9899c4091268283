"""Co-training on tiny random models, in-process: arms that share a base step together in one process and
each trains exactly as it trains alone; each arm's stop, extend, validation and failure are its own."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gputwin.control import requests as control
from gputwin.core import events
from gputwin.core.paths import ArmPaths
from gputwin.train import faults
from gputwin.train.cotrain import train_group
from gputwin.train.loop import train
from tiny import World, make_arm

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_fault")]


def log(arm: Path) -> list[events.Event]:
    result = events.read_events(arm / "events.jsonl")
    assert result.bad_lines == []
    return result.events


def losses(arm: Path) -> list[float]:
    return [e["loss"] for e in log(arm) if e.kind == events.STEP]


def pair(world: World, engine: str = "plain", **b_fields: object) -> tuple:
    """Two arms that differ in rank, alpha, targets, lr, batch size and epochs; dropout 0 (each arm's dropout
    masks would come from one stream in one process)."""
    a = world.profile("generate", name="a", epochs=2, milestone_step=4, engine=engine)
    a = replace(a, lora=replace(a.lora, dropout=0.0))
    b = world.profile("generate", name="b", learning_rate=3e-3, batch_size=3, milestone_step=4, engine=engine,
                      **b_fields)
    b = replace(b, lora=replace(b.lora, r=8, alpha=8, dropout=0.0,
                                target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")))
    return a, b


@pytest.mark.parametrize("engine", ["plain", "fast"])
def test_each_co_trained_arm_trains_exactly_as_it_trains_alone(world: World, tmp_path: Path, engine: str) -> None:
    a, b = pair(world, engine)
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
        for config in configs:  # peft keeps the targets as a set: their order follows the string hashes
            config["target_modules"] = sorted(config["target_modules"])
        assert configs[0] == configs[1]
        weights = [load_file(str(folder / "adapter_model.safetensors")) for folder in final]
        assert weights[0].keys() == weights[1].keys()
        for key in weights[0]:
            assert torch.allclose(weights[0][key], weights[1][key], atol=1e-5), key
    # both arms reach their milestones at step 4: b's validation does not wait for a's cooldown probe
    milestone = {arm.name: [e.t for e in log(arm) if e.kind == events.VALIDATION][0] for arm in together}
    probed = [e.t for e in log(together[0]) if e.kind == events.PROBE]
    assert probed and milestone["b"] <= probed[0] and milestone["a"] <= milestone["b"]
    started = [e for e in log(together[0]) if e.kind == events.STARTED][0]
    assert started["shares_process_with"] == ["b"] and started["fast_paths"]["cotrain"]["on"]
    # the data was read beside the model's build, from the cache the arms alone wrote
    phases = [[e for e in log(arm) if e.kind == events.STARTED][0]["startup_seconds"] for arm in together]
    assert all({"data", "model", "lora", "engine", "data_wait"} <= set(p) and p["data_cache"] == "hit" for p in phases)
    # on the CPU the arms' samples are not packed in one row (no per-sample attention kernel to keep them
    # apart): the stacked padded step runs, and equals the fast engine's alone too
    assert started["engine"] == "plain" and not started["fast_paths"]["fast_engine"]["on"]
    assert engine == "plain" or "varlen" in started["fast_paths"]["fast_engine"]["why"]
    assert len(losses(together[0])) == 12 and len(losses(together[1])) == 8  # b ended first; a trained on


def at_step(monkeypatch: pytest.MonkeyPatch, actions: dict[tuple[str, int], object]) -> None:
    """Run actions[(arm, step)](trainer) between steps, as a user's command would arrive then."""
    from gputwin.train.cotrain import CoTrainer

    original = CoTrainer.between_steps

    def between_steps(self: CoTrainer) -> int | None:
        action = actions.pop((self.run.profile.name, self.state.step), None)
        if action is not None:
            action(self)
        return original(self)

    monkeypatch.setattr(CoTrainer, "between_steps", between_steps)


def test_a_stopped_arm_leaves_the_other_training_and_extend_and_validate_now_are_per_arm(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pair(world)
    arms = [make_arm(tmp_path, p) for p in (a, b)]
    control_of = {p.name: ArmPaths(arm).control for p, arm in zip((a, b), arms)}
    at_step(monkeypatch, {
        ("b", 3): lambda t: control.write_request(control_of["b"], control.STOP, by="test"),
        ("a", 2): lambda t: control.write_request(control_of["a"], control.EXTEND, epochs=1, by="test"),
        ("a", 5): lambda t: control.write_request(control_of["a"], control.VALIDATE, by="test"),
    })
    assert train_group(arms) == 0
    first, second = log(arms[0]), log(arms[1])
    # b stopped at its step 3 with a checkpoint; its exit is recorded while a trains on, and only a extended
    stopped = [e for e in second if e.kind == events.STOPPED]
    assert [e["step"] for e in stopped] == [3] and stopped[0]["checkpoint"]
    assert [e.kind for e in second].count(events.STEP) == 3
    assert not any(e.kind == events.EXTENDED for e in second)
    # a: extended by one epoch at step 2 (12 -> 18 steps), validated on request at step 5, trained to its end
    assert [e["total_steps"] for e in first if e.kind == events.EXTENDED] == [18]
    assert [e["step"] for e in first if e.kind == events.VALIDATION and e["reason"] == "requested"] == [5]
    assert first[-1].kind == events.FINISHED and first[-1]["step"] == 18
    assert ArmPaths(arms[1]).exit.read_text().strip() == "0" and not ArmPaths(arms[1]).pid.exists()
    # resume of the stopped arm: in a process of its own, from its own checkpoint
    assert train(arms[1]) == 0
    again = log(arms[1])
    assert [e["step"] for e in again if e.kind == events.RESUMED] == [3]
    assert again[-1].kind == events.FINISHED and again[-1]["step"] == 8


@pytest.mark.parametrize("engine", ["plain", "fast"])
def test_an_arm_whose_loss_diverges_fails_alone_and_the_other_trains_to_its_end(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str) -> None:
    a, b = pair(world, engine)
    arms = [make_arm(tmp_path, p) for p in (a, b)]
    at_step(monkeypatch, {("b", 2): lambda t: setattr(t, "fault", faults.Fault("nan", 3))})
    assert train_group(arms) == 1  # the worst of the arms' exits
    failed = [e for e in log(arms[1]) if e.kind == events.FAILED]
    assert len(failed) == 1 and failed[0]["error"] == "NonFiniteLoss" and "step 3" in failed[0]["message"]
    assert ArmPaths(arms[1]).exit.read_text().strip() == "1"
    assert log(arms[0])[-1].kind == events.FINISHED and len(losses(arms[0])) == 12
    assert all(torch.isfinite(torch.tensor(losses(arms[0]))))


def test_an_arm_whose_exit_cannot_be_recorded_ends_and_the_other_trains_on(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Recording an ended arm's exit fails (a full disk): that arm has ended all the same, and the other arm of
    the process trains to its end instead of the whole process failing with it."""
    from gputwin.train import cotrain

    a, b = pair(world)
    arms = [make_arm(tmp_path, p) for p in (a, b)]
    at_step(monkeypatch, {("b", 3): lambda t: control.write_request(ArmPaths(arms[1]).control, control.STOP,
                                                                    by="test")})
    real = cotrain.release_arm

    def full_disk(arm: ArmPaths, status: int) -> bool:
        if arm.name == "b":
            raise OSError(28, "No space left on device")
        return real(arm, status)

    monkeypatch.setattr(cotrain, "release_arm", full_disk)
    assert train_group(arms) == 0
    assert log(arms[1])[-1].kind == events.STOPPED and log(arms[0])[-1].kind == events.FINISHED
    assert len(losses(arms[0])) == 12
    assert "b: cannot record its exit now" in capsys.readouterr().err


def test_the_packed_step_of_several_arms_equals_each_arm_packed_alone(world: World) -> None:
    """train/cofast.py eagerly on the CPU (the CUDA graph replays the same body): each arm's loss and gradient
    norm over three steps equal the fast engine's step of that arm alone. (The trainer packs arms together
    only where attention runs per sample, a CUDA varlen kernel; here the masked fallback serves the maths.)"""
    from peft import get_peft_model

    from gputwin.validate.modeling import load_base
    from gputwin.train.cofast import GroupFastStep, pack_group
    from gputwin.train.cotrain import Member
    from gputwin.train.engine import build_optimizer
    from gputwin.train.fast import FastStep
    from gputwin.train.packing import pack
    from gputwin.train.batching import Example
    from gputwin.train.multilora import ArmView, SharedModel, lora_config

    a, b = pair(world)
    specs = [(a.lora, 7), (b.lora, 7)]
    generator = torch.Generator().manual_seed(3)

    def example(n: int) -> Example:
        ids = torch.randint(5, 300, (n,), generator=generator).tolist()
        cut = n // 2
        return Example(ids, [-100] * cut + ids[cut:], False)

    steps = [([example(12 + k) for k in range(4)], [example(20 - k) for k in range(3)]) for _ in range(3)]
    lrs = [(5e-3, 3e-3)] * 3

    def base() -> object:
        return load_base(str(world.qwen), task="generate", dtype="fp32", device="cpu")

    alone = []
    for index, (spec, seed) in enumerate(specs):
        torch.manual_seed(seed)
        model = get_peft_model(base(), lora_config(spec))
        model.train()
        step = FastStep(model, build_optimizer(model, lr=1e-3, weight_decay=0.0, device=torch.device("cpu")),
                        grad_clip=1.0, autocast_dtype=None)
        alone.append([tuple(float(x) for x in step(pack(batches[index]), lr=lr[index])[:2])
                      for batches, lr in zip(steps, lrs)])

    shared = SharedModel(base(), specs)
    shared.model.train()
    members = {}
    for name in shared.names:
        view = ArmView(shared, name)
        members[name] = Member(name, view.trainable(),
                               build_optimizer(view, lr=1e-3, weight_decay=0.0, device=torch.device("cpu")), 1.0)
    group = GroupFastStep(shared, members, device=torch.device("cpu"), autocast_dtype=None)
    together = [[], []]
    for batches, lr in zip(steps, lrs):
        outcomes = group(pack_group(list(zip(shared.names, batches)), pad_id=0), list(lr))
        for index, outcome in enumerate(outcomes):
            together[index].append((outcome.loss, outcome.grad_norm))
    for one, two in zip(alone, together):
        flat = [x for pair_ in one for x in pair_], [x for pair_ in two for x in pair_]
        assert flat[0] == pytest.approx(flat[1], rel=1e-5)


def test_an_arm_with_nan_weights_fails_in_the_packed_step_and_the_other_steps_as_without_it(world: World) -> None:
    """train/cofast.py, eagerly on the CPU: arm1's adapter poisoned with NaN gives arm1 a non-finite loss
    (as alone) and leaves arm0's loss, gradient norm and update exactly as in a step without the poison."""
    from gputwin.validate.modeling import load_base
    from gputwin.train.cofast import GroupFastStep, pack_group
    from gputwin.train.cotrain import Member
    from gputwin.train.engine import NonFiniteLoss, build_optimizer
    from gputwin.train.batching import Example
    from gputwin.train.multilora import ArmView, SharedModel

    a, b = pair(world)
    generator = torch.Generator().manual_seed(3)
    batches = [[Example(ids, [-100] * 6 + ids[6:], False)
                for ids in (torch.randint(5, 300, (n,), generator=generator).tolist() for n in (14, 17))]] * 2
    runs = []
    for poison in (False, True):
        shared = SharedModel(load_base(str(world.qwen), task="generate", dtype="fp32", device="cpu"),
                             [(a.lora, 7), (b.lora, 7)])
        shared.model.train()
        members = {name: Member(name, ArmView(shared, name).trainable(),
                                build_optimizer(ArmView(shared, name), lr=1e-3, weight_decay=0.0,
                                                device=torch.device("cpu")), 1.0) for name in shared.names}
        if poison:
            with torch.no_grad():
                members["arm1"].params[0].view(-1)[0] = float("nan")
        torch.manual_seed(0)
        outcomes = GroupFastStep(shared, members, device=torch.device("cpu"), autocast_dtype=None)(
            pack_group(list(zip(shared.names, batches)), pad_id=0), [5e-3, 3e-3])
        runs.append((outcomes, [p.detach().clone() for p in members["arm0"].params]))
    (clean, clean_params), (poisoned, poisoned_params) = runs
    assert isinstance(poisoned[1], NonFiniteLoss)
    assert (poisoned[0].loss, poisoned[0].grad_norm) == (clean[0].loss, clean[0].grad_norm)
    assert all(torch.equal(x, y) for x, y in zip(clean_params, poisoned_params))


@pytest.mark.parametrize("dropouts", [(0.0, 0.0), (0.1, 0.3)])
@pytest.mark.parametrize("autocast", [True, False])
def test_a_routed_lora_layer_gives_each_arm_s_tokens_exactly_that_arm_s_output(
        world: World, autocast: bool, dropouts: tuple[float, float]) -> None:
    """bf16 base, fp32 adapters (as on a GPU), with and without autocast (with: the multi-LoRA function;
    without: peft's dtypes differ from x's, so the masked fallback): each arm's tokens get peft's layer with
    only that arm's adapter active (bit for bit where the maths is peft's; within bf16 rounding where the
    function reorders it), padding tokens the base alone. With dropout (in training), each arm's tokens
    are dropped at that arm's own rate."""
    from gputwin.validate.modeling import load_base
    from gputwin.train.multilora import SharedModel

    base = load_base(str(world.qwen), task="generate", dtype="bf16", device="cpu")
    a, b = pair(world)
    a, b = (replace(p, lora=replace(p.lora, dropout=d)) for p, d in zip((a, b), dropouts))
    shared = SharedModel(base, [(a.lora, 1), (b.lora, 2)])
    with torch.no_grad():
        for name, p in shared.model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    shared.model.eval()
    layer = shared.layers[0]
    x = torch.randn(1, 12, layer.in_features).to(torch.bfloat16)
    token_arm = torch.tensor([0] * 6 + [1] * 4 + [-1] * 2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with shared.tokens(token_arm, ("arm0", "arm1")):
            both = layer(x)
        alone = []
        for name in ("arm0", "arm1"):
            with shared.only(name):
                alone.append(layer(x))
        plain = layer.base_layer(x)
    exact = {"rtol": 0, "atol": 0} if not autocast else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(both[:, :6], alone[0][:, :6], **exact)
    torch.testing.assert_close(both[:, 6:10], alone[1][:, 6:10], **exact)
    assert torch.equal(both[:, 10:], plain[:, 10:])
    assert all(p.requires_grad for name, p in shared.model.named_parameters() if "lora_" in name)
    if dropouts[0]:
        shared.model.train()
        x = torch.ones(1, 4000, layer.in_features, dtype=torch.bfloat16)
        token_arm = torch.tensor([0] * 2000 + [1] * 2000)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
            with shared.tokens(token_arm, ("arm0", "arm1")):
                for p in shared.model.parameters():
                    p.requires_grad_(False)
                for adapter in ("arm0", "arm1"):  # A = e_1: h is the first input feature, dropped or kept
                    layer.lora_A[adapter].weight.zero_()
                    layer.lora_A[adapter].weight[:, 0] = 1.0
                    layer.lora_B[adapter].weight.fill_(1.0)
                delta = (layer(x) - layer.base_layer(x))[0, :, 0].float()
        shared.make_trainable()
        for rows, rate in ((slice(0, 2000), dropouts[0]), (slice(2000, 4000), dropouts[1])):
            dropped = (delta[rows] == 0).float().mean().item()
            assert abs(dropped - rate) < 0.05, (dropped, rate)


def test_an_arm_that_ended_in_a_shared_process_is_extended_in_a_process_of_its_own(
        world: World, logs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """b (one epoch) finishes while a trains on; its exit is recorded at once, so `gputwin extend b` restarts
    it alone from its final checkpoint while a's process goes on untouched."""
    import os
    import signal
    import time

    from gputwin.faces import cli
    from gputwin.control import launcher, supervise
    from gputwin.core.profiles import Experiment, Placement, Rules

    a, b = pair(world)
    a = replace(a, train=replace(a.train, epochs=3))
    monkeypatch.setenv(faults.ENV_VAR, "hang@10")  # b ends at step 8; a never starts its step 10
    exp = launcher.start_experiment(Experiment("extend-one", (a, b), Rules(baseline="a"), placement=Placement(cotrain="on")), root=logs)
    arm_a, arm_b = exp.arm("a"), exp.arm("b")
    shared_pid = supervise.read_pid(arm_a)
    deadline = time.monotonic() + 180
    while supervise.read_exit(arm_b) is None or faults.HANG_MESSAGE not in arm_a.stderr.read_text():
        assert time.monotonic() < deadline, "b did not finish while a trained on"
        time.sleep(0.05)
    assert supervise.read_exit(arm_b) == 0 and supervise.arm_status(arm_b) == supervise.FINISHED
    assert supervise.arm_status(arm_a) == supervise.RUNNING and supervise.read_pid(arm_a) == shared_pid

    monkeypatch.delenv(faults.ENV_VAR)
    assert cli.main(["extend", "b", "-x", "extend-one", "--epochs", "1"]) == 0
    assert "restarted from its last checkpoint" in capsys.readouterr().out
    while supervise.read_exit(arm_b) is None:
        assert time.monotonic() < deadline + 120, "the extended arm did not end"
        time.sleep(0.05)
    second = [e for e in events.read_events(arm_b.events).events if e.kind == events.STARTED][-1]
    assert second["pid"] != shared_pid[0] and "shares_process_with" not in second.data
    ended = log(arm_b.root)
    assert [e["total_steps"] for e in ended if e.kind == events.EXTENDED] == [16]
    assert ended[-1].kind == events.FINISHED and ended[-1]["step"] == 16
    assert supervise.read_pid(arm_a) == shared_pid and supervise.arm_alive(arm_a)  # a's process never noticed
    os.kill(shared_pid[0], signal.SIGKILL)


def test_a_packed_group_row_meets_about_as_many_shapes_as_one_arm_alone() -> None:
    """Each distinct row shape costs a CUDA graph capture. The co-trained row's buckets grow with the number of
    arms, so two arms' batches (whose summed length spreads wider) meet about as few shapes as one arm's
    batches do, with about the same share of padding."""
    import random

    from gputwin.train.batching import Example
    from gputwin.train.cofast import pack_group
    from gputwin.train.packing import LABEL_BUCKET, pack

    rng = random.Random(0)

    def sample() -> Example:  # the seed's shape: 150-350 tokens, the last 30% the answer
        n = rng.randint(150, 350)
        return Example(list(range(1, n + 1)), [-100] * (n - n * 3 // 10) + list(range(n * 3 // 10)), False)

    steps = [([sample() for _ in range(4)], [sample() for _ in range(4)]) for _ in range(400)]
    alone = {pack(a, label_bucket=LABEL_BUCKET).shape_key for a, _ in steps}
    two_arm_rows = [pack_group([("x", a), ("y", b)], pad_id=0).packed for a, b in steps]
    grouped = {p.shape_key for p in two_arm_rows}
    at_one_arms_buckets = {pack(a + b, label_bucket=LABEL_BUCKET).shape_key for a, b in steps}
    assert len(grouped) <= len(alone) < len(at_one_arms_buckets)
    padding = sum(p.length - p.n_tokens for p in two_arm_rows) / sum(p.n_tokens for p in two_arm_rows)
    assert padding < 0.1
    assert all(p.length % 256 == 0 and p.label_index.shape[0] % (2 * LABEL_BUCKET) == 0 for p in two_arm_rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_co_trained_shapes_captured_when_met_train_as_each_shape_met_eagerly_first(world: World) -> None:
    """train/cofast.py's graph rule on a GPU: after a set of arms' first graph, a new shape of that set is
    captured when met (eager_first="once" by family); the arms' losses follow the rule that ran every shape's
    first step eagerly. Then one arm alone (a probe's step) starts eagerly and is captured in turn."""
    from gputwin.validate.modeling import load_base
    from gputwin.train.cofast import GroupFastStep, pack_group
    from gputwin.train.cotrain import Member
    from gputwin.train.engine import build_optimizer
    from gputwin.train.batching import Example
    from gputwin.train.multilora import ArmView, SharedModel

    a, b = pair(world)
    generator = torch.Generator().manual_seed(5)

    def example(n: int) -> Example:
        ids = torch.randint(5, 300, (n,), generator=generator).tolist()
        return Example(ids, [-100] * (n // 2) + ids[n // 2:], False)

    steps = [[example(12 + (7 * k + j) % 40) for j in range(3)] for k in range(14)]
    runs = []
    for rule in (True, "once"):
        device = torch.device("cuda")
        shared = SharedModel(load_base(str(world.qwen), task="generate", dtype="fp32", device="cuda"),
                             [(a.lora, 7), (b.lora, 7)])
        shared.model.to(device).train()
        members = {n: Member(n, ArmView(shared, n).trainable(),
                             build_optimizer(ArmView(shared, n), lr=1e-3, weight_decay=0.0, device=device), 1.0)
                   for n in shared.names}
        group = GroupFastStep(shared, members, device=device, autocast_dtype=None)
        assert group.use_graphs
        group.graphs.eager_first = rule
        torch.manual_seed(0)
        curve = []
        for k, chosen in enumerate(steps):
            work = [(shared.names[0], chosen)] + ([(shared.names[1], steps[-1 - k])] if k < 10 else [])
            curve.append([o.result().loss for o in group(pack_group(work, pad_id=0), [1e-3] * len(work))])
        runs.append((curve, group.graphs))
    (each, each_graphs), (once, once_graphs) = runs
    assert once_graphs.eager_steps < each_graphs.eager_steps
    assert once_graphs.eager_steps >= 2  # the pair's first step, and the arm alone's
    assert [x for row in once for x in row] == pytest.approx([x for row in each for x in row], rel=1e-4)
