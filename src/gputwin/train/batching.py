"""Training data as token ids: tokenised once up front, visited in a seeded order per epoch, and
collated into batches.

The epoch order is a pure function of (seed, epoch), so a resumed run sees exactly the batches an
uninterrupted one would, given only the epoch and the position inside it. Collation is its own
function (right-padded batches now; a packed padding-free layout can sit beside it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..core.encoding import IGNORE_INDEX, encode_generate_many, encode_tag_many
from .shapeplan import label_count


@dataclass(frozen=True)
class Example:
    """One tokenised training sample; labels are IGNORE_INDEX where the loss must not look."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @functools.cached_property
    def n_labels(self) -> int:
        """Positions whose next token is a label: what a step's loss is taken over (counted once)."""
        return label_count(self.labels)


def encode_samples(samples: Sequence[Any], tokenizer: Any, *, task: str, max_length: int,
                   label_names: Sequence[str] | None = None) -> list[Example]:
    """Every sample through the task's encoder (gputwin.core.encoding), once, before training starts: all texts
    in one batched tokenizer call (a fast tokenizer spreads it over the cores)."""
    pairs = [(s.text, s.entities) for s in samples]
    if task == "generate":
        encoded = encode_generate_many(pairs, tokenizer, max_length)
    else:
        label2id = {name: i for i, name in enumerate(label_names or ())}
        encoded = encode_tag_many(pairs, tokenizer, label2id, max_length)
    return [Example(enc["input_ids"], enc["labels"], bool(enc["truncated"])) for enc in encoded]


def epoch_order(n_samples: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a permutation from its own generator, seeded by (seed, epoch)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919) % (2**63 - 1))
    return torch.randperm(n_samples, generator=generator).tolist()


class EpochBatches:
    """Batches in order, caching one epoch's permutation (drawn again only when the epoch changes)."""

    def __init__(self, n_samples: int, batch_size: int, seed: int) -> None:
        self.n_samples, self.batch_size, self.seed = n_samples, batch_size, seed
        self._epoch = -1
        self._order: list[int] = []

    def indices(self, epoch: int, index: int) -> list[int]:
        if epoch != self._epoch:
            self._epoch, self._order = epoch, epoch_order(self.n_samples, self.seed, epoch)
        return self._order[index * self.batch_size:(index + 1) * self.batch_size]


def collate_padded(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels tensors of the batch's longest length."""
    width = max(e.n_tokens for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = e.n_tokens
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_tokens(examples: Sequence[Example]) -> int:
    """Real (unpadded) tokens in a batch: what tokens/s counts."""
    return sum(e.n_tokens for e in examples)
