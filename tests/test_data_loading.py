"""Reading datasets: the three layouts, every kind of bad line, and awkward files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gputwin.faces.cli import main
from gputwin.core.data import BadLine, DatasetError, Entity, Sample, load_dataset, write_jsonl

TEXT = "Mail Ann Lee at ann@example.com"
GOOD = {"text": TEXT, "entities": [{"type": "PERSON", "value": "Ann Lee", "start": 5, "end": 12},
                                   {"type": "EMAIL", "value": "ann@example.com", "start": 16, "end": 31}]}


def write_lines(path: Path, *lines: object) -> Path:
    """Write objects as JSON lines; str and bytes are written as they are."""
    chunks = []
    for line in lines:
        if isinstance(line, bytes):
            chunks.append(line)
        elif isinstance(line, str):
            chunks.append(line.encode("utf-8"))
        else:
            chunks.append(json.dumps(line, ensure_ascii=False).encode("utf-8"))
    path.write_bytes(b"\n".join(chunks) + b"\n")
    return path


def test_canonical_layout(tmp_path: Path) -> None:
    ds = load_dataset(write_lines(tmp_path / "d.jsonl", GOOD, {"text": "nothing here", "entities": []}))
    assert ds.layout == "canonical"
    assert ds.samples[0] == Sample(TEXT, (Entity("PERSON", "Ann Lee", 5, 12), Entity("EMAIL", "ann@example.com", 16, 31)), 1)
    assert ds.samples[1].entities == () and ds.samples[1].line == 2
    assert ds.bad_lines == [] and ds.entity_types == ["EMAIL", "PERSON"]


def test_values_layout_finds_spans(tmp_path: Path) -> None:
    line = {"text": TEXT, "entities": [{"type": "email", "value": "ann@example.com"}, {"type": "PERSON", "value": "Ann Lee"}]}
    ds = load_dataset(write_lines(tmp_path / "d.jsonl", line))
    assert ds.layout == "values"
    # sorted by position, types upper-cased, spans found in the text
    assert ds.samples[0].entities == (Entity("PERSON", "Ann Lee", 5, 12), Entity("EMAIL", "ann@example.com", 16, 31))
    assert ds.warnings == []


def test_ambiguous_values_take_distinct_occurrences(tmp_path: Path) -> None:
    text = "Call 555-0100 or 555-0100 again"
    line = {"text": text, "entities": [{"type": "PHONE", "value": "555-0100"}, {"type": "PHONE", "value": "555-0100"}]}
    ds = load_dataset(write_lines(tmp_path / "d.jsonl", line))
    spans = [(e.start, e.end) for e in ds.samples[0].entities]
    assert spans == [(5, 13), (17, 25)]
    assert ds.bad_lines == []
    assert len(ds.warnings) == 2 and all("occurs 2 times" in w.reason and w.line == 1 for w in ds.warnings)


def test_value_search_prefers_whole_words(tmp_path: Path) -> None:
    line = {"text": "Annapolis office: ask Ann", "entities": [{"type": "PERSON", "value": "Ann"}]}
    ds = load_dataset(write_lines(tmp_path / "d.jsonl", line))
    assert ds.samples[0].entities == (Entity("PERSON", "Ann", 22, 25),)


def test_explicit_span_is_reserved_before_searching(tmp_path: Path) -> None:
    text = "Ann and Ann"
    line = {"text": text, "entities": [{"type": "PERSON", "value": "Ann"}, {"type": "PERSON", "value": "Ann", "start": 0, "end": 3}]}
    ds = load_dataset(write_lines(tmp_path / "d.jsonl", line))
    assert [(e.start, e.end) for e in ds.samples[0].entities] == [(0, 3), (8, 11)]
    assert ds.layout == "values"


def test_ai4privacy_layout_maps_labels_and_joins_name_pieces(tmp_path: Path) -> None:
    text = "I am Jean Dupont, IBAN FR7630006000011234567890189, tel 0612345678, ref X1"
    def span(value: str, label: str) -> dict[str, object]:
        start = text.index(value)
        return {"label": label, "start": start, "end": start + len(value), "value": value}
    line = {"source_text": text, "privacy_mask": [span("Jean", "GIVENNAME"), span("Dupont", "SURNAME"),
                                                 span("FR7630006000011234567890189", "IBAN"),
                                                 span("0612345678", "TELEPHONENUM"), span("X1", "USERNAME")]}
    ds = load_dataset(write_lines(tmp_path / "d.jsonl", line))
    assert ds.layout == "ai4privacy"
    assert [(e.type, e.value) for e in ds.samples[0].entities] == [
        ("PERSON", "Jean Dupont"), ("IBAN", "FR7630006000011234567890189"), ("PHONE", "0612345678"), ("USERNAME", "X1")]
    for e in ds.samples[0].entities:
        assert text[e.start:e.end] == e.value


@pytest.mark.parametrize(
    "mask",
    [
        json.dumps([{"label": "EMAIL", "start": 16, "end": 31, "value": "ann@example.com"}]),  # a JSON string
        str([{"label": "EMAIL", "start": 16, "end": 31, "value": "ann@example.com"}]),  # a Python repr string
        {"[EMAIL_1]": "ann@example.com"},  # mask -> value, no spans
    ],
    ids=["json-string", "repr-string", "mask-mapping"],
)
def test_ai4privacy_mask_variants(tmp_path: Path, mask: object) -> None:
    ds = load_dataset(write_lines(tmp_path / "d.jsonl", {"source_text": TEXT, "privacy_mask": mask}))
    assert ds.samples[0].entities == (Entity("EMAIL", "ann@example.com", 16, 31),)


BAD_LINES = {
    "invalid-json": ('{"text": "a", "entities": [', "invalid JSON"),
    "not-an-object": ([1, 2], "expected a JSON object, got a list"),
    "unknown-layout": ({"sentence": "hi", "labels": []}, "unknown layout"),
    "span-out-of-range": ({"text": "short", "entities": [{"type": "PERSON", "value": "x", "start": 3, "end": 40}]},
                          "out of range"),
    "start-after-end": ({"text": "Ann here", "entities": [{"type": "PERSON", "start": 3, "end": 0}]}, "out of range"),
    "value-mismatch": ({"text": "Ann Lee", "entities": [{"type": "PERSON", "value": "Bob", "start": 0, "end": 3}]},
                       "'Bob' != text[0:3] 'Ann'"),
    "value-not-found": ({"text": "Ann Lee", "entities": [{"type": "PERSON", "value": "Bob"}]}, "'Bob' not found"),
    "entities-missing": ({"text": "Ann"}, "'entities' missing"),
    "mask-missing": ({"source_text": "Ann"}, "'privacy_mask' missing"),
    "text-not-string": ({"text": 5, "entities": []}, "'text' must be a string"),
    "entities-not-list": ({"text": "Ann", "entities": "Ann"}, "'entities' must be a list"),
    "entity-not-object": ({"text": "Ann", "entities": ["Ann"]}, "entity 1: expected an object"),
    "type-missing": ({"text": "Ann", "entities": [{"value": "Ann"}]}, "'type' missing"),
    "start-not-int": ({"text": "Ann", "entities": [{"type": "PERSON", "start": "0", "end": 3}]}, "'start' must be an integer"),
    "start-without-end": ({"text": "Ann", "entities": [{"type": "PERSON", "value": "Ann", "start": 0}]}, "has start but not"),
    "no-value-no-span": ({"text": "Ann", "entities": [{"type": "PERSON"}]}, "needs a non-empty 'value'"),
    "empty-text": ({"text": "  ", "entities": []}, "empty text"),
    "mask-not-list": ({"source_text": "Ann", "privacy_mask": 3}, "'privacy_mask' must be a list"),
    "undecodable-bytes": (b'{"text": "caf\xe9", "entities": []}', "not UTF-8 text (byte 0xe9 at column 14)"),
}


@pytest.mark.parametrize("bad, reason", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_bad_line_is_skipped_and_reported(tmp_path: Path, bad: object, reason: str) -> None:
    ds = load_dataset(write_lines(tmp_path / "d.jsonl", GOOD, bad, GOOD))
    assert [s.line for s in ds.samples] == [1, 3]
    assert len(ds.bad_lines) == 1 and ds.bad_lines[0].line == 2
    assert reason in ds.bad_lines[0].reason
    assert "line 2:" in ds.summary()


def test_no_valid_line_names_file_and_bad_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "broken.jsonl", "not json", [1], {"a": 1}, "{")
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 1: invalid JSON" in message and "line 2: expected a JSON object" in message
    assert "(and 1 more)" in message and "hint:" in message


def test_json_array_file_gets_a_jsonl_hint(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, GOOD], indent=1))
    with pytest.raises(DatasetError, match="jq -c"):
        load_dataset(path)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["zero-bytes", "blank-lines-only"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match="empty.jsonl: the file is empty"):
        load_dataset(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nope.jsonl: no such dataset file") as info:
        load_dataset(tmp_path / "nope.jsonl")
    assert "gputwin data synth" in str(info.value)


def test_folder_instead_of_file(tmp_path: Path) -> None:
    write_lines(tmp_path / "a.jsonl", GOOD)
    write_lines(tmp_path / "train.jsonl", GOOD)
    with pytest.raises(DatasetError, match="is a folder") as info:
        load_dataset(tmp_path)
    assert str(tmp_path / "train.jsonl") in str(info.value)


def test_bom_blank_lines_and_crlf(tmp_path: Path) -> None:
    body = json.dumps(GOOD).encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + body + b"\r\n\r\n   \r\n" + body + b"\r\n")
    ds = load_dataset(path)
    assert [s.line for s in ds.samples] == [1, 4]
    assert ds.bad_lines == [] and ds.samples[0].text == TEXT


def test_utf16_file(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes((json.dumps(GOOD, ensure_ascii=False) + "\n").encode("utf-16"))
    assert load_dataset(path).samples[0].entities[0].value == "Ann Lee"


def test_limit_stops_after_usable_samples(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", GOOD, "bad", GOOD, GOOD, "bad")
    ds = load_dataset(path, limit=2)
    assert [s.line for s in ds.samples] == [1, 3]
    assert ds.bad_lines == [BadLine(2, ds.bad_lines[0].reason)]


def test_mixed_layouts(tmp_path: Path) -> None:
    ai4 = {"source_text": TEXT, "privacy_mask": [{"label": "EMAIL", "start": 16, "end": 31, "value": "ann@example.com"}]}
    ds = load_dataset(write_lines(tmp_path / "d.jsonl", GOOD, ai4, GOOD))
    assert ds.layout == "mixed" and ds.layout_counts == {"canonical": 2, "ai4privacy": 1}
    assert "ai4privacy 1" in ds.summary()


def test_write_jsonl_is_canonical_and_atomic(tmp_path: Path) -> None:
    sample = Sample("Ann 张伟", (Entity("PERSON", "张伟", 4, 6),))
    target = tmp_path / "sub" / "out.jsonl"
    write_jsonl([sample, sample], target)
    assert [p.name for p in target.parent.iterdir()] == ["out.jsonl"]  # no temporary file left behind
    first = target.read_text(encoding="utf-8").splitlines()[0]
    assert json.loads(first) == {"text": "Ann 张伟", "entities": [{"type": "PERSON", "value": "张伟", "start": 4, "end": 6}]}
    assert "张伟" in first  # written as UTF-8, not \\u escapes
    assert load_dataset(target).samples == [Sample(sample.text, sample.entities, 1), Sample(sample.text, sample.entities, 2)]


def test_cli_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_lines(tmp_path / "d.jsonl", GOOD, "oops")
    assert main(["data", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 samples, layout canonical" in out and "EMAIL 1, PERSON 1" in out and "line 2: invalid JSON" in out


def test_cli_inspect_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "inspect", str(tmp_path / "gone.jsonl")]) == 2
    assert "gone.jsonl: no such dataset file" in capsys.readouterr().err
