"""One frozen base with several arms' LoRA adapters: the model side of co-training.

Each arm's adapter is a named peft adapter on the one base (`adapter_name(i)`: a peft adapter name may not
hold the dots an arm name may). In a co-trained step the batch is every arm's batch stacked, each arm's rows
a contiguous block; inside `SharedModel.routed(blocks)` every LoRA layer adds each adapter to its own rows
only, so the base's GEMMs run once over all the rows while each adapter sees exactly the rows it would see
alone. The packed step (train/cofast.py) uses `SharedModel.tokens(token_arm, adapters)` instead: one row of
every arm's samples, each layer adding each adapter to its own arm's tokens (TokenRoute, with every adapter of
a layer in one kernels/multi_lora.py function). An arm that does not target a layer simply has no adapter
there. Outside both a layer runs peft's own forward with the active adapter: `only(name)` makes one arm's adapter the active one, which is how that
arm is validated.

`ArmView` is one arm's face of the shared model, for everything that works on "the arm's model"
(checkpoints, saving the adapter, the optimizer, the cooldown probe, fault injection): the base's
parameters and this arm's adapter, under the names a model of its own gives them (`.default.`), so a
checkpoint written co-trained resumes in a process of its own, and the other way round.
"""

from __future__ import annotations

import copy
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..core.profiles import LoraSpec
from ..kernels.fused_lora import dropout_p, fusable
from ..kernels import multi_lora as multi_lora_kernel
from ..kernels.multi_lora import multi_lora

DEFAULT = "default"  # peft's name for the adapter of a model with one
Block = tuple[str, int, int]  # (adapter name, first row, row after the last)


class NotCoTrainable(ValueError):
    """A model or adapter the routed layers do not cover; the message says which."""


def adapter_name(index: int) -> str:
    return f"arm{index}"


def lora_config(spec: LoraSpec) -> Any:
    """The adapter config `modeling.attach_lora` gives a new causal-LM adapter."""
    from peft import LoraConfig, TaskType

    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=list(spec.target_modules), task_type=TaskType.CAUSAL_LM)


