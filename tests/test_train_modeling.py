"""Model helpers: offline loading with clear errors, LoRA for both heads, adapters that load back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gputwin.validate import modeling
from gputwin.core.encoding import bio_label_names
from gputwin.core.errors import UserError
from gputwin.core.profiles import LoraSpec
from tiny import World

pytestmark = pytest.mark.slow
LABELS = bio_label_names(["EMAIL", "PERSON"])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("world"), train=8, test=2)


def test_resolve_dtype_picks_bf16_on_gpu_and_fp32_on_cpu() -> None:
    assert modeling.resolve_dtype("auto", "cpu") == torch.float32
    assert modeling.resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert modeling.resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(UserError, match="model.dtype"):
        modeling.resolve_dtype("int3", "cpu")


def test_a_hub_id_missing_from_the_cache_is_a_user_error_with_a_hint(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(modeling.ModelLoadError) as caught:
        modeling.load_tokenizer("gputwin-test/not-a-model")
    assert "gputwin-test/not-a-model" in caught.value.message and "hf download" in caught.value.hint
    with pytest.raises(modeling.ModelLoadError) as caught:
        modeling.load_base("gputwin-test/not-a-model", task="generate", dtype="fp32", device="cpu")
    assert "model.base" in caught.value.message and "model.base" in caught.value.hint


def test_a_local_folder_without_a_model_names_the_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(modeling.ModelLoadError, match="model folder .*empty") as caught:
        modeling.load_base(str(tmp_path / "empty"), task="generate", dtype="fp32", device="cpu")
    assert "config.json" in caught.value.hint


def test_decoder_lora_trains_only_the_adapter(world: World) -> None:
    base = modeling.load_base(str(world.qwen), task="generate", dtype="fp32", device="cpu")
    model = modeling.attach_lora(base, LoraSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj")), "generate")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # r x (in + out) for q_proj (32 -> 32) and v_proj (32 -> 16) in each of 2 layers
    assert modeling.count_trainable(model) == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert modeling.count_params(model) > modeling.count_trainable(model)


def test_tag_lora_also_trains_the_classifier_head(world: World) -> None:
    base = modeling.load_base(str(world.bert), task="tag", dtype="fp32", device="cpu", label_names=LABELS)
    assert base.config.id2label[1] == "B-EMAIL" and base.config.num_labels == 5
    model = modeling.attach_lora(base, LoraSpec(r=4, alpha=8, target_modules=("query", "value")), "tag")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trainable) and any("lora_" in n for n in trainable)
    assert not any("embeddings" in n for n in trainable)


def test_unknown_target_modules_list_what_the_model_has(world: World) -> None:
    base = modeling.load_base(str(world.bert), task="tag", dtype="fp32", device="cpu", label_names=LABELS)
    with pytest.raises(UserError, match="lora.target_modules") as caught:
        modeling.attach_lora(base, LoraSpec(target_modules=("q_proj",)), "tag")
    assert "query" in caught.value.hint and "classifier" not in caught.value.hint


def test_a_saved_adapter_loads_back_with_its_record_and_continues_as_init_adapter(world: World, tmp_path: Path) -> None:
    spec = LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=("query", "value"))
    torch.manual_seed(3)
    model = modeling.attach_lora(
        modeling.load_base(str(world.bert), task="tag", dtype="fp32", device="cpu", label_names=LABELS), spec, "tag")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)  # so the adapter changes the output
    folder = modeling.save_adapter(model, tmp_path / "adapter", {"task": "tag", "base": str(world.bert),
                                                                 "label_names": LABELS, "max_length": 64, "arm": "a"})
    meta = json.loads((folder / modeling.META_FILE).read_text())
    assert meta == {"task": "tag", "base": str(world.bert), "label_names": LABELS, "max_length": 64,
                    "trust_remote_code": None, "arm": "a"}
    assert (folder / "adapter_config.json").is_file()

    again = modeling.attach_lora(
        modeling.load_base(str(world.bert), task="tag", dtype="fp32", device="cpu", label_names=LABELS), spec, "tag",
        init_adapter=str(folder))
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    model.eval(), again.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, again(input_ids=ids).logits, atol=1e-6)
    assert modeling.count_trainable(again) == modeling.count_trainable(model)


def test_a_missing_init_adapter_is_a_user_error(world: World, tmp_path: Path) -> None:
    base = modeling.load_base(str(world.qwen), task="generate", dtype="fp32", device="cpu")
    with pytest.raises(modeling.ModelLoadError, match="model.init_adapter"):
        modeling.attach_lora(base, LoraSpec(), "generate", init_adapter=str(tmp_path / "nothing"))


def test_tokenizer_without_pad_borrows_eos(world: World) -> None:
    assert json.loads((world.qwen / "tokenizer_config.json").read_text()).get("pad_token") is None
    tokenizer = modeling.load_tokenizer(str(world.qwen))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id is not None
