"""The synthetic PII corpus: Faker values poured into sentence templates, spans recorded while the
text is built (so they are exact), deterministic for a seed; and the `gputwin data` command."""

from __future__ import annotations

import argparse
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from string import Formatter
from typing import Iterator, Sequence

from ..errors import UserError
from . import templates_en, templates_zh
from .loading import load_dataset, write_jsonl
from .records import CANONICAL_TYPES, Entity, Sample
from .values import ValueMaker, language_of

NO_PII_SHARE = 0.12  # share of texts with look-alikes only
_TEMPLATE_SETS = {"en": templates_en, "zh": templates_zh}
_FIELD = re.compile(r"([A-Za-z_]+?)(\d*)")


@dataclass(frozen=True)
class _Field:
    kind: str  # a canonical type (labelled) or a look-alike kind (not labelled)
    slot: str  # "" or "2", "3": the same kind and slot is the same value within a text
    variant: str  # "", "first", "last", "street"


@dataclass(frozen=True)
class Rendered:
    """One generated text: the sample, its locale, and the look-alikes placed in it (for checking)."""

    locale: str
    sample: Sample
    lookalikes: tuple[Entity, ...]


def generate(n: int, *, locales: Sequence[str], seed: int) -> list[Sample]:
    """n synthetic samples; the same arguments give the same samples."""
    stream = iter_rendered(locales, str(seed))
    return [next(stream).sample for _ in range(n)]


def iter_rendered(locales: Sequence[str], stream_key: str) -> Iterator[Rendered]:
    """An endless deterministic stream of texts; each stream key gives a different one."""
    chosen = check_locales(locales)
    rng = random.Random(f"gputwin-synth/{stream_key}")
    makers = {locale: ValueMaker(locale, stream_key) for locale in chosen}
    while True:
        locale = rng.choice(chosen)
        pii, no_pii = _templates(language_of(locale))
        template = rng.choice(no_pii if rng.random() < NO_PII_SHARE else pii)
        yield render(template, makers[locale])


def make_splits(train: int, test: int, *, seed: int, locales: Sequence[str]) -> tuple[list[Rendered], list[Rendered]]:
    """Train and test from two separate streams; a test text that also occurs in train is skipped."""
    train_stream = iter_rendered(locales, f"{seed}/train")
    train_part = [next(train_stream) for _ in range(train)]
    seen = {r.sample.text for r in train_part}
    test_part: list[Rendered] = []
    for rendered in iter_rendered(locales, f"{seed}/test"):
        if len(test_part) >= test:
            break
        if rendered.sample.text not in seen:
            test_part.append(rendered)
    return train_part, test_part


def ensure_synth(
    train_path: str | Path, test_path: str | Path, *, train: int, test: int, seed: int, locales: Sequence[str]
) -> bool:
    """Make both files when either is missing (True when made); see gputwin.core.data.ensure_synth."""
    train_file, test_file = Path(train_path), Path(test_path)
    if train_file.is_file() and test_file.is_file():
        return False
    train_part, test_part = make_splits(train, test, seed=seed, locales=locales)
    write_jsonl((r.sample for r in train_part), train_file)
    write_jsonl((r.sample for r in test_part), test_file)
    return True


def check_locales(locales: Sequence[str]) -> list[str]:
    """The locales without repeats, each one Faker knows; a UserError names the first unknown one."""
    from faker.config import AVAILABLE_LOCALES

    chosen = list(dict.fromkeys(loc.strip() for loc in locales if loc.strip()))
    if not chosen:
        raise UserError("no Faker locale given", "e.g. en_US,zh_CN")
    for locale in chosen:
        if locale not in AVAILABLE_LOCALES:
            close = [a for a in AVAILABLE_LOCALES if a.split("_")[0] == locale.split("_")[0].lower()][:6]
            hint = f"Faker knows {', '.join(close)}" if close else "e.g. en_US, zh_CN, de_DE, fr_FR, ja_JP"
            raise UserError(f"unknown Faker locale {locale!r}", hint)
    return chosen


