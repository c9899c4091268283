"""Greedy decoding for validation: many times faster than `model.generate`, with the same tokens.

Why it is fast: prompts are prefilled packed (no padding, flash varlen attention on CUDA), keys and
values go to a static per-layer cache, and one decode step for the whole batch (embed, all layers,
lm_head, argmax, bookkeeping) is captured once as a CUDA graph and replayed, so a step costs its
kernels and not Python. Every row keeps its own positions, so there is no left padding to get wrong.
The start that all prompts share (the instruction of a validation prompt) is computed once and kept once:
rows prefill and cache only what follows it, and each decode step reads it once for the whole batch.
On CUDA in bf16/fp16 a decode step reads of each row's cache only the slots it has filled, and a single
slot of a row that has ended (flash attention with per-row lengths), so rows that end early stop costing.
Why it is the same: the same modules (LoRA unmerged unless the caller merged it) and the same greedy
rule as transformers, including what happens after a row stops (nothing more is returned for it).
In fp32 the tokens match generate exactly; in bf16 up to the rounding noise that also makes generate
disagree with itself at another batch size (bench/RESULTS.md measures both).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ..kernels.decoder import (DecoderParts, SharedPrefix, attend_after_prefix, attend_packed, decoder_parts,
                               flash_decode, flash_decode_ok, fuse_rms_norms, run_decoder, varlen_backend)

StopFn = Callable[[list[int]], bool]
MIN_SHARED_PREFIX = 16  # a shorter common start of the prompts is prefilled and kept with each row
# The share of the device's free memory a batch's cache may take (decode's temporaries counted with it): the
# rest stays for prefill's activations (a chunk's, a layer at a time) and the process. Every extra batch costs a
# cache, a capture and a decode loop of its own. 500 prompts of Qwen3-0.6B whose own part and answer room need 448
# slots take 26 GB: more than a third of what a co-trained process leaves free on an 80 GB card, less than half.
CACHE_SHARE = 0.5


class DecoderKey(NamedTuple):
    """What a batch decoder's cache and captured decode step depend on."""

    model: int
    rows: int
    length: int
    prefix: int
    max_new_tokens: int
    eos: tuple[int, ...]
    pad: int
    dtype: torch.dtype
    device: str
    graphs: bool
    flash: bool
    weights: tuple[tuple[str, int], ...]  # every parameter's and buffer's storage, by name: what the graph reads


@dataclass
class Kept:
    """A batch decoder (its cache and its captured decode step) kept from one greedy_generate to the next, which
    uses it again when its batch has the same shapes and its model reads the same weight tensors. `merged`: the
    tensors the caller writes a merged adapter into each time (validate.merge's `into`), kept with the graph that
    reads them. `reused` counts the times it served."""

    key: DecoderKey | None = None
    decoder: _BatchDecoder | None = None
    merged: dict[int, torch.Tensor] = field(default_factory=dict)
    reused: int = 0
    missed: list[str] = field(default_factory=list)  # why the last call could not use it (what differed)

    def nbytes(self) -> int:
        """The device memory the kept decoder's cache holds (the next call may count it as free)."""
        if self.decoder is None:
            return 0
        cache = self.decoder.cache
        return sum(t.numel() * t.element_size() for t in [*cache.keys, *cache.values, *cache.prefix_keys,
                                                           *cache.prefix_values])


