"""Rotary position embeddings in three kernels a tensor, forward and backward.

HF's ``apply_rotary_pos_emb`` computes ``q * cos + rotate_half(q) * sin`` with ``rotate_half(x) =
cat(-x2, x1)``: a multiply, a negation, a concatenation, another multiply and an add for each of q and k,
on strided views, and autograd mirrors them backward; about 22 small kernels per layer per step. With
``sign = [-1] * half + [1] * half``, ``rotate_half(x) = roll(x, half) * sign``, so

    out = roll(x, half) * (sin * sign) + x * cos          (roll, multiply, fused multiply-add)
    dx  = roll(g * (sin * sign), half) + g * cos           (the shift by half is its own inverse)

``sin * sign`` is made once per forward (every layer gets the same ``sin``). fused_rotary swaps this in
for the model's own function while a forward runs, in the modeling modules whose function is checked,
on small inputs, to compute the same (rotary_modules); others keep theirs.

On a GPU with liger-kernel installed (`pip install gputwin[gpu]`), q and k go through its Triton RoPE
instead: both rotated in one kernel forward and one backward, in place on the [tokens, heads, dim] layout
the projections leave them in, where the roll above reads and writes each tensor three times over strided
views. It is used once checked on this device against RotaryFunction, forward and backward
(`triton_rope`); anything it does not cover (another layout, partial rotary) runs RotaryFunction.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import sys
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

__all__ = ["RotaryFunction", "apply_rotary", "attention_modeling_modules", "fused_rotary", "liger_rope_function",
           "rotary_modules", "triton_rope"]

FUNCTION_NAME = "apply_rotary_pos_emb"  # what HF's Llama-family modeling files call it


class RotaryFunction(torch.autograd.Function):
    """x * cos + roll(x, half) * signed_sin, with cos and signed_sin broadcastable to x."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        out = torch.roll(x, x.shape[-1] // 2, dims=-1)
        out.mul_(signed_sin).addcmul_(x, cos)
        ctx.save_for_backward(cos, signed_sin)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        cos, signed_sin = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        grad_x = torch.roll(grad * signed_sin, grad.shape[-1] // 2, dims=-1)
        return grad_x.addcmul_(grad, cos), None, None


_last_sin: list[Any] = [None, None]  # weakref to the last sin seen, and its signed copy


def _signed(sin: torch.Tensor) -> torch.Tensor:
    ref, signed = _last_sin
    if ref is not None and ref() is sin:
        return signed
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    _last_sin[:] = [weakref.ref(sin), signed]
    return signed


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1,
                 *, fallback: Callable[..., Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim) for rotary over the whole head dim, with
    cos and sin constants (HF makes them under no_grad); anything else goes to `fallback`."""
    dim = q.shape[-1]
    if (dim % 2 or cos.shape[-1] != dim or k.shape[-1] != dim or sin.shape != cos.shape
            or cos.requires_grad or sin.requires_grad):  # RotaryFunction gives cos and sin no gradient
        if fallback is None:
            raise ValueError("apply_rotary needs cos and sin over the whole (even) head dim")
        return fallback(q, k, cos, sin, unsqueeze_dim)
    if (q.is_cuda and unsqueeze_dim == 1 and q.dim() == k.dim() == 4 and cos.dim() == 3
            and q.shape[2] == k.shape[2] == cos.shape[1] and cos.shape[0] in (1, q.shape[0])):
        rope = triton_rope(q.device)
        if rope is not None:
            return rope(q, k, cos, sin)
    cos_b, sin_b = cos.unsqueeze(unsqueeze_dim), _signed(sin).unsqueeze(unsqueeze_dim)
    return RotaryFunction.apply(q, cos_b, sin_b), RotaryFunction.apply(k, cos_b, sin_b)


_TRITON_ROPE: dict[str, Any] = {}  # device -> the checked function, or None
TRITON = True  # False: the roll path everywhere (the benches' A/B)


def triton_rope(device: torch.device | str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """liger-kernel's RoPE ((q, k, cos, sin) -> (q, k), q [batch, heads, tokens, dim]) where it is installed
    and computes what RotaryFunction does on this device (checked once); else None."""
    key = str(torch.device(device))
    if not TRITON:
        return None
    if key not in _TRITON_ROPE:
        _TRITON_ROPE[key] = None
        function = liger_rope_function()
        if function is None:
            return None

        def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return function.apply(q, k, cos, sin)

        if _rope_matches(rope, key):
            _TRITON_ROPE[key] = rope
    return _TRITON_ROPE[key]


@functools.lru_cache(maxsize=1)
def liger_rope_function() -> Any | None:
    """liger-kernel's LigerRopeFunction, from its ops/rope.py alone (it imports torch and triton only).

    Importing it the usual way runs the package's __init__, which imports every one of its ops (7.8 s on the
    H100 machine, in a trainer's start-up); one file is what is needed. None when liger-kernel is not
    installed, has no such file, or it does not load (no Triton for this torch): the roll path runs."""
    try:
        package = importlib.util.find_spec("liger_kernel")  # finds it without running its __init__
        folders = list(package.submodule_search_locations or []) if package else []
        path = Path(folders[0], "ops", "rope.py") if folders else None
        if path is None or not path.is_file():
            return None
        name = "gputwin.kernels._liger_rope"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # Triton's jit reads the kernel's source through its module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module.LigerRopeFunction
    except Exception:  # noqa: BLE001 - not importable here: the roll path runs
        return None


def _rope_matches(rope: Callable[..., Any], device: str) -> bool:
    """Forward and backward of `rope` against RotaryFunction in fp32, on bf16 q and k laid out as the
    attention layers pass them ([batch, heads, tokens, dim] views of [batch, tokens, heads, dim]). rope
    rotates in place, so it gets copies."""
    try:
        with torch.inference_mode(False), torch.enable_grad():
            generator = torch.Generator(device=device).manual_seed(0)
            # Qwen3-0.6B's heads (16 and 8 of 128): Triton compiles per head layout, once per machine (its
            # cache), and the check's compilation then serves that model's kernel too
            leaves = [torch.randn(1, 96, heads, 128, device=device, generator=generator, dtype=torch.bfloat16)
                      .requires_grad_() for heads in (16, 8)]
            angles = torch.rand(1, 96, 64, device=device, generator=generator) * 6
            angles = torch.cat((angles, angles), dim=-1)
            cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
            upstream = [torch.randn(1, heads, 96, 128, device=device, generator=generator) for heads in (16, 8)]
            out = rope(*((x * 1).transpose(1, 2) for x in leaves), cos, sin)
            sum((o.float() * u).sum() for o, u in zip(out, upstream)).backward()
            grads = [x.grad.float() for x in leaves]
            ref_leaves = [x.detach().float().requires_grad_() for x in leaves]
            cos_b, sin_b = cos.float().unsqueeze(1), _signed(sin.float()).unsqueeze(1)
            ref = [RotaryFunction.apply(x.transpose(1, 2), cos_b, sin_b) for x in ref_leaves]
            sum((o * u).sum() for o, u in zip(ref, upstream)).backward()
            pairs = [(o.float(), r.detach()) for o, r in zip(out, ref)] + [(g, x.grad) for g, x in zip(grads, ref_leaves)]
            return all(a.shape == b.shape and float((a - b).norm() / b.norm().clamp_min(1e-6)) < 1e-2 for a, b in pairs)
    except Exception:  # noqa: BLE001 - a kernel that fails here is a kernel not to use
        return False


def _takes_q_k_cos_sin(function: Callable[..., Any]) -> bool:
    """Its first four parameters are q, k, cos, sin; or it takes *args, as transformers' hub-kernel
    wrapper does (an nn.Module around the same function, in transformers with `kernels` installed)."""
    try:
        params = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    if params and params[0].kind is inspect.Parameter.VAR_POSITIONAL:
        return True
    return [p.name for p in params[:4]] == ["q", "k", "cos", "sin"]


@functools.lru_cache(maxsize=None)
def _same_as_ours(function: Callable[..., Any]) -> bool:
    """Does this apply_rotary_pos_emb compute what apply_rotary does? (small random inputs, fp64, CPU)"""
    try:
        if not _takes_q_k_cos_sin(function):
            return False
        generator = torch.Generator().manual_seed(0)
        q, k = (torch.randn(2, n, 5, 8, generator=generator, dtype=torch.float64) for n in (4, 2))
        angles = torch.rand(2, 5, 4, generator=generator, dtype=torch.float64) * 6
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        theirs = tuple(function(q, k, cos, sin))
        ours = apply_rotary(q, k, cos, sin)
        return len(theirs) == 2 and all(torch.allclose(a, b, atol=1e-12) for a, b in zip(theirs, ours))
    except Exception:  # noqa: BLE001 - anything unexpected: keep the model's own function
        return False


def attention_modeling_modules(model: Any) -> list[Any]:
    """The modeling modules (Python modules) of the model's attention layers that have the function."""
    found: dict[str, Any] = {}
    for module in model.modules():
        if type(module).__name__.endswith("Attention"):
            python_module = sys.modules.get(type(module).__module__)
            function = getattr(python_module, FUNCTION_NAME, None)
            if python_module is not None and callable(function):
                found.setdefault(python_module.__name__, python_module)
    return list(found.values())


def rotary_modules(model: Any) -> list[Any]:
    """The modeling modules of the model's attention layers whose function is checked to compute ours."""
    return [m for m in attention_modeling_modules(model) if _same_as_ours(getattr(m, FUNCTION_NAME))]


@functools.lru_cache(maxsize=None)
def _replacement(original: Callable[..., Any]) -> Callable[..., Any]:
    """One replacement per original function, the same object every step."""

    def replacement(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args: Any,
                    **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        unsqueeze_dim = args[0] if len(args) == 1 and not kwargs else kwargs.get("unsqueeze_dim", 1)
        if len(args) > 1 or set(kwargs) - {"unsqueeze_dim"} or not isinstance(unsqueeze_dim, int):
            return original(q, k, cos, sin, *args, **kwargs)  # a call form the check did not cover
        return apply_rotary(q, k, cos, sin, unsqueeze_dim, fallback=original)

    return replacement


@contextlib.contextmanager
def fused_rotary(modules: list[Any]) -> Iterator[None]:
    """While the block runs, these modeling modules (rotary_modules(model)) use apply_rotary."""
    originals = [getattr(m, FUNCTION_NAME) for m in modules]
    for module, original in zip(modules, originals):
        setattr(module, FUNCTION_NAME, _replacement(original))
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            setattr(module, FUNCTION_NAME, original)
