"""The dataset records every other part of gputwin reads: a text, its PII entities with character
spans, and what went wrong on the lines that could not be used."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

# The entity types the synthetic corpus produces and the ai4privacy labels map onto.
CANONICAL_TYPES: tuple[str, ...] = (
    "PERSON",
    "EMAIL",
    "PHONE",
    "ADDRESS",
    "NATIONAL_ID",
    "CREDIT_CARD",
    "IBAN",
    "DATE_OF_BIRTH",
    "IP_ADDRESS",
)


@dataclass(frozen=True)
class Entity:
    """One piece of PII: its type, its exact text, and where it sits in the sample's text."""

    type: str
    value: str
    start: int | None = None
    end: int | None = None


@dataclass(frozen=True)
class Sample:
    """A text and the PII in it; `line` is the 1-based line of the source file (0 when generated)."""

    text: str
    entities: tuple[Entity, ...]
    line: int = 0


@dataclass(frozen=True)
class BadLine:
    """A source line that was skipped, and why."""

    line: int
    reason: str


@dataclass(frozen=True)
class LineWarning:
    """A line that was kept but needed a guess (e.g. a value found more than once in its text)."""

    line: int
    reason: str


class DatasetError(UserError):
    """A dataset file that cannot be used at all: missing, unreadable, empty, or without one valid line."""


@dataclass
class Dataset:
    """The usable samples of one file, plus the skipped lines and the guesses made while reading it."""

    path: Path
    samples: list[Sample]
    bad_lines: list[BadLine]
    layout: str  # "canonical", "values", "ai4privacy" or "mixed"
    warnings: list[LineWarning] = field(default_factory=list)
    layout_counts: dict[str, int] = field(default_factory=dict)

    @property
    def entity_types(self) -> list[str]:
        """Sorted entity types seen in the samples."""
        return sorted(self.type_counts())

    def type_counts(self) -> Counter[str]:
        """Number of entities of each type."""
        return Counter(e.type for s in self.samples for e in s.entities)

    def summary(self, *, max_lines: int = 5) -> str:
        """A few lines for the terminal: counts, types, and the first bad lines and warnings."""
        counts = self.type_counts()
        no_pii = sum(1 for s in self.samples if not s.entities)
        layout = self.layout
        if self.layout == "mixed":
            layout += " (" + ", ".join(f"{k} {v}" for k, v in sorted(self.layout_counts.items())) + ")"
        lines = [
            f"{self.path}: {len(self.samples)} samples, layout {layout}",
            f"  {sum(counts.values())} entities in {len(counts)} types, {no_pii} samples without PII",
        ]
        if counts:
            lines.append("  " + ", ".join(f"{t} {n}" for t, n in sorted(counts.items())))
        for title, items in (("bad lines (skipped)", self.bad_lines), ("warnings", self.warnings)):
            if not items:
                continue
            lines.append(f"  {len(items)} {title}:")
            lines += [f"    line {b.line}: {b.reason}" for b in items[:max_lines]]
            if len(items) > max_lines:
                lines.append(f"    ... and {len(items) - max_lines} more")
        return "\n".join(lines)
