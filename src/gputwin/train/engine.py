"""One optimizer step, and the optimizer that takes it: the part a faster engine replaces.

The loop only calls ``engine.collate(examples)`` and ``engine.step(batch, lr).result()`` (the Engine
protocol below); an engine may return before the device has finished the step, and the loop reads the
result only after issuing the next step, so the device never waits for Python between steps. The plain engine pads batches and runs eager PyTorch; a faster one (packed batches, compiled
kernels) lives in its own module ``gputwin.train.fast`` exposing ``FastEngine`` with the plain
engine's constructor, and is used for ``train.engine = "fast"``. A FastEngine that cannot serve a
model (an encoder, a CPU run) raises EngineUnsupported from its constructor and the plain engine
takes over, saying so on stderr.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import sys
from dataclasses import dataclass
from typing import Any, ContextManager, Protocol, Sequence

import torch

from .batching import Example, collate_padded


class NonFiniteLoss(ArithmeticError):
    """The loss became NaN or infinite: training has diverged."""


class EngineUnsupported(Exception):
    """Raised by an engine's constructor for a model or device it cannot train; the message says why."""


@dataclass(frozen=True)
class StepOutput:
    loss: float  # mean over label tokens; the step raises NonFiniteLoss instead of updating on NaN/inf
    grad_norm: float  # before clipping

    def result(self) -> StepOutput:
        """Already known: an engine that waits for its step returns this."""
        return self


class Outcome(Protocol):
    """What ``Engine.step`` returns: the step's figures, possibly still being computed on the device."""

    def result(self) -> StepOutput:
        """The figures, waiting for the step if needed; raises NonFiniteLoss for a NaN/inf loss."""
        ...


class Engine(Protocol):
    name: str  # reported in the started event
    paths: dict[str, dict[str, Any]]  # the fused paths: {name: {"on": bool, "why": str}} (started event)

    def collate(self, examples: Sequence[Example]) -> Any: ...

    def step(self, batch: Any, lr: float) -> Outcome: ...


def build_optimizer(model: Any, *, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (fused kernels on CUDA)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


def autocast_for(device: torch.device, model_dtype: torch.dtype) -> ContextManager[Any]:
    """bf16 autocast on GPU unless the profile asked for fp32; plain fp32 on CPU."""
    if device.type == "cuda" and model_dtype != torch.float32:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class PlainEngine:
    """Padded batches, one forward/backward, gradient clipping, one AdamW update."""

    name = "plain"

    def __init__(self, model: Any, optimizer: torch.optim.Optimizer, *, device: torch.device,
                 model_dtype: torch.dtype, grad_clip: float, pad_id: int) -> None:
        self.model, self.optimizer, self.device = model, optimizer, device
        self.model_dtype, self.grad_clip, self.pad_id = model_dtype, grad_clip, pad_id
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.paths: dict[str, dict[str, Any]] = {}

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        return collate_padded(examples, self.pad_id)

    def step(self, batch: dict[str, torch.Tensor], lr: float) -> StepOutput:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        set_lr(self.optimizer, lr)
        with autocast_for(self.device, self.model_dtype):
            loss = self.model(**batch).loss  # transformers averages over label tokens (labels != -100)
        value = float(loss.detach())
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"loss is {value}")
        loss.backward()
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(loss=value, grad_norm=grad_norm)


def make_engine(name: str, model: Any, optimizer: torch.optim.Optimizer, *, device: torch.device,
                model_dtype: torch.dtype, grad_clip: float, pad_id: int, compile: bool | None = None) -> Engine:
    """The engine train.engine asks for; "fast" falls back to plain where no fast engine serves.
    compile: torch.compile the fast engine's decoder layers (None: its default)."""
    kwargs = {"device": device, "model_dtype": model_dtype, "grad_clip": grad_clip, "pad_id": pad_id}
    if name == "fast":
        fast = _fast_engine_class()
        if fast is not None:
            try:
                return fast(model, optimizer, **kwargs, **({} if compile is None else {"compile": compile}))
            except EngineUnsupported as exc:
                print(f"gputwin: the fast engine does not serve this run ({exc}); using the plain engine",
                      file=sys.stderr)
                plain = PlainEngine(model, optimizer, **kwargs)
                plain.paths = {"fast_engine": {"on": False, "why": str(exc)}}
                return plain
    return PlainEngine(model, optimizer, **kwargs)


def _fast_engine_class() -> type | None:
    try:
        module = importlib.import_module(f"{__package__}.fast")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.fast":
            raise
        return None
    return getattr(module, "FastEngine", None)
