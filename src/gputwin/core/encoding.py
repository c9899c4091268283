"""How a PII sample becomes model input and how model output becomes entities again, for both heads.

generate: a prompt holding the text, then the answer as a compact JSON list of {"type","value"} objects;
the loss sees only the answer. tag: BIO labels on the tokens of a fast tokenizer, aligned by character
offsets, so gold spans survive the round trip exactly (also for CJK text and word pieces).

Pure functions of (text, entities, tokenizer): no torch here, so the trainer can tokenise up front and the
validator can parse generated text without caring where it came from.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any, Iterable, Mapping, Sequence

from .data import CANONICAL_TYPES, Entity
from .errors import UserError

INSTRUCTION = (
    "Extract all PII (personally identifiable information) from the text. Types: "
    + ", ".join(CANONICAL_TYPES)
    + ". Answer with a JSON list of {\"type\", \"value\"} objects in the order they appear in the text, "
    "each value copied exactly from the text. Answer [] when there is no PII."
)

IGNORE_INDEX = -100  # label for tokens the loss must not see (prompt, special tokens)


# ---------------------------------------------------------------- generate head: text -> tokens


def _in_text_order(entities: Iterable[Entity]) -> list[Entity]:
    """Entities by start offset; those without a span keep their given order at the end."""
    listed = list(entities)
    with_span = sorted((e for e in listed if e.start is not None), key=lambda e: (e.start, e.end or 0))
    return with_span + [e for e in listed if e.start is None]


def answer_text(entities: Iterable[Entity]) -> str:
    """The target the model learns to write: compact JSON, text order, non-ASCII kept as is."""
    items = [{"type": e.type, "value": e.value} for e in _in_text_order(entities)]
    return json.dumps(items, ensure_ascii=False, separators=(",", ":"))


def _user_message(text: str) -> str:
    return f"{INSTRUCTION}\n\nText: {text}"


def _render_chat(tokenizer: Any, content: str) -> str:
    template = str(tokenizer.chat_template)
    extra = {"enable_thinking": False} if "enable_thinking" in template else {}
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True, **extra
    )


_FRAMES: dict[int, tuple[Any, tuple[str, str] | None]] = {}  # id(tokenizer) -> (tokenizer, its frame)
_MARK = "\ue000gputwin-text\ue001"  # a private-use marker no template or text holds
_PROBE = "  Probe: Ann Lee, ann@example.com\n  \t"  # spaces and newlines at both ends: a trimming template fails


def _chat_frame(tokenizer: Any) -> tuple[str, str] | None:
    """The rendered chat prompt before and after the sample text, found once per tokenizer.

    Rendering a chat template runs Jinja, which costs far more than tokenising; with the frame a prompt is
    two string joins. None when the template does not place the message verbatim (it trims or rewrites it):
    then every prompt is rendered.
    """
    cached = _FRAMES.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    rendered = _render_chat(tokenizer, _user_message(_MARK))
    frame = None
    if rendered.count(_MARK) == 1:
        before, after = rendered.split(_MARK)
        if _render_chat(tokenizer, _user_message(_PROBE)) == before + _PROBE + after:
            frame = (before, after)
    _FRAMES[id(tokenizer)] = (tokenizer, frame)
    return frame


def build_prompt(text: str, tokenizer: Any) -> str:
    """The prompt as a string: the model's own chat format when it has one (a user turn only), else plain."""
    if not getattr(tokenizer, "chat_template", None):
        return f"{INSTRUCTION}\n\nText: {text}\nPII:"
    frame = _chat_frame(tokenizer)
    if frame is None:
        return _render_chat(tokenizer, _user_message(text))
    return frame[0] + text + frame[1]


def _adds_special(tokenizer: Any) -> bool:
    """A chat template writes its own BOS, so no special tokens are added then."""
    return not getattr(tokenizer, "chat_template", None)


