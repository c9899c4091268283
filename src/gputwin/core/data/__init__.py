"""PII datasets: the records, a loader for the common JSONL layouts, and a synthetic corpus.

Faker is imported only when a corpus is generated, so reading a dataset stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .loading import load_dataset, write_jsonl
from .records import CANONICAL_TYPES, BadLine, Dataset, DatasetError, Entity, LineWarning, Sample

__all__ = [
    "CANONICAL_TYPES",
    "BadLine",
    "Dataset",
    "DatasetError",
    "Entity",
    "LineWarning",
    "Sample",
    "ensure_synth",
    "load_dataset",
    "write_jsonl",
]


def ensure_synth(
    train_path: str | Path,
    test_path: str | Path,
    *,
    train: int,
    test: int,
    seed: int,
    locales: Sequence[str],
) -> bool:
    """Make both synthetic files when either is missing; True when they were made.

    Both are rewritten together so a train file never pairs with a test file from another seed.
    """
    from .synth import ensure_synth as _ensure_synth

    return _ensure_synth(train_path, test_path, train=train, test=test, seed=seed, locales=locales)
