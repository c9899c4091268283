"""The fast engine's step for co-trained arms: every arm's samples packed in one row, one graph a shape.

As train/fast.py does for one arm: the samples back to back in one row (varlen attention, no padding
between them), the head only at label positions, fused RMSNorm and rotary kernels, and forward, backward,
each arm's clipping and AdamW update captured as one CUDA graph per shape and replayed (graphs.ShapeGraphs:
a set of arms' first steps eager until its first graph, then each new shape captured when met). What differs:
the row holds the samples of every arm stepping (arm after arm), each LoRA layer adds each arm's adapter to
that arm's tokens only (multilora.TokenRoute: every adapter of a layer in one multi-LoRA function,
kernels/multi_lora.py; the shape of a step does not depend on where one arm's samples end, so a graph is
keyed by the row's shape and the arms in it, as fast.py's by the shape alone),
and each arm's loss is the mean over its own label tokens. The sum of the arms' finite losses is
backpropagated; each arm is clipped and updated on its own, and an arm whose loss or gradient norm is not
finite updates nothing (its fused AdamW's found_inf), as in fast.py.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from ..kernels import lora_dropout_grad
from ..kernels.decoder import decoder_parts, fuse_rms_norms, run_decoder, varlen_backend
from ..kernels.fused_ce import cross_entropy_rows
from ..kernels.fused_mlp import fuse_mlps
from ..kernels.fused_rotary import fused_rotary, rotary_modules
from .batching import Example
from .fast import PendingStep, _output
from .graphs import Captured, ShapeGraphs
from .packing import LABEL_BUCKET, ROW_BUCKET, PackedBatch, pack
from .shapeplan import Buckets, Need, Shape, need_of
from .multilora import SharedModel


@dataclass(frozen=True)
class GroupBatch:
    """A packed row of several arms' samples, and which arm each token and label slot belongs to."""

    packed: PackedBatch
    token_arm: torch.Tensor  # [T] long: the index in `adapters` of each token's arm, -1 for padding
    label_arm: torch.Tensor  # [L] long: the same for each label slot
    adapters: tuple[str, ...]

    @property
    def shape_key(self) -> tuple[Any, ...]:
        return (self.adapters, *self.packed.shape_key)

    def to(self, device: torch.device, non_blocking: bool = False) -> GroupBatch:
        return replace(self, packed=self.packed.to(device, non_blocking=non_blocking),
                       token_arm=self.token_arm.to(device, non_blocking=non_blocking),
                       label_arm=self.label_arm.to(device, non_blocking=non_blocking))


def group_need(work: Sequence[tuple[str, Sequence[Example]]]) -> Need:
    """What a co-trained row must hold: every arm's samples; its family is the arms (their graph differs)."""
    return need_of([e for _, chosen in work for e in chosen], family=tuple(adapter for adapter, _ in work))


def group_buckets(need: Need) -> Shape:
    """The coarse shape of a co-trained row nobody planned: one arm's buckets times the arms. A sum of
    several arms' batches spreads over more lengths than one arm's: at one arm's buckets the seed's two arms
    met 14 shapes in 879 steps, at twice those 7, the padding staying the share one arm alone has (~6%)."""
    arms = max(1, len(need.family))
    return Buckets(ROW_BUCKET * arms, LABEL_BUCKET * arms)(need)


def pack_group(work: Sequence[tuple[str, Sequence[Example]]], *, pad_id: int, shape: Shape | None = None) -> GroupBatch:
    """work: (adapter, examples) of each arm stepping, packed in that order, to `shape` (a shapeplan.Shape;
    None: group_buckets')."""
    examples = [e for _, chosen in work for e in chosen]
    packed = pack(examples, pad_id=pad_id, shape=shape or group_buckets(group_need(work)))
    token_arm = torch.full((packed.length,), -1, dtype=torch.long)
    label_arm = torch.full((packed.label_index.shape[0],), -1, dtype=torch.long)
    token, slot = 0, 0
    for k, (_, chosen) in enumerate(work):
        for e in chosen:
            token_arm[token:token + e.n_tokens] = k
            label_arm[slot:slot + e.n_labels] = k
            token, slot = token + e.n_tokens, slot + e.n_labels
    return GroupBatch(packed, token_arm, label_arm, tuple(adapter for adapter, _ in work))