def prompt_ids(text: str, tokenizer: Any) -> list[int]:
    """Token ids of build_prompt(text)."""
    return list(tokenizer(build_prompt(text, tokenizer), add_special_tokens=_adds_special(tokenizer))["input_ids"])


def prompt_ids_many(texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """prompt_ids of many texts in one tokenizer call (a fast tokenizer spreads a batch over the cores)."""
    if not texts:
        return []
    prompts = [build_prompt(text, tokenizer) for text in texts]
    return [list(ids) for ids in tokenizer(prompts, add_special_tokens=_adds_special(tokenizer))["input_ids"]]


def eos_id(tokenizer: Any) -> int:
    """The id that ends an answer; a tokenizer without one cannot serve the generate task."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise UserError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos token: the generate task needs one "
            "to end the answer",
            hint="use a causal LM tokenizer with eos_token set (or the tag task)",
        )
    return int(eos)


def _answer_ids(entities: Sequence[Entity], tokenizer: Any) -> list[int]:
    ids = tokenizer(answer_text(entities), add_special_tokens=False)["input_ids"]
    return list(ids) + [eos_id(tokenizer)]


def _text_cut(text: str, tokenizer: Any, n_tokens: int) -> str:
    """The longest prefix of text that is about n_tokens tokens long (cut on a token boundary)."""
    if n_tokens <= 0:
        return ""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) <= n_tokens:
            return text
        return text[: offsets[n_tokens - 1][1]]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n_tokens else tokenizer.decode(ids[:n_tokens])


def _visible(entities: Sequence[Entity], kept: str) -> list[Entity]:
    """Entities still inside the kept text: the answer must not name what the model cannot see."""
    out = []
    for e in entities:
        if e.start is not None and e.end is not None:
            if e.end <= len(kept):
                out.append(e)
        elif e.value and e.value in kept:
            out.append(e)
    return out


def _cut_prompt(text: str, tokenizer: Any, budget: int) -> tuple[list[int], str]:
    """The prompt of the longest prefix of text that leaves the prompt near `budget` tokens, and that prefix."""
    text_budget = budget - len(prompt_ids("", tokenizer))
    kept, ids = "", prompt_ids("", tokenizer)
    for _ in range(4):  # re-tokenising the cut text can shift a token or two
        kept = _text_cut(text, tokenizer, text_budget)
        ids = prompt_ids(kept, tokenizer)
        if len(ids) <= budget or text_budget <= 0:
            break
        text_budget -= len(ids) - budget
    return ids, kept


def encode_prompt(text: str, tokenizer: Any, max_length: int) -> tuple[list[int], bool]:
    """Prompt ids for inference, at most max_length long (the text cut from its end), and whether it was cut."""
    return _fit_prompt(prompt_ids(text, tokenizer), text, tokenizer, max_length)


def encode_prompts(texts: Sequence[str], tokenizer: Any, max_length: int) -> list[tuple[list[int], bool]]:
    """encode_prompt of many texts, tokenised in one batch."""
    ids_of = prompt_ids_many(texts, tokenizer)
    return [_fit_prompt(ids, text, tokenizer, max_length) for ids, text in zip(ids_of, texts)]


def _fit_prompt(ids: list[int], text: str, tokenizer: Any, max_length: int) -> tuple[list[int], bool]:
    if len(ids) <= max_length:
        return ids, False
    ids, _ = _cut_prompt(text, tokenizer, max_length)
    return ids[:max_length], True


def encode_generate(text: str, entities: Sequence[Entity], tokenizer: Any, max_length: int) -> dict:
    """input_ids = prompt + answer + eos; labels = IGNORE_INDEX on the prompt, the answer ids elsewhere.

    Too long: the text inside the prompt is cut from its end (entities past the cut leave the answer, so the
    answer stays true to what the prompt shows); if even an empty text does not fit, the whole sequence is cut
    at max_length. Either way truncated is True.
    """
    entities = list(entities)
    return _generate_example(prompt_ids(text, tokenizer), _answer_ids(entities, tokenizer), text, entities,
                             tokenizer, max_length)


def encode_generate_many(samples: Sequence[tuple[str, Sequence[Entity]]], tokenizer: Any,
                         max_length: int) -> list[dict]:
    """encode_generate of many (text, entities) pairs, prompts and answers each tokenised in one batch."""
    if not samples:
        return []
    prompts = prompt_ids_many([text for text, _ in samples], tokenizer)
    answers = tokenizer([answer_text(entities) for _, entities in samples], add_special_tokens=False)["input_ids"]
    eos = eos_id(tokenizer)
    return [_generate_example(prompt, list(answer) + [eos], text, list(entities), tokenizer, max_length)
            for prompt, answer, (text, entities) in zip(prompts, answers, samples)]


def _generate_example(prompt: list[int], answer: list[int], text: str, entities: list[Entity], tokenizer: Any,
                      max_length: int) -> dict:
    truncated = len(prompt) + len(answer) > max_length
    if truncated:
        prompt, kept = _cut_prompt(text, tokenizer, max_length - len(answer))
        answer = _answer_ids(_visible(entities, kept), tokenizer)
    input_ids = (prompt + answer)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_length]
    n_answer = sum(1 for x in labels if x != IGNORE_INDEX)
    return {"input_ids": input_ids, "labels": labels, "n_answer_tokens": n_answer, "truncated": truncated}


# ---------------------------------------------------------------- tag head: text <-> BIO labels


def bio_label_names(entity_types: Iterable[str]) -> list[str]:
    """["O", "B-T1", "I-T1", "B-T2", ...] with types sorted: the same types give the same ids everywhere."""
    names = ["O"]
    for t in sorted(set(entity_types)):
        names += [f"B-{t}", f"I-{t}"]
    return names


def _entity_span(text: str, e: Entity) -> tuple[int, int] | None:
    if e.start is not None and e.end is not None:
        return e.start, e.end
    at = text.find(e.value) if e.value else -1
    return (at, at + len(e.value)) if at >= 0 else None


def _require_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} is not a fast tokenizer: the tag task needs "
            "character offsets",
            hint="use a model with a tokenizer.json (fast tokenizer), or the generate task",
        )


def _tag_call(tokenizer: Any, texts: str | list[str], max_length: int) -> Any:
    return tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True,
                     return_special_tokens_mask=True)


def encode_tag(text: str, entities: Sequence[Entity], tokenizer: Any, label2id: Mapping[str, int],
               max_length: int) -> dict:
    """Tokens of text with BIO labels: B on the first token that overlaps an entity span, I on the rest.

    Special tokens get IGNORE_INDEX. A type missing from label2id is labelled O (the label set comes from
    the training data; a test-only type cannot be learnt anyway).
    """
    _require_fast(tokenizer)
    enc = _tag_call(tokenizer, text, max_length)
    return _tag_example(text, entities, enc["input_ids"], enc["attention_mask"], enc["offset_mapping"],
                        enc["special_tokens_mask"], label2id)


def encode_tag_many(samples: Sequence[tuple[str, Sequence[Entity]]], tokenizer: Any, label2id: Mapping[str, int],
                    max_length: int) -> list[dict]:
    """encode_tag of many (text, entities) pairs, tokenised in one batch (the fast tokenizer's batched path,
    spread over the cores, instead of one call a sample)."""
    _require_fast(tokenizer)
    if not samples:
        return []
    enc = _tag_call(tokenizer, [text for text, _ in samples], max_length)
    return [_tag_example(text, entities, ids, mask, offsets, special, label2id)
            for (text, entities), ids, mask, offsets, special
            in zip(samples, enc["input_ids"], enc["attention_mask"], enc["offset_mapping"],
                   enc["special_tokens_mask"])]


def _tag_example(text: str, entities: Sequence[Entity], input_ids: Sequence[int], attention_mask: Sequence[int],
                 offset_mapping: Sequence[Sequence[int]], special: Sequence[int],
                 label2id: Mapping[str, int]) -> dict:
    offsets = [tuple(o) for o in offset_mapping]
    spans = sorted(
        (span[0], span[1], e.type) for e in entities if (span := _entity_span(text, e)) is not None
    )
    outside = label2id["O"]
    labels: list[int] = []
    seen: set[int] = set()  # entities whose B is given
    for (start, end), is_special in zip(offsets, special):
        if is_special or start == end:
            labels.append(IGNORE_INDEX)
            continue
        label = outside
        for k, (s, e, etype) in enumerate(spans):
            if start < e and end > s:
                prefix = "I" if k in seen else "B"
                seen.add(k)
                label = label2id.get(f"{prefix}-{etype}", outside)
                break
        labels.append(label)
    covered = max((e for (s, e), sp in zip(offsets, special) if not sp and e > s), default=0)
    return {
        "input_ids": list(input_ids),
        "attention_mask": list(attention_mask),
        "labels": labels,
        "offsets": offsets,
        "truncated": covered < len(text.rstrip()),
    }


def _label_of(id2label: Mapping[int, str] | Sequence[str], label_id: int) -> str:
    if isinstance(id2label, Mapping):
        return id2label.get(label_id, "O")
    return id2label[label_id] if 0 <= label_id < len(id2label) else "O"


def _mid_word(text: str, at: int) -> bool:
    """True when position at splits a word (a piece boundary, not a word boundary)."""
    return 0 < at < len(text) and text[at - 1].isalnum() and text[at].isalnum()


def decode_tag(text: str, offsets: Sequence[Sequence[int]], label_ids: Sequence[int],
               id2label: Mapping[int, str] | Sequence[str]) -> list[Entity]:
    """BIO labels back to entities with exact character spans.

    Lenient the way model output needs: an I- without a B- opens an entity, a B- on a piece inside the
    same word continues the entity, and whitespace around a span is stripped.
    """
    spans: list[list[Any]] = []  # [type, start, end]
    current: list[Any] | None = None
    for (start, end), label_id in zip(offsets, label_ids):
        if start == end or label_id == IGNORE_INDEX:
            continue
        label = _label_of(id2label, int(label_id))
        if label == "O" or "-" not in label:
            current = None
            continue
        prefix, etype = label.split("-", 1)
        continues = current is not None and current[0] == etype
        if prefix == "B" and not (continues and start <= current[2] and _mid_word(text, start)):
            continues = False
        if continues:
            current[2] = max(current[2], end)
        else:
            current = [etype, start, end]
            spans.append(current)
    out = []
    for etype, start, end in spans:
        value = text[start:end]
        lead = len(value) - len(value.lstrip())
        value = value.strip()
        if value:
            out.append(Entity(etype, value, start + lead, start + lead + len(value)))
    return out


# ---------------------------------------------------------------- generate head: text -> entities

_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)
_FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)(```|$)", re.DOTALL)
_TYPE_KEYS = ("type", "label", "entity_type", "category", "tag", "pii_type", "kind")
_VALUE_KEYS = ("value", "text", "span", "word", "string", "pii", "content")


def _clean(generated: str) -> str:
    text = _THINK.sub("", generated)
    fence = _FENCE.search(text)
    return fence.group(1) if fence else text


def _scan_closing(s: str, start: int) -> tuple[int, list[tuple[int, int]]]:
    """From the bracket at s[start]: the index of its closing bracket (-1 if cut off) and the
    (start, end) of every complete object at depth 1. Strings in either quote style are skipped."""
    depth, quote, escaped, obj_start = 0, "", False, -1
    objects: list[tuple[int, int]] = []
    for i in range(start, len(s)):
        ch = s[i]
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
            if ch == "{" and depth == 2:
                obj_start = i
        elif ch in "]}":
            depth -= 1
            if ch == "}" and depth == 1 and obj_start >= 0:
                objects.append((obj_start, i + 1))
                obj_start = -1
            if depth == 0:
                return i, objects
    return -1, objects


def _literal(chunk: str) -> Any:
    """JSON first; then a Python literal (single quotes, trailing commas) through ast, which runs no code."""
    try:
        return json.loads(chunk)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(chunk)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None


def _pick(item: Mapping[str, Any], keys: Sequence[str]) -> tuple[str | None, Any]:
    for key in keys:
        if key in item and item[key] not in (None, ""):
            return key, item[key]
    return None, None


def _to_entity(item: Any) -> Entity | None:
    if isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item):
        item = {"type": item[0], "value": item[1]}
    if not isinstance(item, Mapping):
        return None
    lowered = {str(k).strip().lower(): v for k, v in item.items()}
    type_key, etype = _pick(lowered, _TYPE_KEYS)
    value_key, value = _pick(lowered, _VALUE_KEYS)
    if etype is None and value_key is not None:
        type_key, etype = _pick(lowered, ("entity",))
    elif value is None:
        value_key, value = _pick(lowered, ("entity",))
    if not isinstance(etype, str) or isinstance(value, (dict, list, tuple)) or value is None:
        return None
    etype = re.sub(r"[\s-]+", "_", etype.strip()).upper()
    value = str(value).strip()
    return Entity(etype, value) if etype and value else None


def _entities(items: Any) -> list[Entity]:
    if isinstance(items, Mapping):  # {"entities": [...]} or one bare entity
        inner = next((v for v in items.values() if isinstance(v, list)), None)
        items = inner if inner is not None else [items]
    return [e for item in items if (e := _to_entity(item)) is not None]


def parse_answer(generated: str) -> tuple[list[Entity], bool]:
    """Entities named in generated text, and whether it could be read at all.

    Copes with code fences, prose before or after the list, a list cut off at the token limit (its complete
    objects are kept), single quotes and other Python literals, and "label"/"entity"/"text" keys.
    ok is False only when no list (or object) could be found.
    """
    text = _clean(generated)
    starts = [m.start() for m in re.finditer(r"\[", text)][:32]
    for at in starts:  # the first "[" that opens a readable list wins; prose may hold brackets too
        close, _ = _scan_closing(text, at)
        if close >= 0:
            parsed = _literal(text[at:close + 1])
            if isinstance(parsed, list) and (not parsed or any(isinstance(x, (dict, list, tuple)) for x in parsed)):
                return _entities(parsed), True
    for at in starts:  # a list cut off: keep its complete objects
        close, objects = _scan_closing(text, at)
        tail = text[objects[-1][1] if objects else at + 1:]
        if close < 0 and (objects or re.fullmatch(r"\s*,?\s*(\{.*)?", tail, re.DOTALL)):
            parsed = [p for a, b in objects if (p := _literal(text[a:b])) is not None]
            return _entities(parsed), True
    brace = text.find("{")  # a single object, or {"entities": [...]}
    if brace >= 0:
        closed = _brace_close(text, brace)
        if closed >= 0 and isinstance(parsed := _literal(text[brace:closed + 1]), dict):
            found = _entities(parsed)
            return found, bool(found) or any(isinstance(v, list) for v in parsed.values())
    return [], False


def _brace_close(text: str, at: int) -> int:
    return _scan_closing(text, at)[0]


def answer_closed(generated: str) -> bool:
    """True once the answer's JSON list is complete, so generation can stop there (cheap: one scan)."""
    text = _THINK.sub("", generated)
    at = text.find("[")
    while at >= 0:
        close, _ = _scan_closing(text, at)
        if close < 0:
            return False
        if isinstance(_literal(text[at:close + 1]), list):
            return True
        at = text.find("[", close + 1)
    return False