class StaticKVCache:
    """Per-layer key/value buffers for one batch, and the attention that uses them: [B, kv_heads, S, head_dim],
    or [B, S, kv_heads, head_dim] with flash (token-major, as flash attention reads a row's slots).

    With a shared prefix (the P tokens every prompt of the batch starts with, such as an instruction), its keys
    and values are kept once ([kv_heads, P', head_dim], P' = P in whole 64-slot blocks) and the row buffers hold
    what follows it: slot = position - P.
    prefix: the prefix alone, computed once. prefill: each row's own prompt tokens, packed, attending to the
    prefix and to their own prompt. decode: each row's token is written to its slot and attends to the prefix and
    to its slots up to that one. With flash, a decode step reads only those slots of each row (`used`), and
    one slot of a row that has ended; without, it reads all S slots of every row, masked.
    """

    def __init__(self, parts: DecoderParts, batch: int, length: int, dtype: torch.dtype,
                 device: torch.device, prefix: int = 0, flash: bool = False) -> None:
        config = parts.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = config.num_key_value_heads
        shape = (batch, length, kv_heads, head_dim) if flash else (batch, kv_heads, length, head_dim)
        self.flash = flash
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in parts.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in parts.layers]
        self.prefix = prefix
        # the prefix's buffers are padded to whole 64-slot blocks (masked), so every matrix in the decode's
        # attention stays aligned for the tensor-core kernels
        padded = -(-prefix // 64) * 64
        self.prefix_padding = torch.arange(padded, device=device) >= prefix  # [P'] the slots past the prefix
        shared = (kv_heads, padded, head_dim)
        self.prefix_keys = [torch.zeros(shared, dtype=dtype, device=device) for _ in parts.layers] if prefix else []
        self.prefix_values = [torch.zeros(shared, dtype=dtype, device=device) for _ in parts.layers] if prefix else []
        self.rows = torch.arange(batch, device=device)
        self.slot_index = torch.arange(length, device=device)
        self.cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device)  # flash: a query a row
        self.cu_k = self.cu_q * length  # flash: row b's slots start at b * S
        self.filling_prefix = False
        # prefill: where each packed token goes; decode: each row's current slot (set by the caller)
        self.prefill_rows: torch.Tensor | None = None
        self.prefill_slots: torch.Tensor | None = None
        self.cu_seqlens: torch.Tensor | None = None
        self.max_len = 0
        self.slots: torch.Tensor | None = None
        self.used: torch.Tensor | None = None  # [B] int32: flash's slots to read per row (decode)
        self.visible: torch.Tensor | None = None  # [B, 1, 1, S] decode mask
        self.hidden: torch.Tensor | None = None  # [B, 1, 1, S + P'] masked scores, where a prefix is kept

    def _store(self, layer: int, rows: torch.Tensor, slots: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor) -> None:
        """key/value [N, kv_heads, D] into (rows[n], slots[n]) of the layer's buffers."""
        at = (rows, slots) if self.flash else (rows, slice(None), slots)
        self.keys[layer][at] = key
        self.values[layer][at] = value

    def attend(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        layer = module.layer_idx
        if self.filling_prefix:  # the prefix alone: [1, H, P, D]
            self.prefix_keys[layer][:, :self.prefix] = key[0]
            self.prefix_values[layer][:, :self.prefix] = value[0]
            return attend_packed(query, key, value, self.cu_seqlens, self.max_len, scaling, attention_mask)
        if self.slots is None:  # prefill, packed: [1, H, T, D]
            self._store(layer, self.prefill_rows, self.prefill_slots, key[0].transpose(0, 1), value[0].transpose(0, 1))
            if self.prefix:
                return attend_after_prefix(query, key, value, self.prefix_keys[layer][:, :self.prefix],
                                           self.prefix_values[layer][:, :self.prefix], self.cu_seqlens, self.max_len,
                                           scaling, attention_mask)
            return attend_packed(query, key, value, self.cu_seqlens, self.max_len, scaling, attention_mask)
        batch, heads, _, head_dim = query.shape  # decode: [B, H, 1, D]
        self._store(layer, self.rows, self.slots, key[:, :, 0], value[:, :, 0])
        if self.flash:
            return flash_decode(query[:, :, 0], self.keys[layer], self.values[layer], self.used, self.cu_q,
                                self.cu_k, scaling, SharedPrefix(self.prefix_keys[layer], self.prefix_values[layer],
                                                                 self.prefix_padding) if self.prefix else None)[:, None]
        kv_heads = key.shape[1]
        # query heads that share a kv head become that head's "query length": no kv copy for GQA
        grouped = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
        if self.prefix:
            out = self._attend_with_prefix(layer, grouped, scaling)
        else:
            out = F.scaled_dot_product_attention(grouped, self.keys[layer], self.values[layer],
                                                 attn_mask=self.visible, scale=scaling)
        return out.reshape(batch, heads, 1, head_dim).transpose(1, 2)

    def _attend_with_prefix(self, layer: int, grouped: torch.Tensor, scaling: float) -> torch.Tensor:
        """One softmax over the row's own slots and the shared prefix, as transformers' eager attention computes
        it (scores in the model's dtype, softmax in fp32): the prefix is read once for all rows, not once a row."""
        batch, kv_heads, group, head_dim = grouped.shape
        own_slots = self.keys[layer].shape[2]
        by_head = grouped.transpose(0, 1).reshape(kv_heads, batch * group, head_dim)
        own = torch.matmul(grouped, self.keys[layer].transpose(2, 3))
        shared = torch.matmul(by_head, self.prefix_keys[layer].transpose(1, 2))
        scores = torch.cat([own, shared.view(kv_heads, batch, group, -1).transpose(0, 1)], -1).float()
        weights = scores.mul_(scaling).masked_fill_(self.hidden, float("-inf")).softmax(-1).to(grouped.dtype)
        out = torch.matmul(weights[..., :own_slots], self.values[layer]).float()
        from_prefix = torch.matmul(weights[..., own_slots:].transpose(0, 1).reshape(kv_heads, batch * group, -1),
                                   self.prefix_values[layer])
        out += from_prefix.view(kv_heads, batch, group, head_dim).transpose(0, 1)
        return out.to(grouped.dtype)


class _BatchDecoder:
    """One batch's decode state and its step, as a replayable CUDA graph when on CUDA."""

    def __init__(self, parts: DecoderParts, batch: int, length: int, max_new_tokens: int,
                 eos_ids: Sequence[int], pad_id: int, dtype: torch.dtype, device: torch.device,
                 use_graph: bool, prefix: int = 0, flash: bool = False) -> None:
        self.parts, self.pad_id = parts, pad_id
        self.cache = StaticKVCache(parts, batch, length, dtype, device, prefix, flash)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device) if eos_ids else None
        self.graph: Any = None
        if use_graph:
            self._capture(device)

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    def _step(self) -> None:
        cache = self.cache
        cache.slots = self.positions - cache.prefix
        if cache.flash:  # a row reads its slots up to the current one; a row that has ended, one slot
            cache.used = torch.where(self.finished, 1, cache.slots + 1).to(torch.int32)
        else:
            cache.visible = (cache.slot_index[None, :] <= cache.slots[:, None])[:, None, None, :]
        if cache.prefix and not cache.flash:
            padding = cache.prefix_padding.expand(cache.visible.shape[0], 1, 1, -1)
            cache.hidden = torch.cat([~cache.visible, padding], -1)
        hidden = run_decoder(self.parts, self.tokens[:, None], self.positions[:, None], gputwin_cache=cache)
        self._emit(self.parts.lm_head(hidden[:, 0]).argmax(-1))
        self.positions.add_(1)

    def _emit(self, best: torch.Tensor) -> None:
        """The greedy token of every row into the output column; rows already done get pad_id."""
        best = torch.where(self.finished, torch.full_like(best, self.pad_id), best)
        if self.eos is not None:
            self.finished |= torch.isin(best, self.eos)
        self.out.index_copy_(1, self.column, best[:, None])
        self.tokens.copy_(best)
        self.column.add_(1)

    def _capture(self, device: torch.device) -> None:
        current, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm-up (library handles, lazy inits); state is reset by start()
            for _ in range(2):
                self._step()
        current.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self._step()

    def start(self, first: torch.Tensor, lengths: torch.Tensor) -> None:
        """State after prefill: the first greedy token of each row, positions right after the prompts."""
        self.finished.zero_()
        self.out.fill_(self.pad_id)
        self.column.zero_()
        self.positions.copy_(lengths)
        self._emit(first)


