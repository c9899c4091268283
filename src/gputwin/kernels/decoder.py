"""The packed decoder the fast engine trains and the fast validator decodes with: document-causal (varlen)
attention over samples packed in one row, fused RMSNorm, and one pass of the decoder body.

    varlen_backend(device)          which attention kernel runs (flash varlen, checked against masked SDPA)
    attend_packed(q, k, v, cu_seqlens, max_len)   document-causal attention of a packed row
    flash_decode(q, keys, values, used, ...)      a decode step over each row's used cache slots (and a prefix)
    fuse_rms_norms(model)           RMSNorm modules on one fused kernel, where they compute the same
    decoder_parts(model) -> DecoderParts          run_decoder(parts, input_ids, position_ids, ...)

It sits below both the trainer (gputwin.train.fast) and the validator (gputwin.validate.fastgen), which share it.
"""

from __future__ import annotations

import contextlib
import math
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from . import fused_norm
from .fastpaths import rms_norm_matches

ATTENTION_NAME = "gputwin_packed"  # registered with transformers' AttentionInterface below
CAUSAL_LM_HINT = "the fast path needs a decoder with embed_tokens, rotary_emb, layers and norm (Llama/Qwen family)"


# ---------------------------------------------------------------- document-causal attention


def _resolve_varlen(*, repeat_kv: bool, contiguous: bool) -> Callable[..., torch.Tensor] | None:
    """torch's flash varlen attention, called the way this torch version spells causal and GQA.

    Inputs are [T, H, D] views of the layers' [H, T, D] tensors. The flash kernel itself takes fewer K/V
    heads than query heads and strided inputs; `repeat_kv` and `contiguous` copy them first instead, for a
    torch whose wrapper does not pass them through (varlen_backend finds out which works here).
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal: dict[str, Any] = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    native_gqa, has_scale = "enable_gqa" in params, "scale" in params

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
             scale: float, cu_k: torch.Tensor | None = None, max_k: int | None = None) -> torch.Tensor:
        """Causal within each segment; with cu_k, segment i's queries are the last of its keys."""
        extra = dict(causal)
        if contiguous:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if q.shape[1] != k.shape[1]:
            if native_gqa:
                extra["enable_gqa"] = True
            elif repeat_kv:
                k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
        if has_scale:
            extra["scale"] = scale
        elif not math.isclose(scale, q.shape[-1] ** -0.5):
            raise ValueError(f"varlen_attn of this torch has no scale argument; the model wants {scale}")
        if cu_k is None:
            cu_k, max_k = cu, max_len
        return varlen_attn(q, k, v, cu, cu_k, max_len, max_k, **extra)

    return call


_VARLEN: dict[str, Callable[..., torch.Tensor] | None] = {}  # "cuda" -> checked varlen call, or None
# tried in this order: fewest copies first (K/V heads as they are, strided views), then with copies
_PREFIX_VARLEN: dict[str, bool] = {}  # device -> whether _prefix_varlen matches the masked path there
_VARLEN_WAYS = ({"repeat_kv": False, "contiguous": False}, {"repeat_kv": False, "contiguous": True},
                {"repeat_kv": True, "contiguous": True})


def varlen_backend(device: torch.device | str) -> str:
    """'varlen' where torch's flash varlen kernel runs here and matches masked SDPA (checked once,
    forward and backward), else 'sdpa-mask' (a block-diagonal causal mask; always correct, slower)."""
    if torch.device(device).type != "cuda":
        return "sdpa-mask"
    if "cuda" not in _VARLEN:
        _VARLEN["cuda"] = None
        for way in _VARLEN_WAYS:
            call = _resolve_varlen(**way)
            if call is not None and _varlen_matches_sdpa(call, device):
                _VARLEN["cuda"] = call
                break
    return "varlen" if _VARLEN["cuda"] is not None else "sdpa-mask"


def _varlen_matches_sdpa(call: Callable[..., torch.Tensor], device: torch.device | str) -> bool:
    # a backward runs here, also when the first question comes from inference code (a validator)
    with torch.inference_mode(False), torch.enable_grad():
        return _compare_with_sdpa(call, device)


