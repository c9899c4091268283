"""train.compile: when an arm compiles its decoder layers, and the record of what a compilation cost."""

from __future__ import annotations

from pathlib import Path

import pytest

from gputwin.train import compiling


def decide(mode: str = "auto", *, on_gpu: bool = True, engine: str = "fast", steps: int = 1000,
           tokens_per_step: float = 1000.0, recorded_s: float | None = None) -> compiling.Decision:
    return compiling.decide(mode, on_gpu=on_gpu, engine=engine, steps=steps, tokens_per_step=tokens_per_step,
                            recorded_s=recorded_s)


def test_off_and_on_are_what_they_say_on_a_gpu() -> None:
    assert not decide("off").on
    assert decide("on", steps=1).on


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_never_on_a_cpu_or_with_the_plain_engine(mode: str) -> None:
    assert "GPU" in decide(mode, on_gpu=False).why and not decide(mode, on_gpu=False).on
    assert "plain" in decide(mode, engine="plain").why and not decide(mode, engine="plain").on


def test_auto_weighs_the_planned_steps_against_the_expected_compilation() -> None:
    per_step = 1000 * compiling.SAVED_S_PER_TOKEN
    cold_break_even = compiling.COLD_S / per_step
    assert not decide(steps=int(cold_break_even * 0.9)).on
    long = decide(steps=int(cold_break_even * 1.1))
    assert long.on and "first on this machine" in long.why
    # with a cheap compilation recorded here (warm caches), a short run compiles too
    warm = decide(steps=int(10 / per_step) + 1, recorded_s=10.0)
    assert warm.on and "last one on this machine" in warm.why
    assert not decide(steps=int(10 / per_step) - 1, recorded_s=10.0).on


def test_the_record_round_trips_and_a_bad_one_counts_as_none(tmp_path: Path) -> None:
    assert compiling.recorded_seconds(tmp_path, "k") is None
    compiling.record(tmp_path, "k", 12.345)
    assert compiling.recorded_seconds(tmp_path, "k") == 12.35
    (tmp_path / "gputwin" / "k.json").write_text("{not json")
    assert compiling.recorded_seconds(tmp_path, "k") is None
    (tmp_path / "gputwin" / "k.json").write_text('{"seconds": "slow"}')
    assert compiling.recorded_seconds(tmp_path, "k") is None


def test_the_key_changes_with_what_the_compiled_layer_depends_on() -> None:
    base = dict(model_config={"hidden_size": 64, "_name_or_path": "a"}, lora={"r": 8}, dtype="bf16",
                device_name="H100", torch_version="2.11")
    key = compiling.layer_key(**base)
    assert compiling.layer_key(**{**base, "model_config": {"hidden_size": 64, "_name_or_path": "b"}}) == key
    for change in ({"lora": {"r": 12}}, {"dtype": "fp16"}, {"device_name": "H200"}, {"torch_version": "2.12"},
                   {"model_config": {"hidden_size": 128}}):
        assert compiling.layer_key(**{**base, **change}) != key


def test_the_cache_goes_to_the_logs_folder_unless_the_environment_names_one(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert compiling.use_cache(tmp_path) == tmp_path / ".cache" / "inductor"
    assert (tmp_path / ".cache" / "inductor").is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compiling.use_cache(tmp_path) == tmp_path / "mine"


def test_follow_records_the_first_compiled_step_and_says_why(tmp_path: Path) -> None:
    class Engine:
        paths = {"compile": {"on": True, "why": "torch.compile'd"}}
        on_compiled = None

    engine = Engine()
    decision = compiling.Decision(True, "auto: worth it", cache=tmp_path, key="k")
    compiling.follow(engine, decision)
    assert engine.paths["compile"] == {"on": True, "why": "auto: worth it"}
    engine.on_compiled(7.0)
    assert compiling.recorded_seconds(tmp_path, "k") == 7.0


def test_the_trainer_decides_from_its_profile_data_and_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """setup.compile_decision: a GPU arm's planned steps and tokens a step from its data, the record of this
    machine's last compilation of the same layer; a CPU arm says why it does not compile."""
    from dataclasses import replace
    from types import SimpleNamespace

    import torch

    from gputwin.core.profiles import DataSpec, LoraSpec, MilestoneSpec, ModelSpec, Profile, TrainSpec
    from gputwin.train.setup import compile_decision

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    profile = Profile(name="a", model=ModelSpec(base="m"), lora=LoraSpec(), train=TrainSpec(epochs=2),
                      data=DataSpec(train="t", test="v"), milestone=MilestoneSpec(), device=0)
    model = SimpleNamespace(config=SimpleNamespace(to_dict=lambda: {"hidden_size": 64}))
    data = SimpleNamespace(examples=[SimpleNamespace(n_tokens=250)] * 4000)  # 2,000 steps of 1,000 tokens
    gpu = torch.device("cuda")
    decision = compile_decision(profile, gpu, "H100", model, data, logs_root=tmp_path)
    assert not decision.on and "2000 steps would save" in decision.why  # against a first compilation
    compiling.record(decision.cache, decision.key, 1.0)  # this machine compiled the same layer in 1 s
    assert compile_decision(profile, gpu, "H100", model, data, logs_root=tmp_path).on
    assert not compile_decision(profile, gpu, "H200", model, data, logs_root=tmp_path).on  # another GPU: no record
    cpu = compile_decision(profile, torch.device("cpu"), "cpu", model, data, logs_root=tmp_path)
    assert not cpu.on and "GPU" in cpu.why
    off = compile_decision(replace(profile, train=TrainSpec(compile="off")), gpu, "H100", model, data,
                           logs_root=tmp_path)
    assert not off.on and off.why == "off (train.compile)"
