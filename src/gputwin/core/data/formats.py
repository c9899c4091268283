"""Turn one decoded JSON line of any supported layout into a Sample with exact character spans.

Layouts (see docs/datasets.md):
  canonical   {"text": ..., "entities": [{"type", "value", "start", "end"}]}
  values      the same without start/end: each value is looked up in the text
  ai4privacy  {"source_text": ..., "privacy_mask": [{"label", "start", "end", "value"}]} (list, JSON string,
              or {"[LABEL_1]": value} mapping); labels are mapped to the canonical types where obvious
A line that cannot be used raises LineProblem; the loader records it as a bad line and goes on.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any

from .records import Entity, Sample

CANONICAL, VALUES, AI4PRIVACY = "canonical", "values", "ai4privacy"

# ai4privacy (pii-masking-200k/300k/400k) labels -> canonical types. Unlisted labels are kept upper-cased.
AI4PRIVACY_LABELS: dict[str, str] = {
    **dict.fromkeys(
        ("GIVENNAME", "GIVENNAME1", "GIVENNAME2", "SURNAME", "FIRSTNAME", "LASTNAME", "MIDDLENAME",
         "FULLNAME", "NAME"),
        "PERSON",
    ),
    **dict.fromkeys(("EMAIL", "EMAILADDRESS"), "EMAIL"),
    **dict.fromkeys(("TELEPHONENUM", "PHONENUMBER", "PHONE", "TEL"), "PHONE"),
    **dict.fromkeys(("SOCIALNUM", "SSN", "IDCARDNUM", "IDCARD", "NATIONALID"), "NATIONAL_ID"),
    **dict.fromkeys(("CREDITCARDNUMBER", "CREDITCARDNUM", "CREDITCARD"), "CREDIT_CARD"),
    "IBAN": "IBAN",
    **dict.fromkeys(("DATEOFBIRTH", "DOB"), "DATE_OF_BIRTH"),
    **dict.fromkeys(("IP", "IPV4", "IPV6", "IPADDRESS"), "IP_ADDRESS"),
    **dict.fromkeys(
        ("STREET", "STREETADDRESS", "BUILDINGNUM", "BUILDINGNUMBER", "SECONDARYADDRESS", "CITY", "ZIPCODE",
         "POSTCODE", "STATE", "COUNTY"),
        "ADDRESS",
    ),
}

# Adjacent pieces of one name or one address (ai4privacy labels given name and surname, or street and
# city, separately) are joined into one entity when only these characters lie between them.
_JOINABLE_GAP = {"PERSON": re.compile(r"[ \t]*"), "ADDRESS": re.compile(r"[ \t,]*")}
_MASK_KEY = re.compile(r"^\[?([A-Za-z_]+?)(?:_\d+)?\]?$")  # "[FIRSTNAME_1]" -> "FIRSTNAME"


class LineProblem(ValueError):
    """Why one line cannot be used; its message becomes the bad line's reason."""


@dataclass(frozen=True)
class ParsedLine:
    """One usable line: the sample, the layout it was written in, and the guesses made for it."""

    sample: Sample
    layout: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class _RawEntity:
    index: int  # 1-based position in the line's entity list, for messages
    type: str
    value: str | None
    start: int | None
    end: int | None


def parse_record(obj: Any, line: int) -> ParsedLine:
    """Recognise the layout of one decoded JSON value and return its sample with exact spans."""
    if not isinstance(obj, dict):
        raise LineProblem(f"expected a JSON object, got {_json_kind(obj)}")
    if "source_text" in obj:
        text = _text(obj, "source_text")
        if "privacy_mask" not in obj:
            raise LineProblem("'privacy_mask' missing (ai4privacy layout; use [] for a text without PII)")
        raw = _ai4privacy_entities(obj["privacy_mask"])
        entities, warnings = _resolve(text, raw)
        return ParsedLine(Sample(text, _join_pieces(text, entities), line), AI4PRIVACY, warnings)
    if "text" in obj:
        text = _text(obj, "text")
        if "entities" not in obj:
            raise LineProblem("'entities' missing (use [] for a text without PII)")
        if not isinstance(obj["entities"], list):
            raise LineProblem(f"'entities' must be a list, got {_json_kind(obj['entities'])}")
        raw = [_canonical_entity(i, e) for i, e in enumerate(obj["entities"], 1)]
        entities, warnings = _resolve(text, raw)
        layout = CANONICAL if all(r.start is not None for r in raw) else VALUES
        return ParsedLine(Sample(text, entities, line), layout, warnings)
    keys = ", ".join(sorted(map(str, obj))[:6]) or "none"
    raise LineProblem(f"unknown layout (keys: {keys}); expected text + entities, or source_text + privacy_mask")


def sample_to_record(sample: Sample) -> dict[str, Any]:
    """The canonical JSON object of a sample (start/end left out when unknown)."""
    entities = []
    for e in sample.entities:
        item: dict[str, Any] = {"type": e.type, "value": e.value}
        if e.start is not None and e.end is not None:
            item["start"], item["end"] = e.start, e.end
        entities.append(item)
    return {"text": sample.text, "entities": entities}


# --- reading the fields -----------------------------------------------------------------------------------

def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _text(obj: dict[str, Any], key: str) -> str:
    text = obj[key]
    if not isinstance(text, str):
        raise LineProblem(f"'{key}' must be a string, got {_json_kind(text)}")
    if not text.strip():
        raise LineProblem(f"empty text ('{key}')")
    return text


def _int_or_none(item: dict[str, Any], key: str, where: str) -> int | None:
    value = item.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise LineProblem(f"{where}: '{key}' must be an integer, got {_json_kind(value)}")
    return value


