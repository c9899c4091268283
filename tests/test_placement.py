"""Which arms share a process ([placement] cotrain), and where the UI and `gputwin status` say so."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gputwin.core import events as ev
from gputwin.core import state as st
from gputwin.core.placement import cotrain_groups
from gputwin.core.profiles import DataSpec, LoraSpec, MilestoneSpec, ModelSpec, Profile, TrainSpec
from gputwin.faces.status import arm_lines, arm_summary
from gputwin.faces.widgets.arm_pane import header_text


def arm(name: str, *, device: int | None = 0, base: str = "Qwen/Qwen3-0.6B", task: str = "generate",
        dtype: str = "auto", **lora: object) -> Profile:
    return Profile(name=name, model=ModelSpec(base=base, task=task, dtype=dtype),
                   lora=replace(LoraSpec(r=8, alpha=16, dropout=0.05, target_modules=("q_proj", "v_proj")), **lora),
                   train=TrainSpec(), data=DataSpec(train="t.jsonl", test="v.jsonl"), milestone=MilestoneSpec(),
                   device=device)


def test_arms_sharing_base_device_and_dtype_are_grouped_whatever_their_lora() -> None:
    arms = [arm("a"), arm("b", r=12, alpha=24, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
            arm("c", device=1), arm("d", dtype="bf16"), arm("e", dtype="fp32"), arm("f", base="other"),
            arm("g", task="tag")]
    assert cotrain_groups(arms, "on") == [["a", "b", "d"], ["c"], ["e"], ["f"], ["g"]]  # auto on a GPU is bf16
    assert cotrain_groups(arms, "auto") == cotrain_groups(arms, "on")
    assert cotrain_groups(arms, "off") == [[a.name] for a in arms]
    assert cotrain_groups(arms, "on", alone={"b"}) == [["a", "d"], ["b"], ["c"], ["e"], ["f"], ["g"]]


def test_auto_leaves_cpu_arms_in_processes_of_their_own_and_on_groups_them() -> None:
    arms = [arm("a", device=None), arm("b", device=None)]
    assert cotrain_groups(arms, "auto") == [["a"], ["b"]]
    assert cotrain_groups(arms, "on") == [["a", "b"]]


def test_auto_leaves_an_arm_that_asks_for_compiled_layers_alone() -> None:
    compiled = replace(arm("b"), train=TrainSpec(compile="on"))
    arms = [arm("a"), compiled, arm("c"), replace(arm("d"), train=TrainSpec(compile="auto"))]
    assert cotrain_groups(arms, "auto") == [["a", "c", "d"], ["b"]]
    assert cotrain_groups(arms, "on") == [["a", "b", "c", "d"]]  # asked for explicitly: co-trained, uncompiled


def started(name: str, partners: list[str] | None) -> st.ArmState:
    data = {"kind": ev.STARTED, "t": 1.0, "v": 1, "arm": name, "pid": 4242, "device": "cuda:0 NVIDIA H100",
            "samples": 24, "steps_per_epoch": 6, "total_steps": 12, "milestone_step": 6}
    if partners is not None:
        data["shares_process_with"] = partners
    return st.fold(name, [ev.Event(ev.STARTED, 1.0, data)])


def test_the_arm_pane_and_status_say_which_arms_share_its_process() -> None:
    shared, alone = started("a", ["b"]), started("c", None)
    assert shared.shares_process_with == ("b",) and alone.shares_process_with == ()
    assert "co-trained with b" in header_text(shared, 2.0, "a").plain
    assert "co-trained" not in header_text(alone, 2.0, "a").plain
    assert "co-trained with b (one process)" in arm_lines(arm_summary(shared, 2.0, "a"), 2.0)[0]
    assert "co-trained" not in arm_lines(arm_summary(alone, 2.0, "a"), 2.0)[0]
    # a later life in a process of its own (resumed alone) no longer shares
    again = st.apply(shared, ev.Event(ev.STARTED, 3.0, {"pid": 99, "arm": "a", "step": 3}))
    assert again.shares_process_with == () and "co-trained" not in header_text(again, 4.0, "a").plain



def test_gputwin_run_takes_cotrain_and_refuses_other_values(capsys: pytest.CaptureFixture[str]) -> None:
    from gputwin.faces import cli

    assert cli.build_parser().parse_args(["run", "a.toml", "b.toml", "--cotrain", "on"]).cotrain == "on"
    assert cli.build_parser().parse_args(["run", "a.toml", "b.toml"]).cotrain is None  # the file's, or off
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "a.toml", "--cotrain", "yes"])
    assert "invalid choice" in capsys.readouterr().err
