"""Both task encodings against real tokenizers built here: a BERT WordPiece tokenizer (CJK chars and ## pieces)
for the tag head and a byte-level BPE tokenizer (with and without a chat template) for the generate head."""

from __future__ import annotations

from pathlib import Path

import pytest

from gputwin.core.data import Entity
from gputwin.core.encoding import (
    IGNORE_INDEX,
    INSTRUCTION,
    answer_text,
    bio_label_names,
    build_prompt,
    decode_tag,
    encode_generate,
    encode_generate_many,
    encode_prompt,
    encode_prompts,
    encode_tag,
    encode_tag_many,
    parse_answer,
    prompt_ids,
)

# ---------------------------------------------------------------- tokenizer builders (also used by test_validate)

WORDS = """the a my is and at to call me on please email send name phone address lives street road new york
john smith mary jones contact order number from for with of in , . : ; @ - + ( ) / # example com org mail
hello write reach bob ann lee""".split()
PIECES = ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + list("abcdefghijklmnopqrstuvwxyz0123456789")
CJK = list("我叫张三李四王五电话是地址北京市朝阳区上海的邮箱，。：号码住在请联系")

QWEN_LIKE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def bert_tokenizer(folder: Path):
    """A BertTokenizerFast over a small vocabulary written to folder/vocab.txt."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + PIECES + CJK
    path = folder / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab=str(path), do_lower_case=True, tokenize_chinese_chars=True)


def bpe_tokenizer(chat_template: bool = False, vocab_size: int = 700):
    """A byte-level BPE tokenizer trained here on the instruction and PII-like text: any text encodes and
    decodes back exactly. eos <|im_end|>, pad <|endoftext|>, optionally a Qwen-like chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [INSTRUCTION, answer_text([Entity("PERSON", "John Smith"), Entity("EMAIL", "john@example.com")]),
              "Text: please call John Smith on +1 555 0100 or email john@example.com, he lives at 12 Main Street.",
              "我叫张三，电话13800138000，住在北京市朝阳区。"] * 3
    core.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        tok.chat_template = QWEN_LIKE_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return bert_tokenizer(tmp_path_factory.mktemp("bert"))


def spans(text: str, *pairs: tuple[str, str]) -> tuple[Entity, ...]:
    """Entities with spans found in text (each value once, in order)."""
    out, at = [], 0
    for etype, value in pairs:
        start = text.index(value, at)
        out.append(Entity(etype, value, start, start + len(value)))
        at = start + len(value)
    return tuple(out)


# ---------------------------------------------------------------- tag head

TAG_CASES = [
    ("call john smith on 555 0100 please", (("PERSON", "john smith"), ("PHONE", "555 0100"))),
    ("email bob@example.com, address 12 new york road.", (("EMAIL", "bob@example.com"), ("ADDRESS", "12 new york road"))),
    ("我叫张三，电话是13800138000，住在北京市朝阳区。", (("PERSON", "张三"), ("PHONE", "13800138000"), ("ADDRESS", "北京市朝阳区"))),
    ("my name is johnsmithx and ann lee", (("PERSON", "johnsmithx"), ("PERSON", "ann lee"))),  # ## pieces, two adjacent entities
    ("hello, no pii here.", ()),
]


@pytest.mark.parametrize("text,pairs", TAG_CASES)
def test_tag_round_trip_recovers_gold_entities(bert, text, pairs):
    gold = spans(text, *pairs)
    names = bio_label_names(["PERSON", "PHONE", "EMAIL", "ADDRESS"])
    label2id = {n: i for i, n in enumerate(names)}
    enc = encode_tag(text, gold, bert, label2id, max_length=64)
    assert not enc["truncated"]
    assert enc["labels"][0] == IGNORE_INDEX and enc["labels"][-1] == IGNORE_INDEX  # [CLS] and [SEP]
    assert len(enc["input_ids"]) == len(enc["labels"]) == len(enc["offsets"]) == len(enc["attention_mask"])
    assert decode_tag(text, enc["offsets"], enc["labels"], names) == list(gold)
    assert decode_tag(text, enc["offsets"], enc["labels"], dict(enumerate(names))) == list(gold)