def _compare_with_sdpa(call: Callable[..., torch.Tensor], device: torch.device | str) -> bool:
    """Forward and backward of `call` against masked SDPA, on inputs laid out as attend_packed passes them
    ([T, H, D] views of [H, T, D] tensors) with fewer K/V heads than query heads, and max_len a bound on the
    longest segment (192) below the row's length (512), as packing's attention_bound passes it."""
    generator = torch.Generator(device=device).manual_seed(0)
    cu = torch.tensor([0, 37, 200, 256, 448, 512], dtype=torch.int32, device=device)
    shapes = ((4, 512, 64), (2, 512, 64), (2, 512, 64))
    leaves = [torch.randn(s, device=device, dtype=torch.bfloat16, generator=generator).requires_grad_()
              for s in shapes]
    try:
        out = call(*(x.transpose(0, 1) for x in leaves), cu, 256, 0.125)  # 256: the bound
        out.float().square().sum().backward()
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False
    grads = [x.grad.float() for x in leaves]
    ref_leaves = [x.detach().clone().requires_grad_() for x in leaves]
    ref = masked_attention(*(x.unsqueeze(0) for x in ref_leaves), cu, 0.125)
    ref.float().square().sum().backward()
    pairs = [(out.detach(), ref[0].detach())] + [(g, x.grad.float()) for g, x in zip(grads, ref_leaves)]
    return all(a.shape == b.shape and float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)) < 2e-2
               for a, b in pairs)


