"""A training step that does the same maths as the padded plain step in a fraction of the time.

(The packed batch and its loss live in gputwin.train.packing.)

Where the plain step spends its time at this size (a 0.6B decoder, 4 samples of ~250 tokens) is not
arithmetic but overhead: padding, logits over the whole vocabulary at every position, and thousands of
small kernel launches driven from Python. The levers here, each optional and measured in bench/:
- pack(): the batch's samples in one row, with per-sample position ids and a document-causal
  (varlen) attention, so no padding is computed and the result equals the padded batch;
- answer_only_loss(): the decoder body once, then lm_head and cross-entropy only where labels count;
- FastStep: one whole optimizer step (forward, backward, clipping, AdamW) captured as a CUDA graph per
  padded shape and replayed, optionally over torch.compile'd decoder layers.
FastEngine plugs this into the trainer loop (gputwin.train.engine's engine protocol).
Everything also runs on CPU, without graphs or compile, which is how the tests check the maths.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import torch

from ..kernels import fastpaths, lora_dropout_grad
from ..kernels.decoder import decoder_parts, fuse_rms_norms, varlen_backend
from ..kernels.fused_ce import triton_ce_ok
from ..kernels.fused_lora import AdapterCopies, fuse_lora
from ..kernels.fused_mlp import fuse_mlps
from ..kernels.fused_rotary import fused_rotary, rotary_modules
from .graphs import Captured, ShapeGraphs
from .packing import LABEL_BUCKET, ROW_BUCKET, PackedBatch, answer_only_loss, pack
from .shapeplan import Buckets, ShapePlan, need_of

# ---------------------------------------------------------------- the optimizer step


class StepResult(NamedTuple):
    loss: torch.Tensor       # 0-d, on the device: read it (a sync) only when it is logged
    grad_norm: torch.Tensor  # 0-d, before clipping
    n_tokens: int            # non-padding tokens of the batch


def make_optimizer(model: Any, lr: float, *, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, fused on CUDA (what FastStep's graphs need)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=params[0].is_cuda)


@contextlib.contextmanager
def preserved_state(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Run steps inside (warm-ups before a capture) and leave parameters and optimizer state as they were.

    State the steps created is zeroed in place, which is Adam's fresh state (step 0, zero moments); the
    tensors themselves stay, so a graph captured afterwards keeps pointing at them.
    """
    saved_params = [p.detach().clone() for p in params]
    saved_state = {p: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                   for p in params if p in optimizer.state}
    try:
        yield
    finally:
        with torch.no_grad():
            for p, saved in zip(params, saved_params):
                p.copy_(saved)
                p.grad = None
            for p in params:
                before = saved_state.get(p)
                for key, value in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value) and before:
                        value.copy_(before[key])
                    elif torch.is_tensor(value):
                        value.zero_()


