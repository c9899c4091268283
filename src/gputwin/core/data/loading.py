"""Read a JSONL dataset file line by line, keeping every usable line and reporting the others;
write samples back in the canonical layout."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from .formats import LineProblem, parse_record, sample_to_record
from .records import BadLine, Dataset, DatasetError, LineWarning, Sample

_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_SHOWN_BAD_LINES = 3
_LAYOUT_HINT = (
    'one JSON object a line: {"text": ..., "entities": [{"type", "value", "start", "end"}]} '
    '(start/end optional), or ai4privacy\'s {"source_text": ..., "privacy_mask": [...]}; see docs/datasets.md'
)


def load_dataset(path: str | Path, *, limit: int | None = None) -> Dataset:
    """Read a dataset in any supported layout; stop after `limit` usable samples when given."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    file = Path(path).expanduser()
    samples: list[Sample] = []
    bad_lines: list[BadLine] = []
    warnings: list[LineWarning] = []
    layouts: Counter[str] = Counter()
    first_char = ""
    for number, line in _numbered_lines(file):
        if isinstance(line, BadLine):
            bad_lines.append(line)
            continue
        first_char = first_char or line.lstrip()[:1]
        try:
            parsed = parse_record(_decode_json(line), number)
        except LineProblem as exc:
            bad_lines.append(BadLine(number, str(exc)))
            continue
        samples.append(parsed.sample)
        layouts[parsed.layout] += 1
        warnings += [LineWarning(number, w) for w in parsed.warnings]
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        _raise_no_samples(file, bad_lines, first_char)
    layout = next(iter(layouts)) if len(layouts) == 1 else "mixed"
    return Dataset(file, samples, bad_lines, layout, warnings, dict(layouts))


def write_jsonl(samples: Iterable[Sample], path: str | Path) -> None:
    """Write samples in the canonical layout; readers never see a half-written file (tmp + rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as out:
            for sample in samples:
                out.write(json.dumps(sample_to_record(sample), ensure_ascii=False) + "\n")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _decode_json(line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise LineProblem(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise LineProblem("invalid JSON: nested too deeply") from None


def _read_bytes(file: Path) -> bytes:
    if file.is_dir():
        inside = sorted((p.name for p in file.glob("*.jsonl")), key=lambda name: (name != "train.jsonl", name))
        hint = f"name a file in it, e.g. {file / inside[0]}" if inside else "name a .jsonl file"
        raise DatasetError(f"{file}: is a folder, expected a JSONL file", hint)
    try:
        return file.read_bytes()
    except FileNotFoundError:
        raise DatasetError(
            f"{file}: no such dataset file",
            "check the path; `gputwin data synth --out DIR` makes a synthetic train.jsonl and test.jsonl",
        ) from None
    except OSError as exc:
        raise DatasetError(f"{file}: cannot read it ({exc.strerror})", "check that it is a readable file") from None


def _numbered_lines(file: Path) -> Iterator[tuple[int, str | BadLine]]:
    """Non-blank lines with their 1-based numbers; a line that is not valid text comes as a BadLine."""
    data = _read_bytes(file)
    if not data.strip():
        raise DatasetError(f"{file}: the file is empty", "expected " + _LAYOUT_HINT)
    if data.startswith(_UTF16_BOMS):  # saved as UTF-16 by some Windows editors: readable all the same
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{file}: starts as UTF-16 but cannot be decoded ({exc.reason})",
                               "save it as UTF-8") from None
        data = text.encode("utf-8")
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, BadLine(number, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
            continue
        line = line.lstrip("\ufeff")  # a byte-order mark, at the start of the file or of a concatenated one
        if line.strip():
            yield number, line


def _raise_no_samples(file: Path, bad_lines: list[BadLine], first_char: str) -> None:
    shown = "; ".join(f"line {b.line}: {b.reason}" for b in bad_lines[:_SHOWN_BAD_LINES])
    more = f" (and {len(bad_lines) - _SHOWN_BAD_LINES} more)" if len(bad_lines) > _SHOWN_BAD_LINES else ""
    if first_char == "[":
        hint = "this looks like one JSON array; write one object a line (JSONL), e.g. jq -c '.[]' FILE > FILE.jsonl"
    else:
        hint = "expected " + _LAYOUT_HINT
    raise DatasetError(f"{file}: no usable line among {len(bad_lines)}: {shown}{more}", hint)