def _raw_entity(index: int, item: Any, type_key: str, type_map: dict[str, str] | None) -> _RawEntity:
    where = f"entity {index}"
    if not isinstance(item, dict):
        raise LineProblem(f"{where}: expected an object, got {_json_kind(item)}")
    etype = item.get(type_key)
    if not isinstance(etype, str) or not etype.strip():
        raise LineProblem(f"{where}: '{type_key}' missing or not a non-empty string")
    etype = etype.strip().upper()
    if type_map is not None:
        etype = type_map.get(etype, etype)
    value = item.get("value")
    if value is not None and not isinstance(value, str):
        raise LineProblem(f"{where} ({etype}): 'value' must be a string, got {_json_kind(value)}")
    start, end = _int_or_none(item, "start", where), _int_or_none(item, "end", where)
    if (start is None) != (end is None):
        raise LineProblem(f"{where} ({etype}): has {'start' if end is None else 'end'} but not the other")
    if start is None and not value:
        raise LineProblem(f"{where} ({etype}): needs a non-empty 'value' or 'start' and 'end'")
    return _RawEntity(index, etype, value, start, end)


def _canonical_entity(index: int, item: Any) -> _RawEntity:
    return _raw_entity(index, item, "type", None)


def _ai4privacy_entities(mask: Any) -> list[_RawEntity]:
    if isinstance(mask, str):  # some dumps store the list as a JSON (or Python repr) string
        mask = _decode_mask_string(mask)
    if isinstance(mask, dict):  # {"[FIRSTNAME_1]": "Jean", ...}: values without spans
        items: list[Any] = []
        for key, value in mask.items():
            match = _MASK_KEY.match(str(key).strip())
            items.append({"label": match.group(1) if match else str(key), "value": value})
        mask = items
    if not isinstance(mask, list):
        raise LineProblem(f"'privacy_mask' must be a list, got {_json_kind(mask)}")
    return [_raw_entity(i, item, "label", AI4PRIVACY_LABELS) for i, item in enumerate(mask, 1)]


def _decode_mask_string(mask: str) -> Any:
    if not mask.strip():
        return []
    try:
        return json.loads(mask)
    except json.JSONDecodeError:
        pass  # not JSON; older dumps wrote Python reprs (single quotes)
    try:
        return ast.literal_eval(mask)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise LineProblem(f"'privacy_mask' is a string that is neither JSON nor a list literal ({exc})") from None


# --- spans ------------------------------------------------------------------------------------------------

def _overlaps(start: int, end: int, used: list[tuple[int, int]]) -> bool:
    return any(start < u_end and u_start < end for u_start, u_end in used)


def _at_word_edges(text: str, start: int, end: int) -> bool:
    before = text[start - 1] if start > 0 else " "
    after = text[end] if end < len(text) else " "
    return not (before.isascii() and before.isalnum()) and not (after.isascii() and after.isalnum())


def _resolve(text: str, raw: list[_RawEntity]) -> tuple[tuple[Entity, ...], tuple[str, ...]]:
    """Check given spans, find missing ones, and return entities sorted by position.

    Given spans are checked first and reserved; each value without a span then takes its first free
    occurrence (one that overlaps no entity placed before it), preferring occurrences at word edges.
    """
    placed: list[Entity] = []
    warnings: list[str] = []
    for r in raw:
        if r.start is None or r.end is None:
            continue
        if not 0 <= r.start < r.end <= len(text):
            raise LineProblem(
                f"entity {r.index} ({r.type}): span {r.start}..{r.end} out of range for a text of {len(text)} characters"
            )
        found = text[r.start:r.end]
        if r.value is not None and r.value != found:
            raise LineProblem(f"entity {r.index} ({r.type}): value {r.value!r} != text[{r.start}:{r.end}] {found!r}")
        placed.append(Entity(r.type, found, r.start, r.end))
    for r in raw:
        if r.start is not None or r.value is None:
            continue
        value = r.value
        hits = [m.start() for m in re.finditer(re.escape(value), text)]
        if not hits:
            raise LineProblem(f"entity {r.index} ({r.type}): value {value!r} not found in the text")
        used = [(e.start, e.end) for e in placed if e.start is not None and e.end is not None]
        free = [h for h in hits if not _overlaps(h, h + len(value), used)]
        free.sort(key=lambda h: not _at_word_edges(text, h, h + len(value)))  # stable: position order kept
        if free:
            start = free[0]
        elif any(e == Entity(r.type, value, h, h + len(value)) for e in placed for h in hits):
            warnings.append(f"entity {r.index} ({r.type}): value {value!r} listed twice; kept once")
            continue
        else:
            start = hits[0]
            warnings.append(f"entity {r.index} ({r.type}): value {value!r} overlaps another entity at {start}")
        if len(hits) > 1:
            warnings.append(
                f"entity {r.index} ({r.type}): value {value!r} occurs {len(hits)} times; took the one at {start}"
            )
        placed.append(Entity(r.type, value, start, start + len(value)))
    placed.sort(key=lambda e: (e.start, e.end))
    return tuple(placed), tuple(warnings)


def _join_pieces(text: str, entities: tuple[Entity, ...]) -> tuple[Entity, ...]:
    """Join neighbouring PERSON (or ADDRESS) pieces into one entity, as the canonical layout writes them."""
    joined: list[Entity] = []
    for e in entities:
        prev = joined[-1] if joined else None
        gap_rule = _JOINABLE_GAP.get(e.type)
        if (
            prev is not None and gap_rule is not None and prev.type == e.type
            and prev.end is not None and e.start is not None and e.end is not None
            and prev.end <= e.start and gap_rule.fullmatch(text, prev.end, e.start)
        ):
            joined[-1] = Entity(e.type, text[prev.start:e.end], prev.start, e.end)
        else:
            joined.append(e)
    return tuple(joined)