class FastStep:
    """One optimizer step on a PackedBatch, with the semantics of the plain padded step.

    compile: torch.compile each decoder layer (dynamic shapes, compiled once for all layers).
    fused_norms: the model's RMSNorm modules run torch's fused kernel (fuse_rms_norms; on CUDA by default).
    fused_lora: the model's LoRA Linear layers run as one autograd function each (fused_lora.fuse_lora).
    fused_rope: rotary embeddings in three kernels a tensor during the step (fused_rotary).
    fused_mlp: gate and up in one GEMM and SiLU * up in one Triton kernel (fused_mlp.fuse_mlps).
    They default to on for CUDA without compile, which fuses such kernels itself.
    cuda_graphs: capture forward + backward + clipping + AdamW as one CUDA graph per batch shape
    (PackedBatch.shape_key) and replay it. eager_first (graphs.ShapeGraphs): "once", the default, runs
    steps eagerly until a shape is met a second time and captured; from then on a new shape is captured
    the first time it is met. True runs every shape's first step eagerly (always so with compile: a new
    shape may make the compiled layers compile again, which must happen outside a capture). prepare()
    captures shapes ahead, with warm-ups that leave the model untouched. The fused LoRA layers take their
    A and s*B in the compute dtype from one buffer filled at the start of each step (fused_lora.AdapterCopies).
    Both default to on for CUDA and off for CPU. A step whose loss or gradient norm is not finite
    updates nothing (fused AdamW's found_inf, as AMP does), so the caller can report and stop.
    """

    def __init__(self, model: Any, optimizer: torch.optim.Optimizer, *, compile: bool | None = None,
                 cuda_graphs: bool | None = None, grad_clip: float | None = 1.0,
                 autocast_dtype: torch.dtype | None | str = "auto",
                 loss_fn: Callable[[Any, PackedBatch], torch.Tensor] | None = None, warmup_iters: int = 1,
                 fused_norms: bool | None = None, fused_lora: bool | None = None,
                 fused_rope: bool | None = None, eager_first: bool | str = "once", lora_copies: bool = True,
                 fused_mlp: bool | None = None) -> None:
        self.model, self.optimizer = model, optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.device = self.params[0].device
        on_cuda = self.device.type == "cuda"
        self.use_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        self.use_compile = on_cuda if compile is None else compile
        self.max_norm = grad_clip if grad_clip and grad_clip > 0 else math.inf
        self.fused = all(group.get("fused") for group in optimizer.param_groups)
        if self.use_graphs and not (on_cuda and self.fused and isinstance(optimizer, torch.optim.Adam)):
            raise ValueError("cuda_graphs needs the model on CUDA and a fused Adam/AdamW (fused=True)")
        base_dtype = next((p.dtype for p in model.parameters() if not p.requires_grad), torch.float32)
        if autocast_dtype == "auto":
            autocast_dtype = base_dtype if on_cuda and base_dtype in (torch.bfloat16, torch.float16) else None
        self.autocast_dtype = autocast_dtype
        self.parts = decoder_parts(model)
        hand_fused = on_cuda and not self.use_compile  # compile fuses these itself
        want = {"rms_norm": on_cuda if fused_norms is None else fused_norms,
                "lora": hand_fused if fused_lora is None else fused_lora,
                "rotary": hand_fused if fused_rope is None else fused_rope,
                "mlp": hand_fused if fused_mlp is None else fused_mlp}
        self.fused_norms = fuse_rms_norms(model) if want["rms_norm"] else 0
        self.fused_lora = fuse_lora(model) if want["lora"] else 0
        # the fused layers' A and s*B, made once a step (lora_copies=False: each layer casts its own, for A/B benches)
        self.adapter_copies = AdapterCopies(model if lora_copies else torch.nn.Module())
        self._copy_dtype = autocast_dtype or base_dtype  # the dtype the layers compute in
        self.rotary_modules = rotary_modules(model) if want["rotary"] else []
        self.fused_mlps = fuse_mlps(model) if want["mlp"] else 0
        # the LoRA dropout's share of x's gradient in one kernel, where it matched torch's (before any capture)
        self.lora_dropout_kernel = bool(self.fused_lora) and lora_dropout_grad.check(self.device, self._copy_dtype)
        self._eager_layers = self.parts.layers
        if self.use_compile:
            self.parts = replace(self.parts, layers=_compiled_layers(self.parts.layers))
        self._custom_loss = loss_fn is not None
        self.loss_fn = loss_fn or functools.partial(answer_only_loss, parts=self.parts)
        self.warmup_iters = warmup_iters
        self.attention_backend = varlen_backend(self.device)
        self.paths = self._paths(want)
        # compiled layers may compile again for a new shape, which must not happen inside a capture: with
        # compile, every shape's first step runs eagerly
        self._eager_first = eager_first
        self.graphs = ShapeGraphs(self.device, eager_first=True if self.use_compile else eager_first)
        self._state_token: tuple[int, ...] = ()
        self._found_inf = torch.zeros((), dtype=torch.float32, device=self.device)
        self._lr: list[torch.Tensor] = []
        if self.use_graphs:
            self._make_capturable()

    def _paths(self, want: Mapping[str, bool]) -> dict[str, dict[str, Any]]:
        """Which fused paths engage, and why any is off (the started event's `fast_paths`)."""
        unwanted = fastpaths.status(False, "torch.compile fuses the layers itself" if self.use_compile
                                    else "the fused paths are for CUDA; off on this device")
        paths = {
            "rms_norm": fastpaths.norm_status(self.model, self.fused_norms) if want["rms_norm"] else unwanted,
            "lora": fastpaths.lora_status(self.fused_lora) if want["lora"] else unwanted,
            "rotary": fastpaths.rotary_status(self.model, self.rotary_modules) if want["rotary"] else unwanted,
        }
        if want["lora"] and paths["lora"]["on"] and not self.fused_lora:
            paths["lora"] = fastpaths.status(False, "no plain LoRA Linear layers (DoRA, LoRA bias or a non-Linear base)")
        varlen = self.attention_backend == "varlen"
        paths["attention"] = fastpaths.status(varlen, "torch's flash varlen kernel, checked against masked SDPA"
                                              if varlen else "SDPA with a block-causal mask (no checked varlen kernel here)")
        paths["mlp"] = (fastpaths.status(bool(self.fused_mlps), f"gate and up in one GEMM, SiLU * up in one Triton "
                                         f"kernel ({self.fused_mlps} layers), checked against the module's own")
                        if self.fused_mlps else fastpaths.status(False, "no checked Triton kernels here, or no plain "
                                                                "SiLU MLP (LoRA on the MLP)") if want["mlp"] else unwanted)
        ce = self.device.type == "cuda" and triton_ce_ok(self.device)
        paths["cross_entropy"] = fastpaths.status(ce, "two Triton kernels over bf16 logits, checked against torch's"
                                                  if ce else "torch's cross-entropy over fp32 logits (no checked "
                                                  "Triton kernels on this device)")
        if want["lora"]:
            paths["lora_dropout"] = fastpaths.status(self.lora_dropout_kernel, "x's gradient through the LoRA "
                                                     "dropout in one Triton kernel, checked against torch's"
                                                     if self.lora_dropout_kernel else "torch's GEMM and addcmul")
        paths["cuda_graphs"] = fastpaths.status(self.use_graphs, "one graph per batch shape" if self.use_graphs
                                                else "they need CUDA and a fused AdamW")
        paths["compile"] = fastpaths.status(self.use_compile, "torch.compile'd decoder layers, one compilation for all"
                                            if self.use_compile else "off (train.compile)")
        return paths

    # -- public

    def __call__(self, batch: PackedBatch, lr: float | None = None) -> StepResult:
        if lr is not None:
            self.set_lr(lr)
        if not self.use_graphs:
            loss, norm = self._eager(batch)
            return StepResult(loss, norm, batch.n_tokens)
        self._make_capturable()
        captured = self.graphs.get(batch.shape_key)
        if captured is None and self.graphs.first_meeting(batch.shape_key):
            loss, norm = self._eager(batch)
            return StepResult(loss, norm, batch.n_tokens)
        captured = captured or self._capture(batch, warm_up=False)
        for name in ("input_ids", "position_ids", "cu_seqlens", "label_index", "label_target"):
            source = getattr(batch, name)
            if source.device.type == "cpu" and not source.is_pinned():
                source = source.pin_memory()  # a pageable copy would wait for the GPU: no overlap
            getattr(captured.inputs, name).copy_(source, non_blocking=True)
        captured.graph.replay()
        loss, norm = captured.outputs
        return StepResult(loss.clone(), norm.clone(), batch.n_tokens)

    def uncompile(self, why: str) -> None:
        """Run the decoder layers eagerly from now on (a compilation that failed); before any capture."""
        self.use_compile = False
        self.graphs.eager_first = self._eager_first
        self.parts = replace(self.parts, layers=self._eager_layers)
        if not self._custom_loss:
            self.loss_fn = functools.partial(answer_only_loss, parts=self.parts)
        self.graphs.clear()
        self.paths["compile"] = fastpaths.status(False, why)

    @property
    def captures(self) -> int:
        return self.graphs.captures

    @property
    def capture_seconds(self) -> float:
        return self.graphs.capture_seconds

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def prepare(self, batches: Iterable[PackedBatch]) -> int:
        """Capture the graphs for these batches' shapes now (compiling on the way); the model is unchanged."""
        if not self.use_graphs:
            return 0
        self._make_capturable()
        before = self.captures
        for batch in batches:
            if self.graphs.get(batch.shape_key) is None:
                self._capture(batch, warm_up=True)
        return self.captures - before

    # -- the step itself

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # no weight-cast cache: a captured graph must redo the casts on every replay
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _body(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """forward, backward, clip, update: the part a graph captures."""
        with self._autocast(), fused_rotary(self.rotary_modules), self.adapter_copies.fresh(self._copy_dtype):
            loss = self.loss_fn(self.model, batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        loss = loss.detach()
        if self.fused:
            self._found_inf.copy_((~(torch.isfinite(loss) & torch.isfinite(norm))).float())
            self.optimizer.found_inf = self._found_inf  # read by fused Adam: skips the update when 1
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif math.isfinite(float(loss)) and math.isfinite(float(norm)):
            self.optimizer.step()
        return loss, norm

    def _eager(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        loss, norm = self._body(batch.to(self.device, non_blocking=True))
        self.optimizer.zero_grad(set_to_none=True)
        return loss, norm

    # -- graphs

    def _make_capturable(self) -> None:
        """Device lr tensors and capturable AdamW, again whenever someone swapped them (a checkpoint load)."""
        if len(self._lr) != len(self.optimizer.param_groups):
            self._lr = [torch.zeros((), dtype=torch.float32, device=self.device) for _ in self.optimizer.param_groups]
        for group, lr in zip(self.optimizer.param_groups, self._lr):
            group["capturable"] = True
            if group["lr"] is not lr:
                lr.fill_(float(group["lr"]))
                group["lr"] = lr
        token = self._state_ids()
        if token != self._state_token and self._state_token:
            self.graphs.clear()  # they point at state tensors that are gone
        self._state_token = token

    def _state_ids(self) -> tuple[int, ...]:
        """Identity of the optimizer state (a load_state_dict replaces the tensors the graphs use)."""
        ends = (self.params[0], self.params[-1])
        return tuple(id(v) for p in ends for v in self.optimizer.state.get(p, {}).values())

    def _capture(self, batch: PackedBatch, *, warm_up: bool) -> Captured:
        """Capture this batch's shape; warm_up: run warmup_iters steps first (a shape no eager step has met)."""
        static = batch.to(self.device)

        def warm() -> None:
            with preserved_state(self.optimizer, self.params):
                for _ in range(self.warmup_iters):
                    self.optimizer.zero_grad(set_to_none=True)
                    self._body(static)

        self.optimizer.zero_grad(set_to_none=True)
        self.adapter_copies.ready(self._copy_dtype)  # its buffer exists before the capture
        captured = self.graphs.capture(batch.shape_key, static, self._body, warm if warm_up else None)
        self._state_token = self._state_ids()
        return captured


COMPILE_BACKEND = "inductor"  # the tests trace with "aot_eager": the same graphs, no kernel generation


def _compiled_layers(layers: Sequence[Any]) -> list[Any]:
    """Each decoder layer through torch.compile; the layers share code, so they share one compilation."""
    import torch._dynamo

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    return [torch.compile(layer, dynamic=True, backend=COMPILE_BACKEND) for layer in layers]


# ---------------------------------------------------------------- the trainer's engine


class FastEngine:
    """gputwin.train.engine's Engine (collate, step) on packed batches and FastStep.

    Raises EngineUnsupported for models the fast path cannot run (token-classification heads, encoders);
    make_engine then falls back to the plain engine.
    """

    name = "fast"

    def __init__(self, model: Any, optimizer: torch.optim.Optimizer, *, device: torch.device,
                 model_dtype: torch.dtype, grad_clip: float, pad_id: int, compile: bool = False) -> None:
        """compile: torch.compile'd decoder layers (on CUDA only); the trainer decides it per run from what a
        compilation costs and saves (train/compiling.py)."""
        from .engine import EngineUnsupported

        try:
            decoder_parts(model)
        except TypeError as exc:
            raise EngineUnsupported(str(exc)) from None
        self.pad_id = pad_id
        dtype = torch.bfloat16 if device.type == "cuda" and model_dtype != torch.float32 else None
        self.fast = FastStep(model, optimizer, compile=compile and device.type == "cuda", grad_clip=grad_clip,
                             autocast_dtype=dtype)
        self.paths = self.fast.paths
        self.shapes = self.new_plan()
        self.on_compiled: Callable[[float], None] | None = None  # told the first compiled step's seconds
        self.compile_seconds: float | None = None

    @property
    def graphs(self) -> ShapeGraphs:
        return self.fast.graphs

    @staticmethod
    def new_plan() -> ShapePlan:
        """Each step's padded shape: planned from the batches to come, else the coarse buckets (shapeplan)."""
        return ShapePlan(Buckets(ROW_BUCKET, LABEL_BUCKET))

    def plan(self, batches: Iterable[Sequence[Any]]) -> None:
        """The batches of the steps to come (the trainer's data order): their shapes are planned now."""
        self.shapes.add(need_of(examples) for examples in batches)

    def collate(self, examples: Sequence[Any]) -> PackedBatch:
        return pack(examples, pad_id=self.pad_id, shape=self.shapes.shape_for(need_of(examples)))

    def step(self, batch: PackedBatch, lr: float) -> Any:
        """Issue the step; on CUDA it returns at once and the figures arrive with `.result()`."""
        if self.fast.use_compile and self.compile_seconds is None:
            result = self._first_compiled_step(batch, lr)
        else:
            result = self.fast(batch, lr=lr)
        if result.loss.device.type == "cuda":
            return PendingStep(result.loss, result.grad_norm)
        return _output(float(result.loss), float(result.grad_norm))

    def _first_compiled_step(self, batch: PackedBatch, lr: float) -> StepResult:
        """The layers compile while this step is issued. A compilation that fails leaves the run on the eager
        layers, said on stderr and in the engine's paths: the step is retried as it would have run without."""
        from torch._dynamo.exc import TorchDynamoException

        began = time.perf_counter()
        try:
            result = self.fast(batch, lr=lr)
        except TorchDynamoException as exc:
            cause = getattr(exc, "inner_exception", None) or exc  # a backend's own error, where it raised one
            first = (str(cause).strip().splitlines() or [""])[0][:200]
            why = f"the compilation failed ({type(cause).__name__}: {first}); eager layers"
            print(f"gputwin: {why}", file=sys.stderr)
            self.fast.uncompile(why)
            self.compile_seconds = 0.0
            return self.fast(batch, lr=lr)
        self.compile_seconds = time.perf_counter() - began
        if self.on_compiled is not None:
            self.on_compiled(self.compile_seconds)
        return result


class PendingStep:
    """A step's loss and gradient norm on their way to the host: copied without blocking, behind the step
    on the device's queue, and read after the next step has been issued."""

    def __init__(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        figures = torch.stack([loss.float(), grad_norm.float()])
        self._host = torch.empty(2, dtype=torch.float32, pin_memory=True)
        self._host.copy_(figures, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def result(self) -> Any:
        self._copied.synchronize()  # this step only, not the steps issued after it
        loss, grad_norm = self._host.tolist()
        return _output(loss, grad_norm)


def _output(loss: float, grad_norm: float) -> Any:
    from .engine import NonFiniteLoss, StepOutput

    if not math.isfinite(loss):
        raise NonFiniteLoss(f"loss is {loss}")  # the step updated nothing
    return StepOutput(loss=loss, grad_norm=grad_norm)