# --- templates ------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _templates(lang: str) -> tuple[tuple[tuple[str | _Field, ...], ...], tuple[tuple[str | _Field, ...], ...]]:
    """(PII templates, no-PII templates) of a language, compiled; English for languages without a set."""
    module = _TEMPLATE_SETS.get(lang, templates_en)
    return tuple(map(compile_template, module.PII_TEMPLATES)), tuple(map(compile_template, module.NO_PII_TEMPLATES))


def compile_template(template: str) -> tuple[str | _Field, ...]:
    """Split a template into literal text and fields; an unknown field is a bug in the template."""
    parts: list[str | _Field] = []
    lookalike_kinds = ValueMaker.DECOY_KINDS
    for literal, name, spec, _conversion in Formatter().parse(template):
        if literal:
            parts.append(literal)
        if name is None:
            continue
        match = _FIELD.fullmatch(name)
        if not match or (match[1] not in CANONICAL_TYPES and match[1] not in lookalike_kinds):
            raise ValueError(f"unknown field {{{name}}} in template {template!r}")
        if spec and spec not in ValueMaker.PII_VARIANTS.get(match[1], ()):
            raise ValueError(f"unknown variant {{{name}:{spec}}} in template {template!r}")
        parts.append(_Field(match[1], match[2], spec or ""))
    return tuple(parts)


def render(template: tuple[str | _Field, ...], maker: ValueMaker) -> Rendered:
    """Build the text piece by piece, recording the span of every value as it is appended."""
    pieces: list[str] = []
    entities: list[Entity] = []
    lookalikes: list[Entity] = []
    values: dict[tuple[str, str], dict[str, str]] = {}
    pos = 0
    for part in template:
        if isinstance(part, str):
            pieces.append(part)
            pos += len(part)
            continue
        key = (part.kind, part.slot)
        if key not in values:
            if part.kind in CANONICAL_TYPES:
                values[key] = maker.pii(part.kind, person=values.get(("PERSON", part.slot)))
            else:
                values[key] = {"": maker.decoy(part.kind)}
        value = values[key][part.variant]
        (entities if part.kind in CANONICAL_TYPES else lookalikes).append(Entity(part.kind, value, pos, pos + len(value)))
        pieces.append(value)
        pos += len(value)
    return Rendered(maker.locale, Sample("".join(pieces), tuple(entities)), tuple(lookalikes))


# --- `gputwin data` ---------------------------------------------------------------------------------------

def cmd_data(args: argparse.Namespace) -> int:
    """`gputwin data synth` writes a corpus; `gputwin data inspect` reports on a dataset file."""
    if args.data_command == "inspect":
        print(load_dataset(args.path).summary(max_lines=20))
        return 0
    for flag, count in (("--train", args.train), ("--test", args.test)):
        if count < 1:
            raise UserError(f"{flag} must be at least 1, got {count}", "give the number of samples to generate")
    locales = check_locales(args.locales.split(","))
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, expected a folder", "name a folder; train.jsonl and test.jsonl go in it")
    train_part, test_part = make_splits(args.train, args.test, seed=args.seed, locales=locales)
    for name, part in (("train.jsonl", train_part), ("test.jsonl", test_part)):
        write_jsonl((r.sample for r in part), out / name)
    print(_synth_summary(out, {"train": train_part, "test": test_part}, locales))
    return 0


def _synth_summary(out: Path, parts: dict[str, list[Rendered]], locales: list[str]) -> str:
    lines = []
    for name, part in parts.items():
        per_locale = Counter(r.locale for r in part)
        no_pii = sum(1 for r in part if not r.sample.entities)
        spread = ", ".join(f"{loc} {per_locale[loc]}" for loc in locales)
        lines.append(f"wrote {out / (name + '.jsonl')}: {len(part)} samples ({spread}), {no_pii} without PII")
    counts = {name: Counter(e.type for r in part for e in r.sample.entities) for name, part in parts.items()}
    width = max(map(len, CANONICAL_TYPES))
    lines.append(f"{'entities':<{width}}  " + "  ".join(f"{name:>6}" for name in parts))
    lines += [f"{t:<{width}}  " + "  ".join(f"{counts[name][t]:>6}" for name in parts) for t in CANONICAL_TYPES]
    return "\n".join(lines)
