"""Greedy decoding for validation: many times faster than `model.generate`, with the same tokens.

Why it is fast: prompts are prefilled packed (no padding, flash varlen attention on CUDA), keys and
values go to a static per-layer cache, and one decode step for the whole batch (embed, all layers,
lm_head, argmax, bookkeeping) is captured once as a CUDA graph and replayed, so a step costs its
kernels and not Python. Every row keeps its own positions, so there is no left padding to get wrong.
Why it is the same: the same modules (LoRA unmerged unless the caller merged it) and the same greedy
rule as transformers, including what happens after a row stops (nothing more is returned for it).
In fp32 the tokens match generate exactly; in bf16 up to the rounding noise that also makes generate
disagree with itself at another batch size (bench/RESULTS.md measures both).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..kernels.decoder import DecoderParts, attend_packed, decoder_parts, fuse_rms_norms, run_decoder, varlen_backend

StopFn = Callable[[list[int]], bool]


class StaticKVCache:
    """Per-layer key/value buffers [B, kv_heads, S, head_dim] for one batch, and the attention that uses them.

    prefill: tokens of a packed chunk are written to (rows, slots) and attend within their own prompt.
    decode: each row's token is written at its own position and attends to slots up to it.
    """

    def __init__(self, parts: DecoderParts, batch: int, length: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        config = parts.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (batch, config.num_key_value_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in parts.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in parts.layers]
        self.rows = torch.arange(batch, device=device)
        self.slot_index = torch.arange(length, device=device)
        # prefill: where each packed token goes; decode: each row's current position (set by the caller)
        self.prefill_rows: torch.Tensor | None = None
        self.prefill_slots: torch.Tensor | None = None
        self.cu_seqlens: torch.Tensor | None = None
        self.max_len = 0
        self.positions: torch.Tensor | None = None
        self.visible: torch.Tensor | None = None  # [B, 1, 1, S] decode mask

    def attend(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        layer = module.layer_idx
        if self.positions is None:  # prefill, packed: [1, H, T, D]
            self.keys[layer][self.prefill_rows, :, self.prefill_slots] = key[0].transpose(0, 1)
            self.values[layer][self.prefill_rows, :, self.prefill_slots] = value[0].transpose(0, 1)
            return attend_packed(query, key, value, self.cu_seqlens, self.max_len, scaling, attention_mask)
        batch, heads, _, head_dim = query.shape  # decode: [B, H, 1, D]
        self.keys[layer][self.rows, :, self.positions] = key[:, :, 0]
        self.values[layer][self.rows, :, self.positions] = value[:, :, 0]
        kv_heads = key.shape[1]
        # query heads that share a kv head become that head's "query length": no kv copy for GQA
        grouped = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
        out = F.scaled_dot_product_attention(grouped, self.keys[layer], self.values[layer], attn_mask=self.visible,
                                             scale=scaling)
        return out.reshape(batch, heads, 1, head_dim).transpose(1, 2)


class _BatchDecoder:
    """One batch's decode state and its step, as a replayable CUDA graph when on CUDA."""

    def __init__(self, parts: DecoderParts, batch: int, length: int, max_new_tokens: int,
                 eos_ids: Sequence[int], pad_id: int, dtype: torch.dtype, device: torch.device,
                 use_graph: bool) -> None:
        self.parts, self.pad_id = parts, pad_id
        self.cache = StaticKVCache(parts, batch, length, dtype, device)
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
        cache.positions = self.positions
        cache.visible = (cache.slot_index[None, :] <= self.positions[:, None])[:, None, None, :]
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
    """Prompts through the model packed in chunks of about chunk_tokens; the greedy next token of each."""
    first = torch.empty(len(prompts), dtype=torch.long, device=device)
    cache.positions = None  # prefill mode
    row = 0
    while row < len(prompts):
        end, tokens = row, 0
        while end < len(prompts) and (end == row or tokens + len(prompts[end]) <= chunk_tokens):
            tokens += len(prompts[end])
            end += 1
        chunk = prompts[row:end]
        lengths = torch.tensor([len(p) for p in chunk])
        ids = torch.tensor([t for p in chunk for t in p], dtype=torch.long, device=device)[None]
        positions = torch.cat([torch.arange(n) for n in lengths.tolist()]).to(device)
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
        cache.prefill_rows = torch.repeat_interleave(torch.arange(row, end), lengths).to(device)
        cache.prefill_slots, cache.cu_seqlens, cache.max_len = positions, cu, int(lengths.max())
        hidden = run_decoder(parts, ids, positions[None], cu_seqlens=cu, max_len=int(lengths.max()),
                             gputwin_cache=cache)
        last = hidden[0].index_select(0, cu[1:].long() - 1)
        first[row:end] = parts.lm_head(last).argmax(-1)
        row = end
    return first


def _ended_at(tokens: list[int], checked: int, eos: set[int], stop: StopFn | None) -> int | None:
    """Length of the shortest prefix past `checked` that ends the row (eos, or stop accepts it), if any."""
    for n in range(checked + 1, len(tokens) + 1):
        if tokens[n - 1] in eos or (stop is not None and stop(tokens[:n])):
            return n
    return None


def _auto_batch_size(parts: DecoderParts, n: int, length: int, dtype: torch.dtype, device: torch.device) -> int:
    """All prompts at once unless the cache would take more than a third of the free GPU memory."""
    if device.type != "cuda":
        return n
    config = parts.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_row = 2 * len(parts.layers) * config.num_key_value_heads * length * head_dim * dtype.itemsize
    per_row += 4 * config.vocab_size * dtype.itemsize  # logits and argmax temporaries
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(n, int(free / 3 // per_row)))


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
                    prefill_tokens: int = 16384, check_every: int = 8,
                    stats: dict[str, float] | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids), as transformers' generate would give it.

    Each result holds the generated tokens only, up to and including the first of eos_ids, or up to the
    first prefix for which stop(generated_ids) is true (checked after every token, like a StoppingCriteria),
    else max_new_tokens of them. Rows are decoded in length-sorted batches of batch_size (default: all at
    once, as memory allows); decoding ends early once every row has ended (looked at every check_every
    steps). The model's train/eval mode is restored afterwards. A `stats` dict, when given, receives the
    seconds spent in setup (cache, graph capture), prefill and decode (measuring them costs syncs).
    """
    if not prompts or max_new_tokens <= 0:
        return [[] for _ in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: every prompt needs at least one token")
    parts = decoder_parts(model)
    device = parts.lm_head.weight.device
    dtype = parts.body.embed_tokens.weight.dtype
    use_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
    if device.type == "cuda":
        fuse_rms_norms(model)  # the same maths in one kernel each (a trained model may have them already)
    if varlen_backend(device) != "varlen" or dtype not in (torch.bfloat16, torch.float16):
        prefill_tokens = min(prefill_tokens, 2048)  # the fallback attention builds a [T, T] mask per chunk
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    longest = len(prompts[order[0]]) + max_new_tokens
    size = batch_size or _auto_batch_size(parts, len(prompts), longest, dtype, device)
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
                length = -(-(len(batch[0]) + max_new_tokens) // 64) * 64  # shared by batches of similar length
                if decoder is None or decoder.out.shape[0] != len(rows) or decoder.cache.slot_index.numel() != length:
                    decoder = None  # free the previous batch's cache first
                    decoder = _BatchDecoder(parts, len(rows), length, max_new_tokens, eos_ids, pad_id, dtype, device,
                                            use_graphs)
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
