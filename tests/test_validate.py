"""The validator end to end on tiny models built here. Each head gets a model that has memorised the test
samples (a few dozen optimizer steps), so a correct pipeline must score exactly F1 = 1.0 and any slip in
padding, ordering, stopping, parsing or span decoding shows up as a lower score."""

from __future__ import annotations

import copy
import json

import pytest

from gputwin.faces.cli import main as cli_main
from gputwin.core.data import Dataset, Sample, load_dataset, write_jsonl
from gputwin.core.encoding import IGNORE_INDEX, bio_label_names, encode_generate, encode_tag, prompt_ids
from gputwin.core.errors import UserError
from gputwin.core.profiles import LoraSpec
from gputwin.validate.run import format_result, load_for_validation, predict, select_samples, validate
from gputwin.validate.predict import _json_closed_criterion
from test_encoding import bert_tokenizer, bpe_tokenizer, spans

torch = pytest.importorskip("torch")

GEN_CASES = [
    ("call John Smith please", [("PERSON", "John Smith")]),
    ("email john@example.com now", [("EMAIL", "john@example.com")]),
    ("我叫张三，电话13800138000", [("PERSON", "张三"), ("PHONE", "13800138000")]),
    ("nothing here", []),
    ("John Smith lives at 12 Main Street", [("PERSON", "John Smith"), ("ADDRESS", "12 Main Street")]),
    ("reach Mary on +1 555 0100", [("PERSON", "Mary"), ("PHONE", "+1 555 0100")]),
]
TAG_CASES = [
    ("call john smith on 555 0100 please", [("PERSON", "john smith"), ("PHONE", "555 0100")]),
    ("email bob@example.com, address 12 new york road.", [("EMAIL", "bob@example.com"), ("ADDRESS", "12 new york road")]),
    ("我叫张三，电话是13800138000，住在北京市朝阳区。", [("PERSON", "张三"), ("PHONE", "13800138000"), ("ADDRESS", "北京市朝阳区")]),
    ("hello, no pii here.", []),
    ("my name is ann lee", [("PERSON", "ann lee")]),
]


def make_samples(cases) -> list[Sample]:
    return [Sample(text, spans(text, *pairs)) for text, pairs in cases]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train far faster on one thread than fighting over shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def memorise(model, batch: dict, steps: int, lr: float = 1e-2) -> float:
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def padded(rows: list[dict], pad: int) -> dict:
    width = max(len(r["input_ids"]) for r in rows)
    fill = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
    return {
        "input_ids": torch.tensor([fill(r["input_ids"], pad) for r in rows]),
        "attention_mask": torch.tensor([fill([1] * len(r["input_ids"]), 0) for r in rows]),
        "labels": torch.tensor([fill(r["labels"], IGNORE_INDEX) for r in rows]),
    }


# ---------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    """A 2-layer Qwen3 that has memorised GEN_CASES' answers, its chat-template tokenizer, and the test file."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = tmp_path_factory.mktemp("gen")
    tok = bpe_tokenizer(chat_template=True)
    config = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    samples = make_samples(GEN_CASES)
    rows = [encode_generate(s.text, s.entities, tok, 512) for s in samples]
    loss = memorise(model, padded(rows, tok.pad_token_id), steps=120)
    assert loss < 0.05, f"the tiny model did not memorise its answers (loss {loss})"
    write_jsonl(samples, folder / "test.jsonl")
    return model, tok, folder / "test.jsonl"


def test_generate_validate_scores_a_memorising_model(gen, tmp_path):
    model, tok, test = gen
    model.train()
    out = tmp_path / "validation" / "step-000010.json"
    result = validate(model, tok, task="generate", test_path=test, sample_size=4, seed=3, device="cpu",
                      step=10, arm="aggressive", out_path=out, batch_size=3)
    assert model.training  # the trainer's live model goes back to training mode
    assert result["f1"] == result["precision"] == result["recall"] == 1.0
    assert result["unparsable"] == 0 and result["n"] == 4 and len(result["sample_indices"]) == 4
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written["schema"] == 1 and written["arm"] == "aggressive" and written["step"] == 10
    assert written["sample_indices"] == select_samples(load_dataset(test), 4, 3)[0]
    assert written["per_sample"] == result["per_sample"] and written["task"] == "generate"
    # the decode's room and what it used of it: a memorising model closes its answers early
    assert 0 < written["generated_tokens"] < written["n"] * written["max_new_tokens"]
    assert not list(out.parent.glob(".*tmp"))