def block_causal_mask(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """[1, 1, T, T] bool: a position sees earlier positions of its own segment only."""
    index = torch.arange(length, device=cu_seqlens.device)
    segment = torch.searchsorted(cu_seqlens[1:].long(), index, right=True)
    mask = (segment[:, None] == segment[None, :]) & (index[:, None] >= index[None, :])
    return mask[None, None]


def masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                     scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Packed attention through SDPA and a block-diagonal causal mask: [1, H, T, D] in, [1, T, H, D] out."""
    if mask is None:
        mask = block_causal_mask(cu_seqlens, query.shape[2])
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def attend_packed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_len: int, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Document-causal attention over one packed row ([1, H, T, D] in, [1, T, H, D] out)."""
    varlen = _VARLEN.get("cuda")
    if mask is None and varlen is not None and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
        return varlen(q, k, v, cu_seqlens, max_len, scale).unsqueeze(0)
    return masked_attention(query, key, value, cu_seqlens, scale, mask)


def attend_after_prefix(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix_key: torch.Tensor,
                        prefix_value: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, scale: float,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """attend_packed for documents that all follow one shared prefix whose keys and values ([kv, P, D]) are
    already known: each token sees the whole prefix and the earlier tokens of its own document."""
    if (mask is None and _VARLEN.get("cuda") is not None and query.is_cuda
            and query.dtype in (torch.bfloat16, torch.float16) and _prefix_varlen_ok(query.device)):
        return _prefix_varlen(query, key, value, prefix_key, prefix_value, cu_seqlens, max_len, scale)
    prefix = prefix_key.shape[1]
    own = mask if mask is not None else block_causal_mask(cu_seqlens, query.shape[2])
    seen = torch.cat([own.new_ones(own.shape[:-1] + (prefix,)), own], -1)
    return masked_attention(query, torch.cat([prefix_key[None], key], 2), torch.cat([prefix_value[None], value], 2),
                            cu_seqlens, scale, seen)


def _prefix_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix_key: torch.Tensor,
                   prefix_value: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, scale: float) -> torch.Tensor:
    """Flash varlen over each document's own copy of the prefix keys followed by its keys."""
    varlen = _VARLEN["cuda"]
    assert varlen is not None
    prefix, documents, tokens = prefix_key.shape[1], cu_seqlens.numel() - 1, query.shape[2]
    total = prefix * documents + tokens
    spans = cu_seqlens.diff().long() + prefix  # keys per document
    cu_k = F.pad(spans.cumsum(0), (1, 0)).to(torch.int32)
    place = torch.arange(total, device=query.device) - torch.repeat_interleave(cu_k[:-1].long(), spans,
                                                                               output_size=total)
    start = torch.repeat_interleave(cu_seqlens[:-1].long(), spans, output_size=total)
    index = torch.where(place < prefix, place, place + start)  # rows of [prefix ; packed documents]
    keys = torch.cat([prefix_key.transpose(0, 1), key[0].transpose(0, 1)]).index_select(0, index)
    values = torch.cat([prefix_value.transpose(0, 1), value[0].transpose(0, 1)]).index_select(0, index)
    return varlen(query[0].transpose(0, 1), keys, values, cu_seqlens, max_len, scale, cu_k,
                  max_len + prefix).unsqueeze(0)


def _prefix_varlen_ok(device: torch.device) -> bool:
    """Whether flash varlen with more keys than queries lines the queries up with the last keys (checked once,
    against the masked path)."""
    if str(device) not in _PREFIX_VARLEN:
        generator = torch.Generator(device=device).manual_seed(0)
        cu = torch.tensor([0, 5, 12, 40], dtype=torch.int32, device=device)
        q, k, v = (torch.randn(1, h, 40, 64, device=device, dtype=torch.bfloat16, generator=generator)
                   for h in (4, 2, 2))
        pk, pv = (torch.randn(2, 9, 64, device=device, dtype=torch.bfloat16, generator=generator) for _ in range(2))
        masked = attend_after_prefix(q, k, v, pk, pv, cu, 28, 0.125, block_causal_mask(cu, 40))
        try:
            fast = _prefix_varlen(q, k, v, pk, pv, cu, 28, 0.125)
            _PREFIX_VARLEN[str(device)] = fast.shape == masked.shape and bool(
                (fast.float() - masked.float()).norm() < 2e-2 * masked.float().norm())
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            _PREFIX_VARLEN[str(device)] = False
    return _PREFIX_VARLEN[str(device)]


# ---------------------------------------------------------------- one decode step over a row cache


_FLASH_DECODE: dict[str, bool] = {}  # device -> whether flash_decode matches the masked path there


@dataclass
class SharedPrefix:
    """Keys and values every row of a decode batch attends to, kept once: [kv, P', D] with P' >= length
    (the slots from `length` on are padding, hidden: `padding` is True there)."""
    keys: torch.Tensor
    values: torch.Tensor
    padding: torch.Tensor


def flash_decode(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, used: torch.Tensor,
                 cu_q: torch.Tensor, cu_k: torch.Tensor, scale: float,
                 prefix: SharedPrefix | None = None) -> torch.Tensor:
    """One decode step's attention: each row's query [B, H, D] over the first used[b] (int32, >= 1) slots of
    its own cache [B, S, kv, D], read by flash attention (only the used slots are read), and over a shared
    prefix when given. The two parts are joined through their log-sum-exps into one softmax over both.
    cu_q = arange(B + 1) and cu_k = cu_q * S (int32), made once by the caller. Returns [B, H, D]."""
    out, own_lse = _flash_own(query, keys, values, used, cu_q, cu_k, scale)
    if prefix is None:
        return out
    batch, heads, dim = query.shape
    kv = keys.shape[2]
    group = heads // kv
    by_head = query.view(batch, kv, group, dim).transpose(0, 1).reshape(kv, batch * group, dim)
    scores = torch.matmul(by_head, prefix.keys.transpose(1, 2)).float().mul_(scale)
    scores.masked_fill_(prefix.padding, float("-inf"))
    shared_lse = scores.logsumexp(-1, keepdim=True)  # [kv, B * group, 1]
    weights = scores.sub_(shared_lse).exp_().to(query.dtype)
    shared = torch.matmul(weights, prefix.values).view(kv, batch, group, dim).transpose(0, 1).reshape(batch, heads, dim)
    shared_lse = shared_lse.view(kv, batch, group).transpose(0, 1).reshape(batch, heads)
    total = torch.logaddexp(own_lse, shared_lse)
    joined = out.float() * (own_lse - total).exp_()[..., None]
    joined += shared.float() * (shared_lse - total).exp_()[..., None]
    return joined.to(query.dtype)


def _flash_own(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, used: torch.Tensor,
               cu_q: torch.Tensor, cu_k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash varlen over the rows' own slots: the output [B, H, D] and the log-sum-exp of the scaled scores
    [B, H] (fp32)."""
    batch, heads, dim = query.shape
    slots, kv = keys.shape[1], keys.shape[2]
    out, lse = torch.ops.aten._flash_attention_forward(
        query, keys.view(batch * slots, kv, dim), values.view(batch * slots, kv, dim), cu_q, cu_k, 1, slots, 0.0,
        False, False, scale=scale, seqused_k=used)[:2]
    return out, (lse.reshape(heads, batch).t() if lse.shape[0] == heads else lse.reshape(batch, heads))


def flash_decode_ok(device: torch.device) -> bool:
    """Whether flash_decode runs here and matches a masked softmax over the same slots (checked once): flash
    attention with per-row used slots, its log-sum-exp's layout in this torch, and the join with a prefix."""
    if str(device) in _FLASH_DECODE:
        return _FLASH_DECODE[str(device)]
    _FLASH_DECODE[str(device)] = False
    if torch.device(device).type != "cuda":
        return False
    _FLASH_DECODE[str(device)] = _flash_decode_matches(device)
    return _FLASH_DECODE[str(device)]


def _flash_decode_matches(device: torch.device | str) -> bool:
    """flash_decode against SDPA in fp32 over each row's prefix slots then its used slots (the heads of a group
    sharing their kv head), with and without a prefix, on rows that use 1 to all of their slots."""
    generator = torch.Generator(device=device).manual_seed(0)
    batch, heads, kv, slots, dim, length = 5, 4, 2, 64, 64, 9
    query = torch.randn(batch, heads, dim, device=device, dtype=torch.bfloat16, generator=generator)
    keys, values = (torch.randn(batch, slots, kv, dim, device=device, dtype=torch.bfloat16, generator=generator)
                    for _ in range(2))
    used = torch.tensor([1, 17, 64, 3, 40], dtype=torch.int32, device=device)
    shared_keys, shared_values = (torch.randn(kv, 64, dim, device=device, dtype=torch.bfloat16, generator=generator)
                                  for _ in range(2))
    prefix = SharedPrefix(shared_keys, shared_values, torch.arange(64, device=device) >= length)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
    slot = torch.arange(slots, device=device)
    visible = torch.cat([~prefix.padding.expand(batch, -1), slot[None] < used[:, None].long()], 1)[:, None, None]
    with_prefix = [torch.cat([x[None].expand(batch, -1, -1, -1), own.transpose(1, 2)], 2)
                   .repeat_interleave(heads // kv, 1) for x, own in ((shared_keys, keys), (shared_values, values))]
    alone = [own.transpose(1, 2).repeat_interleave(heads // kv, 1) for own in (keys, values)]
    try:
        for kept, (k, v, mask) in ((prefix, (*with_prefix, visible)), (None, (*alone, visible[..., 64:]))):
            want = F.scaled_dot_product_attention(query[:, :, None].float(), k.float(), v.float(), attn_mask=mask,
                                                  scale=0.125)[:, :, 0]
            got = flash_decode(query, keys, values, used, cu_q, cu_q * slots, 0.125, kept)
            if got.shape != want.shape or float((got.float() - want).norm()) > 2e-2 * float(want.norm()):
                return False
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False
    return True


def packed_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: packed rows (cu_seq_lens_q), or a cache's own attention
    (a `gputwin_cache` object, used by gputwin.validate.fastgen) when one is passed along."""
    cache = kwargs.get("gputwin_cache")
    if cache is not None:
        return cache.attend(module, query, key, value, attention_mask, scaling), None
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        raise ValueError(f"the {ATTENTION_NAME} attention needs cu_seq_lens_q (use gputwin.train.fast.run_decoder)")
    return attend_packed(query, key, value, cu_seqlens, kwargs["max_length_q"], scaling, attention_mask), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention)


_register_attention()


# ---------------------------------------------------------------- running the decoder


def _fused_rms_norm_forward(self: Any, hidden: torch.Tensor) -> torch.Tensor:
    """An HF RMSNorm's forward (fp32 statistics, scaled by the weight) as one fused kernel (fused_norm.rms_norm)."""
    if hidden.dtype != self.weight.dtype:
        return type(self).forward(self, hidden)
    with torch.autocast(hidden.device.type, enabled=False):  # keep the kernel in the input's dtype
        return fused_norm.rms_norm(hidden, self.weight, self.variance_epsilon)


def fuse_rms_norms(model: Any) -> int:
    """Give the model's RMSNorm modules a fused rms_norm (forward and backward), in place.

    HF's RMSNorm is six elementwise kernels forward and about twice that backward; a Qwen3 layer has
    four of them, so at batch 4 they are a good part of a step's kernel launches. The maths is the same
    (statistics in fp32); the output is rounded once instead of twice. Only classes checked to compute
    rms_norm (fastpaths.rms_norm_matches) are changed. On a GPU, where Triton loads and its kernels match
    torch's there (fused_norm.check, run here: before any capture), frozen norms take fused_norm's kernels.
    Returns how many modules were changed.
    """
    changed, widths = 0, {}
    for module in model.modules():
        weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
        if (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.nn.Parameter)
                and weight.dim() == 1 and isinstance(eps, float) and rms_norm_matches(type(module))):
            module.forward = _fused_rms_norm_forward.__get__(module)
            changed += 1
            if weight.is_cuda and not weight.requires_grad:
                widths.setdefault((weight.device, weight.dtype), set()).add(weight.shape[0])
    for (device, dtype), sizes in widths.items():
        fused_norm.check(device, sorted(sizes), dtype)
    return changed


@dataclass(frozen=True)
class DecoderParts:
    """The pieces of a causal LM (PEFT-wrapped or not) that the fast paths call directly."""

    body: Any                 # embed_tokens, rotary_emb, layers, norm
    lm_head: torch.nn.Module
    layers: Sequence[Any]     # body.layers, or torch.compile'd wrappers of them

    @property
    def config(self) -> Any:
        return self.body.config


def decoder_parts(model: Any) -> DecoderParts:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None or not all(hasattr(body, name) for name in ("embed_tokens", "rotary_emb", "layers", "norm")):
        raise TypeError(f"{type(base).__name__}: {CAUSAL_LM_HINT}")
    return DecoderParts(body=body, lm_head=head, layers=list(body.layers))


@contextlib.contextmanager
def attention_implementation(config: Any, name: str) -> Iterator[None]:
    """Route the layers' attention through `name` for the duration (no mask creation, no cache)."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def run_decoder(parts: DecoderParts, input_ids: torch.Tensor, position_ids: torch.Tensor, *,
                cu_seqlens: torch.Tensor | None = None, max_len: int | None = None, **extra: Any) -> torch.Tensor:
    """Final hidden states of the decoder body for packed rows (cu_seqlens) or a cache step (extra).

    The same embed -> layers -> norm as the model's own forward, minus mask building and caches.
    """
    body = parts.body
    hidden = body.embed_tokens(input_ids)
    position_embeddings = body.rotary_emb(hidden, position_ids)
    mask = None
    if cu_seqlens is not None:
        extra.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_len, max_length_k=max_len)
        if varlen_backend(hidden.device) != "varlen":  # build the fallback mask once, not in every layer
            mask = block_causal_mask(cu_seqlens, input_ids.shape[1])
    with attention_implementation(parts.config, ATTENTION_NAME):
        for layer in parts.layers:
            out = layer(hidden, attention_mask=mask, position_ids=position_ids,
                        position_embeddings=position_embeddings, use_cache=False, **extra)
            hidden = out[0] if isinstance(out, tuple) else out
    return body.norm(hidden)