class GroupFastStep:
    """One step of several arms on a GroupBatch; members: adapter -> cotrain.Member (params, optimizer, clip)."""

    def __init__(self, shared: SharedModel, members: dict[str, Any], *, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> None:
        self.shared, self.members, self.device = shared, members, device
        on_cuda = device.type == "cuda"
        self.use_graphs = on_cuda and all(g.get("fused") for m in members.values()
                                          for g in m.optimizer.param_groups)
        self.autocast_dtype = autocast_dtype
        self.parts = decoder_parts(shared.model)
        self.fused_norms = fuse_rms_norms(shared.model) if on_cuda else 0
        self.rotary = rotary_modules(shared.model) if on_cuda else []
        self.fused_mlps = fuse_mlps(shared.model) if on_cuda else 0
        # the LoRA dropout's share of x's gradient in one kernel, where it matched torch's (before any capture)
        self.lora_dropout_kernel = on_cuda and lora_dropout_grad.check(device, autocast_dtype or torch.bfloat16)
        self.attention = varlen_backend(device)
        self.graphs = ShapeGraphs(device, eager_first="once", family=lambda key: key[0])  # key[0]: the arms
        self._lr = {adapter: torch.zeros((), dtype=torch.float32, device=device) for adapter in members}
        self._found_inf = {adapter: torch.zeros((), dtype=torch.float32, device=device) for adapter in members}
        self._state_token: tuple[int, ...] = ()

    def __call__(self, batch: GroupBatch, lrs: Sequence[float]) -> list[Any]:
        """Issue the step; one outcome per arm of the batch (PendingStep on CUDA, else the figures)."""
        for adapter, lr in zip(batch.adapters, lrs):
            self._set_lr(adapter, lr)
        if self.use_graphs:
            self._make_capturable()
        captured = self.graphs.get(batch.shape_key) if self.use_graphs else None
        if captured is None and (not self.use_graphs or self.graphs.first_meeting(batch.shape_key)):
            for adapter in batch.adapters:
                self.members[adapter].optimizer.zero_grad(set_to_none=True)
            losses, norms = self._body(batch.to(self.device, non_blocking=True))
            for adapter in batch.adapters:
                self.members[adapter].optimizer.zero_grad(set_to_none=True)
        else:
            captured = captured or self._capture(batch)
            sources = {"token_arm": batch.token_arm, "label_arm": batch.label_arm}
            sources |= {name: getattr(batch.packed, name)
                        for name in ("input_ids", "position_ids", "cu_seqlens", "label_index", "label_target")}
            for name, source in sources.items():
                target = getattr(captured.inputs, name, None)
                if target is None:
                    target = getattr(captured.inputs.packed, name)
                target.copy_(source.pin_memory(), non_blocking=True)
            captured.graph.replay()
            losses, norms = (out.clone() for out in captured.outputs)
        if losses.device.type == "cuda":
            return [PendingStep(losses[k], norms[k]) for k in range(len(batch.adapters))]
        return [self._figures(float(loss), float(norm)) for loss, norm in zip(losses.tolist(), norms.tolist())]

    @staticmethod
    def _figures(loss: float, norm: float) -> Any:
        try:
            return _output(loss, norm)
        except ArithmeticError as exc:  # NonFiniteLoss: that arm's outcome, not the group's
            return exc

    # -- the step itself

    def _losses(self, batch: GroupBatch) -> torch.Tensor:
        """Each arm's mean loss over its own label tokens: [arms]."""
        packed = batch.packed
        with self.shared.tokens(batch.token_arm, batch.adapters):
            hidden = run_decoder(self.parts, packed.input_ids, packed.position_ids, cu_seqlens=packed.cu_seqlens,
                                 max_len=packed.attention_bound)
        logits = self.parts.lm_head(hidden[0].index_select(0, packed.label_index))
        each = cross_entropy_rows(logits, packed.label_target)  # fp32, 0 where the slot is padding
        losses = []
        for k in range(len(batch.adapters)):
            mine = batch.label_arm == k
            losses.append(torch.where(mine, each, 0.0).sum() / mine.sum().clamp_min(1))
        # An arm whose adapter holds NaN/inf fails as it would alone: the multi-LoRA layers zero such weights
        # (so that they reach no other arm), which would otherwise hide them from its own loss.
        finite = torch.stack([torch.stack(torch._foreach_norm(self.members[adapter].params, math.inf)).max()
                              for adapter in batch.adapters]).isfinite()
        return torch.where(finite, torch.stack(losses), math.nan)

    def _body(self, batch: GroupBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """forward, backward, each arm's clip and update: the part a graph captures."""
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with autocast, fused_rotary(self.rotary):
            losses = self._losses(batch)
        torch.where(torch.isfinite(losses), losses, 0.0).sum().backward()
        losses = losses.detach()
        norms = []
        for k, adapter in enumerate(batch.adapters):
            member = self.members[adapter]
            max_norm = member.grad_clip if member.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(member.params, max_norm)
            found_inf = self._found_inf[adapter]
            found_inf.copy_((~(torch.isfinite(losses[k]) & torch.isfinite(norm))).float())
            if all(g.get("fused") for g in member.optimizer.param_groups):
                member.optimizer.found_inf = found_inf  # read by fused Adam: skips the update when 1
                try:
                    member.optimizer.step()
                finally:
                    del member.optimizer.found_inf
            elif not bool(found_inf):
                member.optimizer.step()
            norms.append(norm)
        return losses, torch.stack(norms)

    # -- graphs (as fast.FastStep's, for each arm's optimizer)

    def _set_lr(self, adapter: str, lr: float) -> None:
        for group in self.members[adapter].optimizer.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def _make_capturable(self) -> None:
        """Device lr tensors and capturable AdamW, again whenever a checkpoint load swapped them."""
        for adapter, member in self.members.items():
            for group in member.optimizer.param_groups:
                group["capturable"] = True
                if group["lr"] is not self._lr[adapter]:
                    self._lr[adapter].fill_(float(group["lr"]))
                    group["lr"] = self._lr[adapter]
        token = self._state_ids()
        if token != self._state_token and self._state_token:
            self.graphs.clear()  # they point at state tensors that are gone
        self._state_token = token

    def _state_ids(self) -> tuple[int, ...]:
        return tuple(id(v) for m in self.members.values() for p in (m.params[0], m.params[-1])
                     for v in m.optimizer.state.get(p, {}).values())

    def _capture(self, batch: GroupBatch) -> Captured:
        """Capture this shape. An eager step of the same arms came first (the set-up a capture must not meet:
        their optimizers' state, the adapters' layout constants); this shape itself may be new."""
        for adapter in batch.adapters:
            self.members[adapter].optimizer.zero_grad(set_to_none=True)
        captured = self.graphs.capture(batch.shape_key, batch.to(self.device), self._body)
        self._state_token = self._state_ids()
        return captured