def test_tag_labels_b_then_i_over_word_pieces(bert):
    text = "my name is johnsmithx"
    gold = spans(text, ("PERSON", "johnsmithx"))
    names = bio_label_names(["PERSON"])
    enc = encode_tag(text, gold, bert, {n: i for i, n in enumerate(names)}, max_length=32)
    pieces = [names[x] for x, (s, e) in zip(enc["labels"], enc["offsets"]) if x != IGNORE_INDEX and s >= gold[0].start]
    assert len(pieces) > 1 and pieces[0] == "B-PERSON" and set(pieces[1:]) == {"I-PERSON"}


def test_tag_truncation_is_flagged(bert):
    text = " ".join(["hello"] * 50) + " john"
    gold = spans(text, ("PERSON", "john"))
    names = bio_label_names(["PERSON"])
    enc = encode_tag(text, gold, bert, {n: i for i, n in enumerate(names)}, max_length=16)
    assert enc["truncated"] and len(enc["input_ids"]) == 16
    assert decode_tag(text, enc["offsets"], enc["labels"], names) == []


def test_tag_batch_encoding_equals_one_sample_at_a_time(bert):
    samples = [(text, spans(text, *pairs)) for text, pairs in TAG_CASES]
    samples.append((" ".join(["hello"] * 50) + " john", ()))  # cut at max_length
    label2id = {n: i for i, n in enumerate(bio_label_names(["PERSON", "PHONE", "EMAIL", "ADDRESS"]))}
    batch = encode_tag_many(samples, bert, label2id, max_length=16)
    assert batch == [encode_tag(text, gold, bert, label2id, max_length=16) for text, gold in samples]
    assert batch[-1]["truncated"] and encode_tag_many([], bert, label2id, max_length=16) == []


def test_bio_label_names_sorted_and_deduplicated():
    assert bio_label_names(["PHONE", "ADDRESS", "PHONE"]) == ["O", "B-ADDRESS", "I-ADDRESS", "B-PHONE", "I-PHONE"]


def test_decode_tag_is_lenient_with_model_output():
    names = bio_label_names(["PERSON", "PHONE"])
    ids = {n: i for i, n in enumerate(names)}
    text = "Hi  John Smith, 555"
    # byte-level style offsets: the space before a word belongs to the token
    offsets = [(0, 2), (2, 3), (3, 8), (8, 11), (11, 14), (14, 15), (15, 19), (0, 0)]
    labels = ["O", "O", "I-PERSON", "I-PERSON", "B-PERSON", "O", "I-PHONE", "O"]
    label_ids = [ids[x] for x in labels[:-1]] + [IGNORE_INDEX]
    # "Smith" split as " Sm" + "ith" with B on the second piece: merged into one word-level entity
    got = decode_tag(text, offsets, label_ids, names)
    assert got == [Entity("PERSON", "John Smith", 4, 14), Entity("PHONE", "555", 16, 19)]


def test_decode_tag_separates_adjacent_words_of_same_type():
    names = bio_label_names(["PERSON"])
    text = "ann bob"
    got = decode_tag(text, [(0, 3), (4, 7)], [1, 1], names)
    assert got == [Entity("PERSON", "ann", 0, 3), Entity("PERSON", "bob", 4, 7)]


# ---------------------------------------------------------------- generate head


def test_answer_text_is_compact_json_in_text_order():
    ents = [Entity("EMAIL", "李@x.cn", 10, 16), Entity("PERSON", "张三", 0, 2)]
    assert answer_text(ents) == '[{"type":"PERSON","value":"张三"},{"type":"EMAIL","value":"李@x.cn"}]'
    assert answer_text([]) == "[]"
    assert parse_answer(answer_text(ents)) == ([Entity("PERSON", "张三"), Entity("EMAIL", "李@x.cn")], True)