def test_generate_batch_size_does_not_change_outputs(gen):
    model, tok, test = gen
    samples = load_dataset(test).samples
    _, one = predict(model, tok, samples, task="generate", device="cpu", batch_size=1)
    preds, four = predict(model, tok, samples, task="generate", device="cpu", batch_size=4)
    assert one["outputs"] == four["outputs"]
    assert four["batches"] == 2 and one["batches"] == len(samples)
    assert [sorted((e.type, e.value) for e in p) for p in preds] == [
        sorted((e.type, e.value) for e in s.entities) for s in samples]


@pytest.mark.parametrize("decoder", ["fast", "plain"])
def test_a_second_validation_reuses_the_prompts_and_vocabulary_sweep(gen, decoder, monkeypatch):
    """The trainer validates the same samples again (co-trained arms, the probe, later milestones): the prompts
    are tokenised and the vocabulary swept once per tokenizer, and the answers stay the same."""
    from gputwin.validate import predict as predict_module

    model, tok, test = gen
    tok = copy.deepcopy(tok)  # a tokenizer this test alone has used
    samples = load_dataset(test).samples
    calls = {"encode": 0, "sweep": 0}
    encode, sweep = predict_module.encode_prompts, type(tok).convert_ids_to_tokens

    def counted_encode(*args, **kwargs):
        calls["encode"] += 1
        return encode(*args, **kwargs)

    def counted_sweep(self, ids, *args, **kwargs):
        calls["sweep"] += isinstance(ids, list) and len(ids) == len(self)
        return sweep(self, ids, *args, **kwargs)

    monkeypatch.setattr(predict_module, "encode_prompts", counted_encode)
    monkeypatch.setattr(type(tok), "convert_ids_to_tokens", counted_sweep)
    first = predict(model, tok, samples, task="generate", device="cpu", decoder=decoder)
    second = predict(model, tok, samples, task="generate", device="cpu", decoder=decoder)
    assert first[1]["outputs"] == second[1]["outputs"]
    assert calls["encode"] == 1 and calls["sweep"] == 1
    predict(model, tok, samples[:2], task="generate", device="cpu", decoder=decoder)  # other texts: encoded anew
    assert calls["encode"] == 2


def test_prepared_prompts_are_what_predict_then_uses_and_a_tokenizer_in_use_waits(gen, monkeypatch):
    """prepare() (a trainer's thread, while it trains) tokenises the prompts and sweeps the vocabulary ahead:
    predict() then does neither again and answers the same; while a preparation holds the tokenizer, predict()
    waits for it instead of using the tokenizer from two threads."""
    import threading

    from gputwin.validate import predict as predict_module

    model, tok, test = gen
    tok = copy.deepcopy(tok)
    samples = load_dataset(test).samples
    reference = predict(model, copy.deepcopy(tok), samples, task="generate", device="cpu")[1]["outputs"]
    calls = {"encode": 0}
    encode = predict_module.encode_prompts
    release = threading.Event()

    def slow_encode(*args, **kwargs):
        calls["encode"] += 1
        release.wait(5)
        return encode(*args, **kwargs)

    monkeypatch.setattr(predict_module, "encode_prompts", slow_encode)
    preparing = threading.Thread(target=predict_module.prepare, args=(tok, samples),
                                 kwargs={"task": "generate", "max_length": 512})
    preparing.start()
    while calls["encode"] == 0:  # the preparation holds the tokenizer now
        preparing.join(0.01)
    answers: list = []
    predicting = threading.Thread(target=lambda: answers.append(predict(model, tok, samples, task="generate",
                                                                        device="cpu")))
    predicting.start()
    predicting.join(0.3)
    assert predicting.is_alive() and not answers  # waiting for the preparation
    release.set()
    preparing.join(5)
    predicting.join(30)
    assert answers[0][1]["outputs"] == reference and calls["encode"] == 1
    predict_module.prepare(tok, samples, task="tag", max_length=512)  # nothing to prepare for a tag head
    assert calls["encode"] == 1


