"""A saved adapter's shape against a profile's: reading adapter folders, comparing keys and base models.

Plain files only (adapter_config.json, gputwin.json, config.json as peft and transformers write them);
no torch. tests/test_init_adapter.py continues real adapters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gputwin.core.adapter_shape import (AdapterError, base_difference, describe_mismatches, hub_id, label_types,
                                   mismatches, read_adapter, toml_value)

# What peft 0.21 writes for a gputwin tag arm (the keys that matter here, and a few that do not).
PEFT_CONFIG: dict[str, Any] = {
    "peft_type": "LORA", "task_type": "TOKEN_CLS", "r": 12, "lora_alpha": 24, "lora_dropout": 0.05,
    "target_modules": ["value", "query", "key"], "base_model_name_or_path": "/models/minilm", "rank_pattern": {},
    "alpha_pattern": {}, "modules_to_save": ["classifier"], "use_dora": False, "bias": "none",
}
BERT = {"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6, "vocab_size": 30522,
        "architectures": ["BertModel"], "transformers_version": "4.56.0"}


def adapter(folder: Path, meta: dict[str, Any] | None = None, **config: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(PEFT_CONFIG | config))
    if meta is not None:
        (folder / "gputwin.json").write_text(json.dumps(meta))
    return folder


def model(folder: Path, **config: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(BERT | config))
    return folder


def test_the_shape_comes_from_adapter_config_and_where_it_came_from_from_gputwin_json(tmp_path: Path) -> None:
    shape = read_adapter(adapter(tmp_path / "a", meta={"task": "tag", "base": "/home/me/minilm", "label_names": []}))
    assert (shape.r, shape.alpha, shape.dropout, shape.target_modules) == (12, 24, 0.05, ("value", "query", "key"))
    assert shape.task == "tag" and shape.task_file.endswith("a/gputwin.json")
    assert shape.base == "/home/me/minilm" and shape.base_file.endswith("a/gputwin.json")
    assert shape.lora_defaults() == {"model.task": "tag", "lora.r": 12, "lora.alpha": 24, "lora.dropout": 0.05,
                                     "lora.target_modules": ["value", "query", "key"]}


def test_a_tag_adapters_head_is_its_label_names(tmp_path: Path) -> None:
    labels = ["O", "B-PHONE", "I-PHONE", "B-EMAIL", "I-EMAIL"]
    shape = read_adapter(adapter(tmp_path / "a", meta={"task": "tag", "label_names": labels}))
    assert shape.label_names == tuple(labels) and shape.meta_file.endswith("a/gputwin.json")
    assert label_types(labels) == ["EMAIL", "PHONE"]
    assert read_adapter(adapter(tmp_path / "b")).label_names is None


def test_an_adapter_without_gputwin_json_is_read_from_peft_alone(tmp_path: Path) -> None:
    shape = read_adapter(adapter(tmp_path / "a", task_type="CAUSAL_LM", lora_alpha=16.0))
    assert shape.task == "generate" and shape.task_file.endswith("adapter_config.json")
    assert shape.base == "/models/minilm" and shape.base_file.endswith("adapter_config.json")
    assert shape.alpha == 16 and isinstance(shape.alpha, int)
    assert "model.task" not in read_adapter(adapter(tmp_path / "b", task_type="SEQ_CLS")).lora_defaults()


@pytest.mark.parametrize("config,words", [
    ({"peft_type": "PREFIX_TUNING"}, "LoRA adapters only"),
    ({"rank_pattern": {"query": 4}}, "rank or alpha per module"),
    ({"target_modules": "all-linear"}, "pattern 'all-linear'"),
    ({"target_modules": []}, "list of module names"),
    ({"r": 0}, "positive numbers"),
    ({"lora_alpha": "big"}, "positive numbers"),
])
def test_adapters_a_profile_cannot_describe_are_refused_naming_the_file(tmp_path: Path, config: dict[str, Any],
                                                                        words: str) -> None:
    with pytest.raises(AdapterError) as info:
        read_adapter(adapter(tmp_path / "a", **config))
    assert words in info.value.message and str(tmp_path / "a" / "adapter_config.json") in info.value.message
    assert info.value.hint


def test_a_folder_without_adapter_config_is_not_an_adapter_and_a_checkpoint_points_at_its_adapter(
        tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="holds no adapter_config.json") as info:
        read_adapter(tmp_path / "empty")
    assert "written by gputwin or peft" in info.value.hint
    adapter(tmp_path / "step-000200" / "adapter")
    with pytest.raises(AdapterError) as info:
        read_adapter(tmp_path / "step-000200")
    assert str(tmp_path / "step-000200" / "adapter") in info.value.hint


def test_a_damaged_adapter_config_is_named(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="cannot be read as JSON"):
        read_adapter(tmp_path / "a")


def test_mismatches_are_the_given_keys_the_adapter_disagrees_with(tmp_path: Path) -> None:
    shape = read_adapter(adapter(tmp_path / "a"))
    assert mismatches({}, shape) == []
    same = {"model.task": "tag", "lora.r": 12, "lora.alpha": 24, "lora.target_modules": ["query", "key", "value"]}
    assert mismatches(same, shape) == []  # target modules in another order are the same modules
    found = mismatches({"lora.r": 8, "lora.alpha": 16, "lora.target_modules": ["query"], "model.task": "generate"},
                       shape)
    assert [(m.key, m.wanted, m.trained) for m in found] == [
        ("model.task", "generate", "tag"), ("lora.r", 8, 12), ("lora.alpha", 16, 24),
        ("lora.target_modules", ["query"], ["value", "query", "key"])]
    assert all(m.source == shape.config_file for m in found)
    no_task = read_adapter(adapter(tmp_path / "b", task_type="SEQ_CLS"))
    assert mismatches({"model.task": "generate"}, no_task) == []  # nothing recorded, nothing to disagree with


def test_the_message_names_the_first_key_the_adapters_values_and_file_and_the_others(tmp_path: Path) -> None:
    shape = read_adapter(adapter(tmp_path / "a"))
    key, problem, hint = describe_mismatches(mismatches({"lora.r": 8, "lora.alpha": 16}, shape))
    assert key == "lora.r"
    assert problem == (f"8, but the init adapter was trained with r = 12 ({shape.config_file}); "
                       "lora.alpha differs too (16 here, 24 in the adapter)")
    assert hint.startswith("set r = 12, alpha = 24 in [lora] as the adapter has them, or leave r/alpha out")
    key, problem, hint = describe_mismatches(mismatches({"model.task": "generate"}, shape))
    assert key == "model.task" and 'trained with task = "tag"' in problem and 'set task = "tag" in [model]' in hint
    assert toml_value(["q", "v"]) == '["q", "v"]' and toml_value(True) == "true"


def test_hub_ids_and_cache_folders_name_the_same_model(tmp_path: Path) -> None:
    assert hub_id("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    cached = "/home/me/.cache/huggingface/hub/models--Qwen--Qwen3-0.6B/snapshots/abc123"
    assert hub_id(cached) == "Qwen/Qwen3-0.6B" and hub_id(str(tmp_path)) is None and hub_id("model") is None
    assert base_difference("Qwen/Qwen3-0.6B", cached) is None


def test_the_same_folder_or_a_copy_of_the_model_is_the_same_base(tmp_path: Path) -> None:
    one = model(tmp_path / "minilm")
    (tmp_path / "link").symlink_to(one)
    assert base_difference(str(one), str(one)) is None
    assert base_difference(str(tmp_path / "link"), str(one)) is None
    copy = model(tmp_path / "copy", transformers_version="4.57.1", torch_dtype="float32",
                 architectures=["BertForTokenClassification"])
    assert base_difference(str(copy), str(one)) is None


def test_another_model_is_named_with_how_its_config_differs(tmp_path: Path) -> None:
    one = model(tmp_path / "minilm")
    other = model(tmp_path / "larger", hidden_size=768, num_hidden_layers=12)
    assert base_difference(str(other), str(one)) == (
        "their config.json differ: hidden_size 768 against 384, num_hidden_layers 12 against 6")
    qwen = model(tmp_path / "qwen", model_type="qwen3")
    assert base_difference(str(qwen), str(one)).startswith("their config.json differ: model_type 'qwen3' against 'bert'")


def test_a_base_this_machine_lacks_cannot_be_compared_but_two_hub_ids_can(tmp_path: Path) -> None:
    one = model(tmp_path / "minilm")
    assert base_difference(str(one), "/elsewhere/minilm") is None  # trained on another machine: cannot tell
    assert base_difference("gputwin-test/model-a", "gputwin-test/model-b") == "two different hub ids"
    # a hub id with a config bundled with gputwin is compared by its config
    assert "model_type 'qwen3' against 'bert'" in base_difference("Qwen/Qwen3-0.6B", str(one))
