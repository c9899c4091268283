"""kernels/multi_lora.py: several adapters on one frozen Linear, each on its own tokens (fp32, CPU)."""

from __future__ import annotations

import functools

import pytest
import torch

from gputwin.kernels.multi_lora import multi_lora

IN, OUT, RANKS, SCALES = 16, 12, (2, 3), (2.0, 0.5)


def setup(seed: int = 0) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    tokens = 10
    token_arm = torch.tensor([0, 0, 0, 0, 1, 1, 1, 0, -1, -1])  # arm 0, arm 1, arm 0 again, padding
    return {
        "x": torch.randn(1, tokens, IN, generator=g),
        "weight": torch.randn(OUT, IN, generator=g),
        "bias": torch.randn(OUT, generator=g),
        "a": [torch.randn(r, IN, generator=g) for r in RANKS],
        "b": [torch.randn(OUT, r, generator=g) for r in RANKS],
        "token_arm": token_arm,
    }


def routed(world: dict, a: list[torch.Tensor], b: list[torch.Tensor], x: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """pad: zero columns after the adapters' (no arm's, scale 0), as TokenRoute aligns them."""
    columns = torch.tensor([k for k, r in enumerate(RANKS) for _ in range(r)] + [-2] * pad)
    scale = torch.tensor([s for s, r in zip(SCALES, RANKS) for _ in range(r)] + [0.0] * pad)
    own = world["token_arm"].view(-1, 1) == columns
    return multi_lora(x, world["weight"], world["bias"], own, scale, None, a, b)


def reference(world: dict, a: list[torch.Tensor], b: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Each arm's LoRA on its own tokens, one arm at a time, as peft computes one adapter."""
    y = x @ world["weight"].t() + world["bias"]
    for k, (ak, bk, s) in enumerate(zip(a, b, SCALES)):
        mine = (world["token_arm"] == k).view(1, -1, 1)
        y = y + torch.where(mine, (x @ ak.t() @ bk.t()) * s, 0.0)
    return y


def leaves(world: dict) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    return (world["x"].clone().requires_grad_(), [t.clone().requires_grad_() for t in world["a"]],
            [t.clone().requires_grad_() for t in world["b"]])


@pytest.mark.parametrize("pad", [0, 3])
def test_each_arm_s_tokens_get_that_arm_s_adapter_and_each_adapter_the_gradient_of_its_own_tokens(pad: int) -> None:
    """Also with the columns padded to an aligned width: the same outputs and gradients, one per adapter."""
    world = setup()
    upstream = torch.randn(1, 10, OUT, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (functools.partial(routed, pad=pad), reference):
        x, a, b = leaves(world)
        y = fn(world, a, b, x)
        (y * upstream).sum().backward()
        results.append((y.detach(), x.grad, [t.grad for t in a], [t.grad for t in b]))
    (y1, gx1, ga1, gb1), (y2, gx2, ga2, gb2) = results
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(gx1, gx2)
    for one, two in zip(ga1 + gb1, ga2 + gb2):
        torch.testing.assert_close(one, two)


def test_an_arm_with_nan_weights_reaches_no_other_arm_s_rows_or_gradients() -> None:
    world = setup()
    upstream = torch.randn(1, 10, OUT, generator=torch.Generator().manual_seed(1))
    clean = []
    for poison in (False, True):
        x, a, b = leaves(world)
        if poison:
            with torch.no_grad():
                a[1][0, 0] = float("nan")
                b[1][1, 1] = float("inf")
        y = routed(world, a, b, x)
        (torch.where(torch.isfinite(y), y, 0.0) * upstream).sum().backward()
        arm0 = world["token_arm"] == 0
        clean.append((y[0, arm0].detach(), x.grad[0, arm0], a[0].grad, b[0].grad))
    for one, two in zip(*clean):
        assert torch.isfinite(two).all()
        torch.testing.assert_close(one, two)


def test_dropout_at_one_rate_drops_that_share_of_inputs_and_scales_the_rest() -> None:
    torch.manual_seed(0)
    tokens = 4000
    x = torch.ones(tokens, IN)
    a, b = [torch.zeros(1, IN)], [torch.ones(OUT, 1)]
    a[0][0, 0] = 1.0
    own = torch.ones(tokens, 1, dtype=torch.bool)
    y = multi_lora(x, torch.zeros(OUT, IN), None, own, torch.ones(1), 0.75, a, b)[:, 0]
    assert abs((y == 0).float().mean().item() - 0.25) < 0.03
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))