def _prefill(parts: DecoderParts, cache: StaticKVCache, prompts: Sequence[Sequence[int]], chunk_tokens: int,
             device: torch.device) -> torch.Tensor:
    """Prompts through the model packed in chunks of about chunk_tokens (the shared prefix first, once); the
    greedy next token of each."""
    prefix = cache.prefix
    cache.slots = None  # prefill mode
    if prefix:
        cache.filling_prefix = True
        cache.cu_seqlens, cache.max_len = torch.tensor([0, prefix], dtype=torch.int32, device=device), prefix
        ids = torch.tensor(prompts[0][:prefix], dtype=torch.long, device=device)[None]
        try:
            run_decoder(parts, ids, torch.arange(prefix, device=device)[None],
                        cu_seqlens=cache.cu_seqlens, max_len=prefix, gputwin_cache=cache)
        finally:
            cache.filling_prefix = False
    first = torch.empty(len(prompts), dtype=torch.long, device=device)
    row = 0
    while row < len(prompts):
        end, tokens = row, 0
        while end < len(prompts) and (end == row or tokens + len(prompts[end]) - prefix <= chunk_tokens):
            tokens += len(prompts[end]) - prefix
            end += 1
        chunk = [p[prefix:] for p in prompts[row:end]]
        lengths = torch.tensor([len(p) for p in chunk])
        ids = torch.tensor([t for p in chunk for t in p], dtype=torch.long, device=device)[None]
        slots = torch.cat([torch.arange(n) for n in lengths.tolist()]).to(device)
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
        cache.prefill_rows = torch.repeat_interleave(torch.arange(row, end), lengths).to(device)
        cache.prefill_slots, cache.cu_seqlens, cache.max_len = slots, cu, int(lengths.max())
        hidden = run_decoder(parts, ids, (slots + prefix)[None], cu_seqlens=cu, max_len=int(lengths.max()),
                             gputwin_cache=cache)
        last = hidden[0].index_select(0, cu[1:].long() - 1)
        first[row:end] = parts.lm_head(last).argmax(-1)
        row = end
    return first


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """How many tokens every prompt starts with, leaving each prompt at least one of its own."""
    common = os.path.commonprefix([list(p) for p in prompts]) if len(prompts) > 1 else []
    return min(len(common), min(len(p) for p in prompts) - 1)