def _routed_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LoRA Linear, with each adapter added to its own block of rows (when blocks are set), or to its
    own tokens of a packed row (when a TokenRoute is set)."""
    blocks: Sequence[Block] | None = self.gputwin_blocks
    if blocks is None:
        if self.gputwin_route is not None:
            return self.gputwin_route.forward(self, x, *args, **kwargs)
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    parts = []
    for name, start, stop in blocks:
        rows = result[start:stop]
        if name in self.lora_A and not self.disable_adapters:
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            xs = self._cast_input_dtype(x[start:stop], lora_a.weight.dtype)
            # as peft: in the adapter's dtype (or autocast's), then back to the base's output dtype
            rows = (rows + lora_b(lora_a(self.lora_dropout[name](xs))) * self.scaling[name]).to(result.dtype)
        parts.append(rows)
    return torch.cat(parts)


class TokenRoute:
    """Which arm each token of a packed row belongs to, for one forward pass of every LoRA layer.

    A layer whose adapters fit kernels/multi_lora.py (plain Linear base and LoRA, compute dtype = x's) runs
    them all in one MultiLoraFunction; any other runs `masked_forward`. The per-layer constants (which arm
    each adapter column belongs to, its scale, dropout) are made once per layout and kept in `constants`,
    which outlives the route: a captured CUDA graph replays a forward that must not create tensors."""

    def __init__(self, token_arm: torch.Tensor, adapters: Sequence[str], constants: dict[Any, Any]) -> None:
        self.token_arm, self.adapters, self.constants = token_arm, tuple(adapters), constants
        self._per_pass: dict[Any, torch.Tensor] = {}  # this forward's masks, made from token_arm

    def forward(self, layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = [n for n in self.adapters if n in layer.lora_A] if not layer.disable_adapters else []
        if not names:
            return layer.base_layer(x, *args, **kwargs)
        rates = [dropout_p(layer.lora_dropout[n]) for n in names]
        base, device = layer.base_layer, x.device.type
        autocast = torch.is_autocast_enabled(device)
        compute = torch.get_autocast_dtype(device) if autocast else layer.lora_A[names[0]].weight.dtype
        if (args or kwargs or None in rates or not fusable(layer) or base.weight.requires_grad
                or compute != x.dtype or base.weight.dtype != x.dtype or not x.dtype.is_floating_point):
            return masked_forward(layer, x, [(n, self.mask(self.adapters.index(n))) for n in names], *args, **kwargs)
        key = tuple((self.adapters.index(n), layer.lora_A[n].weight.shape[0], float(layer.scaling[n]), p)
                    for n, p in zip(names, rates)) + (len(self.adapters), x.dtype, x.device)
        columns, scale, keep = self._constants(key)
        own = self._per_pass.get(("own", key))
        if own is None:
            own = self._per_pass[("own", key)] = self.token_arm.view(-1, 1) == columns
        if isinstance(keep, torch.Tensor):  # arms at different rates: each token's own arm's
            arm_keep = keep
            keep = self._per_pass.get(("keep", key))
            if keep is None:
                keep = self._per_pass[("keep", key)] = arm_keep[self.token_arm].view(-1, 1)
        with torch.autocast(device, enabled=False):
            return multi_lora(x, base.weight, base.bias, own, scale, keep,
                              [layer.lora_A[n].weight for n in names], [layer.lora_B[n].weight for n in names])

    def _constants(self, key: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(each column's arm index [R], each column's scale [R], the dropout keep: None, a float, or each
        arm's keep probability [arms + 1], the last for padding) of a layer layout."""
        found = self.constants.get(key)
        if found is None:
            *adapters, _, dtype, device = key
            ranks = sum(r for _, r, _, _ in adapters)
            pad = -ranks % multi_lora_kernel.ALIGN  # zero columns, no arm's (-2: not even padding tokens')
            columns = torch.tensor([k for k, r, _, _ in adapters for _ in range(r)] + [-2] * pad, device=device)
            scale = torch.tensor([s for _, r, s, _ in adapters for _ in range(r)] + [0.0] * pad, dtype=dtype,
                                 device=device)
            rates = sorted({p for _, _, _, p in adapters})
            keep: Any = None if rates == [0.0] else 1.0 - rates[0]
            if len(rates) > 1:
                arm_keep = [1.0] * (len(self.adapters) + 1)  # arms without an adapter here, and padding (-1): 1
                for k, _, _, p in adapters:
                    arm_keep[k] = 1.0 - p
                keep = torch.tensor(arm_keep, dtype=torch.float32, device=device)
            found = self.constants[key] = (columns, scale, keep)
        return found

    def mask(self, index: int) -> torch.Tensor:
        """[1, tokens, 1]: the tokens of the index-th adapter (a packed row's layout)."""
        found = self._per_pass.get(("mask", index))
        if found is None:
            found = self._per_pass[("mask", index)] = (self.token_arm == index).view(1, -1, 1)
        return found


def masked_forward(self: Any, x: torch.Tensor, masks: Sequence[tuple[str, torch.Tensor]], *args: Any,
                   **kwargs: Any) -> torch.Tensor:
    """Each adapter over every token, kept only where its mask is set: peft's maths for layers the multi-LoRA
    function does not cover. The input is masked too, and with torch.where rather than a product: another
    arm's inf or NaN then reaches neither this adapter's output nor its gradients."""
    result = self.base_layer(x, *args, **kwargs)
    # Under autocast the adapter's GEMMs run in autocast's dtype whatever x's: peft's cast of x to the
    # adapter's fp32 would only add a copy of every layer input per arm (bf16 -> fp32 -> bf16 is exact).
    autocast = torch.is_autocast_enabled(x.device.type)
    out = result
    for name, mask in masks:
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        mine = torch.where(mask, x if autocast else self._cast_input_dtype(x, lora_a.weight.dtype), 0.0)
        delta = lora_b(lora_a(self.lora_dropout[name](mine))) * self.scaling[name]
        out = out + torch.where(mask, delta, 0.0)  # in the wider of the two dtypes, as peft adds
    return out.to(result.dtype)


class SharedModel:
    """The base with every arm's adapter; `model` is the peft model holding them."""

    def __init__(self, base: Any, adapters: Sequence[tuple[LoraSpec, int]]) -> None:
        """adapters: each arm's (lora spec, seed), in the arms' order."""
        from peft import get_peft_model
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer

        self.names = [adapter_name(i) for i in range(len(adapters))]
        model = None
        for name, (spec, seed) in zip(self.names, adapters):
            torch.manual_seed(seed)  # each adapter starts where the arm alone starts (load_base draws nothing)
            if model is None:
                model = get_peft_model(base, lora_config(spec), adapter_name=name)
            else:
                model.add_adapter(name, lora_config(spec))
        self.model = model
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        odd = [type(m).__name__ for m in self.layers if type(m) is not LoraLinear]
        if odd:
            raise NotCoTrainable(f"LoRA on {odd[0]} layers (co-training routes Linear layers only)")
        for layer in self.layers:
            layer.gputwin_blocks = layer.gputwin_route = None
            layer.forward = types.MethodType(_routed_forward, layer)
        self._route_constants: dict[Any, Any] = {}
        self.make_trainable()

    def make_trainable(self) -> None:
        """Every arm's adapter trains (peft freezes all but the active adapter when one is added or set)."""
        for layer in self.layers:
            for name in self.names:
                if name in layer.lora_A:
                    layer.lora_A[name].requires_grad_(True)
                    layer.lora_B[name].requires_grad_(True)

    def owner(self, parameter_name: str) -> str | None:
        """The adapter a parameter belongs to; None for the base's."""
        return next((name for name in self.names if f".{name}." in parameter_name), None)

    @contextmanager
    def routed(self, blocks: Sequence[Block]) -> Iterator[Any]:
        """Forward passes inside see each adapter on its own rows: blocks cover the batch's rows in order."""
        for layer in self.layers:
            layer.gputwin_blocks = tuple(blocks)
        try:
            yield self.model
        finally:
            for layer in self.layers:
                layer.gputwin_blocks = None

    @contextmanager
    def tokens(self, token_arm: torch.Tensor, adapters: Sequence[str]) -> Iterator[Any]:
        """Forward passes inside see each adapter on its own tokens of a packed row: token_arm [tokens] holds
        the index in `adapters` of each token's arm (-1: no arm's, e.g. padding)."""
        route = TokenRoute(token_arm, adapters, self._route_constants)
        for layer in self.layers:
            layer.gputwin_route = route
        try:
            yield self.model
        finally:
            for layer in self.layers:
                layer.gputwin_route = None

    @contextmanager
    def only(self, name: str) -> Iterator[Any]:
        """The peft model with `name` as its one active adapter: the arm's model as it would be alone."""
        self.model.set_adapter(name)
        try:
            yield self.model
        finally:
            self.make_trainable()


class ArmView:
    """One arm's share of the shared model, under the names its own model would give it."""

    def __init__(self, shared: SharedModel, adapter: str) -> None:
        self.shared, self.adapter = shared, adapter
        mine = [(name, p) for name, p in shared.model.named_parameters() if shared.owner(name) in (None, adapter)]
        self._named = [(name.replace(f".{adapter}.", f".{DEFAULT}."), p) for name, p in mine]
        self._shared_names = {view: name for (view, _), (name, _) in zip(self._named, mine)}  # view name -> shared

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return iter(self._named)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return (p for _, p in self._named)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self._named if p.requires_grad]

    def train(self, mode: bool = True) -> ArmView:
        self.shared.model.train(mode)
        return self

    def eval(self) -> ArmView:
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.trainable():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The adapter as peft saves a model's only adapter: adapter_model.safetensors + adapter_config.json.
        state_dict: this arm's weights under this view's names (a copy taken earlier), else the live ones."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        model, folder = self.shared.model, Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if state_dict is not None:  # back under the shared model's names, which peft looks the adapter up by
            state_dict = {self._shared_names[name]: tensor for name, tensor in state_dict.items()}
        state = get_peft_model_state_dict(model, state_dict=state_dict,
                                          adapter_name=self.adapter)  # keys without the adapter's name
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                  str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = copy.deepcopy(model.peft_config[self.adapter])
        config.inference_mode = True
        if config.base_model_name_or_path is None:  # as peft's save_pretrained fills it in
            config.base_model_name_or_path = model.base_model.model.__dict__.get("name_or_path") or None
        config.save_pretrained(str(folder))
