"""A batch as one packed row, and the loss on it: what the fast step and the co-trained step feed the decoder.

- pack(): the batch's samples in one row, with per-sample position ids and segment starts (cu_seqlens) for a
  document-causal (varlen) attention, so no padding is computed and the result equals the padded batch;
  the row and the label slots padded to buckets, so shapes repeat and a captured CUDA graph is reused;
- answer_only_loss(): the decoder body once, then lm_head and cross-entropy only where labels count.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch

from ..core.encoding import IGNORE_INDEX
from ..kernels.decoder import DecoderParts, decoder_parts, run_decoder
from ..kernels.fused_ce import cross_entropy_rows
from .shapeplan import Shape, segment_bound

ROW_BUCKET = 128  # the trainer's row length multiple for steps it did not plan (pack's bucket)
LABEL_BUCKET = 256  # the same for label slots (pack's label_bucket): each distinct shape costs a graph capture
# Varlen attention launches work for max_len tokens of every segment and lets the surplus exit at once. The
# bound is the row's longest segment as a power of two, at least SEGMENT_FLOOR (shapeplan.segment_bound), so
# that rows of ordinary samples share one bound (and one graph). BOUND_BY_SEGMENT = False bounds it by the
# row's own length, as before (4-8x the seed's samples; kept for the benches' A/B).
BOUND_BY_SEGMENT = True


@dataclass(frozen=True)
class PackedBatch:
    """A batch as one row: samples back to back, then padding up to a bucket length.

    cu_seqlens holds segment starts (the samples, then the padding as its own segment), so attention
    never crosses a sample boundary. label_index/label_target list the positions whose next token is
    a label, padded with IGNORE_INDEX targets to a bucket too, so a shape repeats across batches.
    """

    input_ids: torch.Tensor     # [1, T] long
    position_ids: torch.Tensor  # [1, T] long, restarting at 0 in every segment
    cu_seqlens: torch.Tensor    # [n_samples + 2] int32
    label_index: torch.Tensor   # [L] long: row positions whose hidden state predicts a label
    label_target: torch.Tensor  # [L] long: the label there, IGNORE_INDEX in the padding
    n_tokens: int               # non-padding tokens
    n_label_tokens: int
    n_samples: int
    max_len: int = 0            # attention's bound on a segment's length (segment_bound); 0: the row's

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def shape_key(self) -> tuple[int, int, int, int]:
        """What a captured graph is specialised to: row length, label slots, samples, segment bound."""
        return self.length, self.label_index.shape[0], self.n_samples, self.attention_bound

    @property
    def attention_bound(self) -> int:
        """An upper bound on a segment's length, all varlen attention needs (a power of two)."""
        if self.max_len:
            return self.max_len
        return max(1024, 1 << (self.length - 1).bit_length())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        move = functools.partial(torch.Tensor.to, device=device, non_blocking=non_blocking)
        return replace(self, input_ids=move(self.input_ids), position_ids=move(self.position_ids),
                       cu_seqlens=move(self.cu_seqlens), label_index=move(self.label_index),
                       label_target=move(self.label_target))


def _field(sample: Any, name: str) -> list[int]:
    return list(sample[name] if isinstance(sample, Mapping) else getattr(sample, name))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack(samples: Sequence[Any], *, bucket: int = ROW_BUCKET, label_bucket: int = 64, pad_id: int = 0,
         shape: Shape | None = None) -> PackedBatch:
    """Samples (dicts or objects with input_ids and labels, IGNORE_INDEX where masked) as one packed row.

    The row is padded to a multiple of `bucket` with at least one padding token, so every batch of n
    samples has n + 1 segments; label slots are padded to a multiple of `label_bucket`. shape (a
    shapeplan.Shape that holds the samples): the row's length, label slots and attention bound instead.
    """
    if not samples:
        raise ValueError("pack() needs at least one sample")
    ids: list[int] = []
    positions: list[int] = []
    starts = [0]
    label_index: list[int] = []
    label_target: list[int] = []
    for sample in samples:
        sample_ids, labels = _field(sample, "input_ids"), _field(sample, "labels")
        if len(sample_ids) != len(labels) or not sample_ids:
            raise ValueError(f"a sample has {len(sample_ids)} input_ids and {len(labels)} labels")
        offset = len(ids)
        for t in range(len(labels) - 1):  # position t predicts token t + 1, inside the sample only
            if labels[t + 1] != IGNORE_INDEX:
                label_index.append(offset + t)
                label_target.append(labels[t + 1])
        ids += sample_ids
        positions += range(len(sample_ids))
        starts.append(len(ids))
    n_tokens = len(ids)
    length = shape.length if shape is not None else _round_up(n_tokens + 1, bucket)
    ids += [pad_id] * (length - n_tokens)
    positions += range(length - n_tokens)
    starts.append(length)
    n_labels = len(label_index)
    slots = shape.slots if shape is not None else max(label_bucket, _round_up(n_labels, label_bucket))
    label_index += [length - 1] * (slots - n_labels)
    label_target += [IGNORE_INDEX] * (slots - n_labels)
    longest = max(b - a for a, b in zip(starts, starts[1:]))  # the padding segment's included
    if shape is not None and (length <= n_tokens or slots < n_labels or shape.bound < longest):
        raise ValueError(f"{shape} does not hold these samples ({n_tokens} tokens, {n_labels} labels, "
                         f"a segment of {longest})")
    return PackedBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        cu_seqlens=torch.tensor(starts, dtype=torch.int32),
        label_index=torch.tensor(label_index, dtype=torch.long),
        label_target=torch.tensor(label_target, dtype=torch.long),
        n_tokens=n_tokens, n_label_tokens=n_labels, n_samples=len(samples),
        max_len=shape.bound if shape is not None else segment_bound(longest) if BOUND_BY_SEGMENT else 0,
    )


def answer_only_loss(model: Any, batch: PackedBatch, *, parts: DecoderParts | None = None) -> torch.Tensor:
    """Mean cross-entropy over label tokens, with lm_head applied at label positions only.

    Equals the causal LM loss of the padded batch (transformers' token mean over labels != -100).
    """
    parts = parts or decoder_parts(model)
    hidden = run_decoder(parts, batch.input_ids, batch.position_ids, cu_seqlens=batch.cu_seqlens,
                         max_len=batch.attention_bound)
    logits = parts.lm_head(hidden[0].index_select(0, batch.label_index))
    total = cross_entropy_rows(logits, batch.label_target).sum()  # fp32, as F.cross_entropy on logits.float()
    return total / (batch.label_target != IGNORE_INDEX).sum().clamp_min(1)