def test_build_prompt_plain_and_chat():
    plain = bpe_tokenizer()
    assert build_prompt("hi there", plain) == f"{INSTRUCTION}\n\nText: hi there\nPII:"
    chat = bpe_tokenizer(chat_template=True)
    prompt = build_prompt("hi there", chat)
    assert prompt.startswith("<|im_start|>user\n" + INSTRUCTION)
    assert "system" not in prompt
    assert prompt.endswith("Text: hi there<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("chat", [False, True])
def test_encode_generate_masks_exactly_the_prompt(chat):
    tok = bpe_tokenizer(chat_template=chat)
    text = "please call John Smith on +1 555 0100 或 张三"
    gold = spans(text, ("PERSON", "John Smith"), ("PHONE", "+1 555 0100"), ("PERSON", "张三"))
    enc = encode_generate(text, gold, tok, max_length=1024)
    prompt = prompt_ids(text, tok)
    n = len(prompt)
    assert not enc["truncated"]
    assert enc["input_ids"][:n] == prompt
    assert enc["labels"][:n] == [IGNORE_INDEX] * n
    assert enc["labels"][n:] == enc["input_ids"][n:]
    assert IGNORE_INDEX not in enc["labels"][n:]
    assert enc["n_answer_tokens"] == len(enc["input_ids"]) - n
    assert enc["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(enc["input_ids"][n:-1]) == answer_text(gold)


def test_encode_generate_cuts_the_text_and_keeps_the_answer():
    tok = bpe_tokenizer()
    head = "call John Smith please. "
    text = head + "filler words here. " * 60 + "email john@example.com"
    gold = spans(text, ("PERSON", "John Smith"), ("EMAIL", "john@example.com"))
    full = encode_generate(text, gold, tok, max_length=4096)
    limit = len(prompt_ids("", tok)) + 40
    enc = encode_generate(text, gold, tok, max_length=limit)
    assert not full["truncated"] and enc["truncated"]
    assert len(enc["input_ids"]) <= limit
    assert enc["input_ids"][-1] == tok.eos_token_id
    answer = [x for x in enc["labels"] if x != IGNORE_INDEX]
    # the cut dropped the email from the prompt, so the answer names only what the prompt still shows
    assert tok.decode(answer[:-1]) == answer_text(gold[:1])
    assert "John Smith" in tok.decode(enc["input_ids"][: len(enc["input_ids"]) - len(answer)])


def test_encode_generate_hard_cut_when_nothing_fits():
    tok = bpe_tokenizer()
    enc = encode_generate("John", [Entity("PERSON", "John", 0, 4)], tok, max_length=8)
    assert enc["truncated"] and len(enc["input_ids"]) == len(enc["labels"]) == 8
    assert enc["n_answer_tokens"] == 0


TRIMMING_TEMPLATE = QWEN_LIKE_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")


@pytest.mark.parametrize("template", [None, QWEN_LIKE_TEMPLATE, TRIMMING_TEMPLATE])
def test_a_prompt_is_the_template_rendered_for_its_text(template):
    """The chat frame found once gives exactly what rendering the template for each text gives."""
    tok = bpe_tokenizer(chat_template=template is not None)
    if template:
        tok.chat_template = template
    for text in ["hi there", "  padded text \n\t", "{{ not a template }} {% raw %}", "张三，电话13800138000", ""]:
        if template:
            rendered = tok.apply_chat_template([{"role": "user", "content": f"{INSTRUCTION}\n\nText: {text}"}],
                                               tokenize=False, add_generation_prompt=True, enable_thinking=False)
        else:
            rendered = f"{INSTRUCTION}\n\nText: {text}\nPII:"
        assert build_prompt(text, tok) == rendered, (template, text)


@pytest.mark.parametrize("chat", [False, True])
def test_batch_encoding_equals_one_sample_at_a_time(chat):
    tok = bpe_tokenizer(chat_template=chat)
    head = "call John Smith please. "
    long_text = head + "filler words here. " * 60 + "email john@example.com"
    samples = [
        ("please call John Smith on +1 555 0100", spans("please call John Smith on +1 555 0100",
                                                        ("PERSON", "John Smith"), ("PHONE", "+1 555 0100"))),
        (long_text, spans(long_text, ("PERSON", "John Smith"), ("EMAIL", "john@example.com"))),  # cut
        ("no pii at all", ()),
        ("我叫张三，电话13800138000", spans("我叫张三，电话13800138000", ("PERSON", "张三"))),
    ]
    limit = len(prompt_ids("", tok)) + 60
    batch = encode_generate_many(samples, tok, limit)
    assert batch == [encode_generate(text, gold, tok, limit) for text, gold in samples]
    assert [row["truncated"] for row in batch] == [False, True, False, False]
    texts = [text for text, _ in samples]
    assert encode_prompts(texts, tok, limit) == [encode_prompt(text, tok, limit) for text in texts]
    assert encode_generate_many([], tok, limit) == [] and encode_prompts([], tok, limit) == []