def _ended_at(tokens: list[int], checked: int, eos: set[int], stop: StopFn | None) -> int | None:
    """Length of the shortest prefix past `checked` that ends the row (eos, or stop accepts it), if any."""
    for n in range(checked + 1, len(tokens) + 1):
        if tokens[n - 1] in eos or (stop is not None and stop(tokens[:n])):
            return n
    return None


def _unlike(kept: DecoderKey, key: DecoderKey) -> list[str]:
    """What differs between a kept decoder's key and this batch's: field names, and for the weights the first
    tensors (by name) that are not the ones the kept graph reads."""
    missed = [name for name, a, b in zip(key._fields, kept, key) if a != b and name != "weights"]
    if kept.weights != key.weights:
        moved = [name for (name, a), (_, b) in zip(kept.weights, key.weights) if a != b]
        missed.append(f"weights ({', '.join(moved[:3]) or 'a different set'}{', ...' if len(moved) > 3 else ''})")
    return missed


def _auto_batch_size(parts: DecoderParts, n: int, length: int, dtype: torch.dtype, device: torch.device,
                     reclaimable: int = 0) -> int:
    """All prompts at once unless the cache would take more than CACHE_SHARE of the free GPU memory (reclaimable:
    bytes held by a kept decoder that this call would free or use again, counted as free)."""
    if device.type != "cuda":
        return n
    config = parts.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_row = 2 * len(parts.layers) * config.num_key_value_heads * length * head_dim * dtype.itemsize
    per_row += 4 * config.vocab_size * dtype.itemsize  # logits and argmax temporaries
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(n, int((free + reclaimable) * CACHE_SHARE // per_row)))


class _Clock:
    """Adds the seconds since the last lap to stats[name] (synchronising first); a no-op without stats."""

    def __init__(self, stats: dict[str, float] | None, device: torch.device) -> None:
        self.stats, self.device = stats, device
        self.last = self._now() if stats is not None else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        if self.stats is not None:
            now = self._now()
            self.stats[name] = self.stats.get(name, 0.0) + now - self.last
            self.last = now


def greedy_generate(model: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    eos_ids: Sequence[int] = (), pad_id: int = 0, stop: StopFn | None = None,
                    batch_size: int | None = None, cuda_graphs: bool | None = None,
                    prefill_tokens: int = 16384, check_every: int = 8, share_prefix: bool = True,
                    flash: bool | None = None, stats: dict[str, float] | None = None,
                    keep: Kept | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids), as transformers' generate would give it.

    Each result holds the generated tokens only, up to and including the first of eos_ids, or up to the
    first prefix for which stop(generated_ids) is true (checked after every token, like a StoppingCriteria),
    else max_new_tokens of them. Rows are decoded in length-sorted batches of batch_size (default: all at
    once, as memory allows); decoding ends early once every row has ended (looked at every check_every
    steps). A prefix that every prompt of a batch starts with (MIN_SHARED_PREFIX tokens or more) is computed
    once and attended to from one copy (share_prefix=False: every row keeps its own copy, as before).
    flash (default: on CUDA in bf16/fp16 where flash_decode checks out): each decode step reads only the cache
    slots each row has filled, and one slot of a row that has ended (False: every slot of every row, masked).
    The model's train/eval mode is restored afterwards. A `stats` dict, when given, receives the
    seconds spent in setup (cache, graph capture), prefill and decode (measuring them costs syncs), the batches
    decoded, their rows (`batch_rows`) and whether a kept decoder served (`decoder_kept`, 1 or 0).
    keep: the last batch's decoder stays there for the next call, which takes it instead of building one (a cache
    and a capture, 0.1-0.25 s on an H100) when its batch has the same shapes and its model the same weight tensors.
    """
    if not prompts or max_new_tokens <= 0:
        return [[] for _ in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: every prompt needs at least one token")
    parts = decoder_parts(model)
    device = parts.lm_head.weight.device
    dtype = parts.body.embed_tokens.weight.dtype
    use_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
    if flash is None:
        flash = dtype in (torch.bfloat16, torch.float16) and flash_decode_ok(device)
    if device.type == "cuda":
        fuse_rms_norms(model)  # the same maths in one kernel each (a trained model may have them already)
    if varlen_backend(device) != "varlen" or dtype not in (torch.bfloat16, torch.float16):
        prefill_tokens = min(prefill_tokens, 2048)  # the fallback attention builds a [T, T] mask per chunk
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))

    def prefix_of(batch: Sequence[Sequence[int]]) -> int:
        shared = shared_prefix(batch) if share_prefix else 0
        return shared if shared >= MIN_SHARED_PREFIX else 0

    longest = len(prompts[order[0]]) - prefix_of(prompts) + max_new_tokens  # a batch shares at least that
    size = batch_size or _auto_batch_size(parts, len(prompts), longest, dtype, device,
                                          keep.nbytes() if keep is not None else 0)
    # what a kept decoder's graph read: the same tensors (a merged adapter written into the same ones) or no reuse
    weights = (tuple((name, t.data_ptr()) for name, t in (*model.named_parameters(), *model.named_buffers()))
               if keep is not None else ())
    eos = set(eos_ids)
    results: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    decoder: _BatchDecoder | None = None
    clock = _Clock(stats, device)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), size):
                rows = order[start:start + size]
                batch = [list(prompts[i]) for i in rows]
                prefix = prefix_of(batch)
                length = -(-(len(batch[0]) - prefix + max_new_tokens) // 64) * 64  # shared by similar batches
                key = DecoderKey(id(model), len(rows), length, prefix, max_new_tokens, tuple(eos_ids), pad_id, dtype,
                                 str(device), use_graphs, flash, weights)
                if decoder is None and keep is not None and keep.key is not None:
                    keep.missed = _unlike(keep.key, key)
                    if not keep.missed:
                        decoder, keep.reused = keep.decoder, keep.reused + 1
                if stats is not None:
                    stats["batches"], stats["batch_rows"] = stats.get("batches", 0) + 1, size
                    stats["decoder_kept"] = float(decoder is not None and keep is not None and decoder is keep.decoder)
                if (decoder is None or decoder.out.shape[0] != len(rows) or decoder.cache.prefix != prefix
                        or decoder.cache.slot_index.numel() != length):
                    decoder = None  # free the previous batch's cache first
                    if keep is not None:
                        keep.key = keep.decoder = None
                    decoder = _BatchDecoder(parts, len(rows), length, max_new_tokens, eos_ids, pad_id, dtype, device,
                                            use_graphs, prefix, flash)
                if keep is not None:
                    keep.key, keep.decoder = key, decoder
                clock.lap("setup_s")
                first = _prefill(parts, decoder.cache, batch, prefill_tokens, device)
                decoder.start(first, torch.tensor([len(p) for p in batch], device=device))
                clock.lap("prefill_s")
                for row, tokens in zip(rows, _decode(decoder, max_new_tokens, eos, stop, check_every)):
                    results[row] = tokens
                clock.lap("decode_s")
    finally:
        model.train(was_training)
    return results


def _decode(decoder: _BatchDecoder, max_new_tokens: int, eos: set[int], stop: StopFn | None,
            check_every: int) -> list[list[int]]:
    """Run decode steps until max_new_tokens or every row has ended; the trimmed tokens of each row."""
    rows = decoder.out.shape[0]
    ends: dict[int, int] = {}  # row -> generated tokens it keeps
    checked = [0] * rows
    generated = 1  # the prefill's token
    while generated < max_new_tokens:
        decoder.step()
        generated += 1
        if generated % check_every and generated < max_new_tokens:
            continue
        if stop is not None:  # rows are looked at on the host: the device knows only eos
            tokens = decoder.out[:, :generated].tolist()
            newly = []
            for row in range(rows):
                if row not in ends and (n := _ended_at(tokens[row], checked[row], eos, stop)) is not None:
                    ends[row] = n
                    newly.append(row)
                checked[row] = generated
            if newly:
                decoder.finished[torch.tensor(newly, device=decoder.finished.device)] = True
            if len(ends) == rows:
                break
        elif eos and bool(decoder.finished.all()):
            break
    tokens = decoder.out[:, :generated].tolist()
    for row in range(rows):
        if row not in ends:
            ends[row] = _ended_at(tokens[row], checked[row], eos, stop) or generated
    return [tokens[row][:ends[row]] for row in range(rows)]
