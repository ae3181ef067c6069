"""scripts/bench_step_pieces.py's `--rotary` piece on the CPU: the formulation it times beside the layer (the
heads rotated while stored [B, T, heads, D], before they become [B, heads, T, D] views) computes what the layer
computes, so only the GPU's time can tell them apart."""

from __future__ import annotations

import pytest
import torch

from forgather.models.rope import apply_rotary
from helpers.scripts import load_script

pieces = load_script("bench_step_pieces")
SHAPE = dict(batch=2, seq=32, heads=4, kv_heads=2, head_dim=8, hidden=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotating_first_gives_apply_rotarys_values_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4 * 8, generator=gen).to(dtype)
    cos, sin = torch.randn(2, 2, 16, 8, generator=gen).to(dtype).unbind(0)
    first = pieces.rotary_first(x, 4, cos, sin)
    assert first.shape == (2, 4, 16, 8) and first.transpose(1, 2).is_contiguous()  # stored [B, T, heads, D]
    assert torch.equal(first, apply_rotary(x.view(2, 16, 4, 8).transpose(1, 2), cos, sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rotary_first_layer_gives_the_layers_outputs_and_gradients_bit_for_bit(dtype):
    positions = torch.cat([torch.arange(20), torch.arange(12)]).repeat(SHAPE["batch"], 1)  # two documents a row
    now, first = pieces.rotary_layers("cpu", dtype, SHAPE, "sdpa")
    x, grad, rope, mask = pieces.rotary_inputs("cpu", dtype, SHAPE, positions)
    want = [t.clone() for t in pieces.rotary_step(now, x, grad, rope, mask)()]
    got = pieces.rotary_step(first, x, grad, rope, mask)()
    assert len(want) == len(got) == 2 + len(list(now.parameters()))  # the output, x's gradient, the weights'
    assert all(torch.equal(b, a) for a, b in zip(want, got, strict=True))
    assert not torch.equal(want[0], pieces.rotary_step(now, x, grad, None, mask)()[0])  # rope matters here
