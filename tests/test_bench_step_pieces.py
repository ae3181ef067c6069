"""scripts/bench_step_pieces.py's `--rotary` piece on the CPU: the order it times the layer against (the heads made
[B, heads, T, D] views, then rotated: the layer before 2026-12-06) computes what the layer computes, so only the GPU's
time can tell them apart."""

from __future__ import annotations

import pytest
import torch

from helpers.scripts import load_script

pieces = load_script("bench_step_pieces")
SHAPE = dict(batch=2, seq=32, heads=4, kv_heads=2, head_dim=8, hidden=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_heads_first_order_gives_the_layers_outputs_and_gradients_bit_for_bit(dtype):
    positions = torch.cat([torch.arange(20), torch.arange(12)]).repeat(SHAPE["batch"], 1)  # two documents a row
    now, before = pieces.rotary_layers("cpu", dtype, SHAPE, "sdpa")
    assert type(before).__name__ == "HeadsFirstAttention" and type(now).forward is not type(before).forward
    x, grad, rope, mask = pieces.rotary_inputs("cpu", dtype, SHAPE, positions)
    want = [t.clone() for t in pieces.rotary_step(before, x, grad, rope, mask)()]
    got = pieces.rotary_step(now, x, grad, rope, mask)()
    assert len(want) == len(got) == 2 + len(list(now.parameters()))  # the output, x's gradient, the weights'
    assert all(torch.equal(b, a) for a, b in zip(want, got, strict=True))
    assert not torch.equal(want[0], pieces.rotary_step(now, x, grad, None, mask)()[0])  # rope matters here
