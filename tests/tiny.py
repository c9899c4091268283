"""Tiny random models, tokenizers, datasets and arm folders for tests that train for real on CPU.

Nothing is downloaded: tokenizers are trained here on the test corpus (byte-level BPE, a few hundred
tokens), models are built from small configs and saved to a folder that a profile's model.base
points at, exactly like a user's local model folder.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

from gputwin.core.data import Entity, Sample, write_jsonl
from gputwin.core.encoding import INSTRUCTION, answer_text
from gputwin.core.profiles import DataSpec, LoraSpec, MilestoneSpec, ModelSpec, Profile, TrainSpec

FIRST = ["Anna", "Bo", "Chen Wei", "Dario", "Eve", "Farah", "Li Na", "Omar"]
LAST = ["Smith", "Okafor", "Zhang", "Rossi", "Novak", "Haddad"]
TEMPLATES = [
    "Please contact {PERSON} at {EMAIL} about the invoice.",
    "{PERSON} called from {PHONE} yesterday.",
    "Send the form to {EMAIL} or ring {PHONE}.",
    "Meeting notes: {PERSON} will present.",
    "No personal data in this sentence at all.",
]


def _value(kind: str, rng: random.Random) -> str:
    if kind == "PERSON":
        return f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    if kind == "EMAIL":
        return f"{rng.choice(FIRST).split()[0].lower()}{rng.randint(1, 99)}@example.org"
    return f"+1 555 {rng.randint(100, 999)} {rng.randint(1000, 9999)}"


def make_samples(n: int, seed: int = 0) -> list[Sample]:
    """Short texts with PERSON/EMAIL/PHONE entities and exact character spans."""
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        template = rng.choice(TEMPLATES)
        text, entities, rest = "", [], template
        while "{" in rest:
            before, _, after = rest.partition("{")
            kind, _, rest = after.partition("}")
            text += before
            value = _value(kind, rng)
            entities.append(Entity(kind, value, len(text), len(text) + len(value)))
            text += value
        samples.append(Sample(text + rest, tuple(entities)))
    return samples


def write_data(folder: Path, *, train: int = 24, test: int = 8, seed: int = 0) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(make_samples(train, seed), folder / "train.jsonl")
    write_jsonl(make_samples(test, seed + 1), folder / "test.jsonl")
    return folder / "train.jsonl", folder / "test.jsonl"


def make_tokenizer(kind: str, corpus: list[str], vocab_size: int = 400) -> Any:
    """A fast byte-level BPE tokenizer: kind "decoder" (EOS = pad) or "bert" ([CLS] text [SEP])."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>"] if kind == "decoder" else ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    if kind == "decoder":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")  # no pad, like many decoders
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=True),
        processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def corpus_for(samples: list[Sample]) -> list[str]:
    return [INSTRUCTION, "Text: PII:"] + [s.text for s in samples] + [answer_text(s.entities) for s in samples]


def tiny_qwen3(folder: Path, samples: list[Sample]) -> Path:
    """A 2-layer Qwen3 causal LM with its tokenizer, saved as a local model folder."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = make_tokenizer("decoder", corpus_for(samples))
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_bert(folder: Path, samples: list[Sample]) -> Path:
    """A 2-layer BERT encoder (no head, like a sentence-embedding model) with its tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = make_tokenizer("bert", corpus_for(samples))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def profile_for(base: Path, train: Path, test: Path, *, task: str = "generate", name: str = "arm",
                **train_fields: Any) -> Profile:
    """A CPU profile for a tiny model; keyword arguments override TrainSpec fields."""
    targets = ("q_proj", "v_proj") if task == "generate" else ("query", "value")
    spec = TrainSpec(learning_rate=5e-3, batch_size=4, epochs=1, max_length=256, warmup_steps=2,
                     scheduler="linear", seed=7, checkpoint_every=3, keep_checkpoints=2, engine="plain", threads=1)
    milestone_step = train_fields.pop("milestone_step", 10_000)
    return Profile(
        name=name,
        model=ModelSpec(base=str(base), task=task, dtype="fp32"),
        lora=LoraSpec(r=4, alpha=8, dropout=0.1, target_modules=targets),
        train=replace(spec, **train_fields),
        data=DataSpec(train=str(train), test=str(test)),
        milestone=MilestoneSpec(step=milestone_step, sample_size=4, sample_seed=1),
        device=None,
    )


def make_arm(root: Path, profile: Profile) -> Path:
    """An arm folder as `gputwin run` leaves it for the trainer: profile.json and nothing else."""
    arm = root / profile.name
    arm.mkdir(parents=True, exist_ok=True)
    (arm / "profile.json").write_text(json.dumps(profile.to_dict(), indent=2), encoding="utf-8")
    return arm


class World:
    """Data files and both tiny model folders under one folder (built once per test module)."""

    def __init__(self, folder: Path, *, train: int = 24, test: int = 8) -> None:
        self.folder = folder
        self.train, self.test = write_data(folder / "data", train=train, test=test)
        samples = make_samples(train)
        self.qwen = tiny_qwen3(folder / "qwen3", samples)
        self.bert = tiny_bert(folder / "bert", samples)

    def profile(self, task: str = "generate", **fields: Any) -> Profile:
        base = self.qwen if task == "generate" else self.bert
        return profile_for(base, self.train, self.test, task=task, **fields)