def test_random_model_outputs_do_not_depend_on_batching():
    """Left padding must not leak into what a (random, unstopped) model writes."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = bpe_tokenizer()
    config = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=1024,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    model = Qwen3ForCausalLM(config)
    samples = make_samples(GEN_CASES)
    _, one = predict(model, tok, samples, task="generate", device="cpu", batch_size=1, max_new_tokens=8)
    _, three = predict(model, tok, samples, task="generate", device="cpu", batch_size=3, max_new_tokens=8)
    assert one["outputs"] == three["outputs"]
    assert any(one["outputs"])


def test_generation_stops_once_the_list_is_closed(gen):
    """With eos moved to a token the model never writes, only the JSON stop can end generation early."""
    model, tok, test = gen
    other_eos = copy.deepcopy(tok)
    other_eos.eos_token = "<|im_start|>"
    samples = load_dataset(test).samples
    _, info = predict(model, other_eos, samples, task="generate", device="cpu", batch_size=6, max_new_tokens=200)
    assert [json.loads(o) for o in info["outputs"]] == [
        [{"type": e.type, "value": e.value} for e in s.entities] for s in samples]
    # the model's own <|im_end|> may follow a closed list once, but nothing after it
    assert info["generated_tokens"] < 6 * 30


def test_json_closed_criterion_marks_rows_one_by_one():
    tok = bpe_tokenizer()
    prompt = prompt_ids("x", tok)
    rows = ['[{"type":"PERSON","value":"a]b"}] more', '[] tail']
    ids = [tok(r, add_special_tokens=False)["input_ids"] for r in rows]
    width = max(len(i) for i in ids)
    ids = [i + [tok.pad_token_id] * (width - len(i)) for i in ids]
    criterion = _json_closed_criterion(tok, len(prompt))
    done_at = [None, None]
    for k in range(1, width + 1):
        batch = torch.tensor([prompt + row[:k] for row in ids])
        done = criterion(batch, None).tolist()
        for r in range(2):
            if done[r] and done_at[r] is None:
                done_at[r] = tok.decode(ids[r][:k])
    assert done_at == ['[{"type":"PERSON","value":"a]b"}]', "[]"]


# ---------------------------------------------------------------- tag


@pytest.fixture(scope="module")
def tag(tmp_path_factory):
    """A saved random BERT token classifier (the base) and a LoRA adapter on it that memorised TAG_CASES."""
    from transformers import BertConfig, BertForTokenClassification

    from gputwin.validate.modeling import attach_lora, save_adapter

    folder = tmp_path_factory.mktemp("tag")
    tok = bert_tokenizer(folder)
    names = bio_label_names(["PERSON", "PHONE", "EMAIL", "ADDRESS"])
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=len(names),
                        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(0)
    base_dir = folder / "base"
    BertForTokenClassification(config).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    model = BertForTokenClassification.from_pretrained(base_dir)
    model = attach_lora(model, LoraSpec(r=8, alpha=16, dropout=0.0, target_modules=("query", "value")), "tag")
    samples = make_samples(TAG_CASES)
    label2id = {n: i for i, n in enumerate(names)}
    rows = [encode_tag(s.text, s.entities, tok, label2id, 64) for s in samples]
    loss = memorise(model, padded(rows, tok.pad_token_id), steps=150, lr=2e-2)
    assert loss < 0.3, f"the tiny tagger did not memorise its labels (loss {loss})"
    adapter = save_adapter(model, folder / "adapter", {"task": "tag", "base": str(base_dir), "label_names": names,
                                                       "max_length": 64, "trust_remote_code": False})
    write_jsonl(samples, folder / "test.jsonl")
    return model, tok, names, adapter, folder / "test.jsonl"


def test_tag_validate_scores_a_memorising_model(tag, tmp_path):
    model, tok, names, _, test = tag
    out = tmp_path / "v.json"
    result = validate(model, tok, task="tag", test_path=test, sample_size=100, seed=0, label_names=names,
                      out_path=out, max_length=64, batch_size=2)
    assert result["f1"] == 1.0 and result["n"] == len(TAG_CASES)
    assert set(result["per_type"]) == {"PERSON", "PHONE", "EMAIL", "ADDRESS"}
    assert json.loads(out.read_text(encoding="utf-8"))["f1"] == 1.0


def test_cli_validate_on_a_saved_adapter_matches_in_process(tag, tmp_path, capsys):
    model, tok, names, adapter, test = tag
    out = tmp_path / "cli.json"
    code = cli_main(["validate", "--model", str(adapter), "--test-data", str(test), "--sample-size", "4",
                     "--seed", "5", "--device", "cpu", "--batch-size", "3", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "PERSON" in printed and "unparsable 0" in printed
    from_cli = json.loads(out.read_text(encoding="utf-8"))
    in_process = validate(model, tok, task="tag", test_path=test, sample_size=4, seed=5, label_names=names,
                          max_length=64)
    assert from_cli["f1"] == 1.0
    assert from_cli["sample_indices"] == in_process["sample_indices"]
    assert from_cli["per_sample"] == in_process["per_sample"]


def test_load_for_validation_reads_task_and_labels(tag):
    _, _, names, adapter, _ = tag
    model, tok, task, labels = load_for_validation(adapter, device="cpu")
    assert task == "tag" and labels == names and not model.training


def test_generate_adapter_through_the_cli(gen, tmp_path):
    """A zero-initialised LoRA adapter on the memorising model changes nothing: the CLI must score 1.0."""
    from gputwin.validate.modeling import attach_lora, save_adapter

    model, tok, test = gen
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    from transformers import Qwen3ForCausalLM

    peft_model = attach_lora(Qwen3ForCausalLM.from_pretrained(base_dir), LoraSpec(r=4, alpha=8, dropout=0.0), "generate")
    adapter = save_adapter(peft_model, tmp_path / "adapter", {"task": "generate", "base": str(base_dir),
                                                              "label_names": None, "max_length": 512})
    out = tmp_path / "gen.json"
    assert cli_main(["validate", "--model", str(adapter), "--test-data", str(test), "--sample-size", "6",
                     "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["task"] == "generate" and result["f1"] == 1.0 and result["unparsable"] == 0


# ---------------------------------------------------------------- sampling, errors, output


def test_select_samples_is_seeded_sorted_and_shared(tmp_path):
    samples = [Sample(f"text {i}", ()) for i in range(50)]
    dataset = Dataset(tmp_path / "t.jsonl", samples, [], "canonical")
    a, picked = select_samples(dataset, 10, seed=7)
    assert a == sorted(a) and len(set(a)) == 10 and picked == [samples[i] for i in a]
    assert select_samples(dataset, 10, seed=7)[0] == a
    assert select_samples(dataset, 10, seed=8)[0] != a
    assert select_samples(dataset, 500, seed=7)[0] == list(range(50))


def test_cli_errors_name_the_problem(tag, tmp_path, capsys):
    _, _, _, adapter, test = tag
    assert cli_main(["validate", "--model", str(tmp_path / "nope"), "--test-data", str(test)]) == 2
    assert "nope" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (broken / name).write_bytes((adapter / name).read_bytes())
    meta = json.loads((adapter / "gputwin.json").read_text(encoding="utf-8"))
    meta["base"] = str(tmp_path / "missing-base")
    (broken / "gputwin.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(UserError, match="--base"):
        load_for_validation(broken, device="cpu")
    assert cli_main(["validate", "--model", str(adapter), "--test-data", str(test), "--sample-size", "0"]) == 2
    assert "--sample-size" in capsys.readouterr().err


def test_format_result_lists_types_and_overall():
    result = {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "tp": 1, "fp": 1, "fn": 0, "macro_f1": 2 / 3, "n": 2,
              "per_type": {"EMAIL": {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1, "tp": 1, "fp": 1,
                                     "fn": 0}},
              "unparsable": 1, "seconds": 0.25, "task": "generate", "device": "cpu"}
    table = format_result(result)
    assert "EMAIL" in table and "overall" in table and " 66.7" in table and "unparsable 1" in table


@pytest.mark.parametrize("model_kind", ["memorised", "random"])
def test_fast_and_plain_decoders_write_the_same_answers(gen, model_kind):
    """The fast decoder is the default; transformers' generate stays selectable and must agree with it."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model, tok, test = gen
    samples = load_dataset(test).samples
    if model_kind == "random":
        config = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=1024,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(2)
        model = Qwen3ForCausalLM(config)
    _, fast = predict(model, tok, samples, task="generate", device="cpu", max_new_tokens=12, decoder="fast")
    _, plain = predict(model, tok, samples, task="generate", device="cpu", max_new_tokens=12, decoder="plain")
    assert fast["decoder"] == "fast" and plain["decoder"] == "plain"
    assert fast["outputs"] == plain["outputs"]
    assert any(fast["outputs"])


def test_a_result_file_that_cannot_be_written_leaves_nothing_half_written(tmp_path):
    from gputwin.validate.run import write_json_atomic

    out = tmp_path / "validation" / "step-000010.json"
    write_json_atomic(out, {"f1": 0.5})
    with pytest.raises(TypeError):
        write_json_atomic(out, {"f1": 0.9, "oops": object()})  # fails half way through the dump
    assert json.loads(out.read_text()) == {"f1": 0.5} and [p.name for p in out.parent.iterdir()] == [out.name]
