"""The fused q/k/v product's rotary ops (forgather.models.fused_rotary) on the CPU: the torch references their
kernels compute (the GPU tests hold the kernels to them) are the layer's own rotation, and autograd's gradient;
the layer takes the op only on CUDA tensors, with rotary tables and no KV cache. The kernels themselves:
tests/gpu/test_models_gpu.py (on a GPU) and Triton's interpreter."""

from __future__ import annotations

import copy
import pickle
import types

import pytest
import torch

from forgather.models import attention as attention_module
from forgather.models.attention import Attention, AttentionMask, document_ids_from_positions
from forgather.models.fused import fused_product
from forgather.models.fused_rotary import reference_rotary_qkv, reference_rotary_qkv_backward
from forgather.models.rope import RotaryEmbedding, apply_rotary

B, T, H, KV, D = 2, 24, 4, 2, 8


def product_and_tables(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, (H + 2 * KV) * D, generator=gen).to(dtype)
    positions = torch.cat([torch.arange(T - 10), torch.arange(10)]).repeat(B, 1)
    cos, sin = RotaryEmbedding(D, theta=10000.0)(positions)
    return qkv, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_reference_is_the_layers_rotation_on_the_split_product(dtype):
    qkv, cos, sin = product_and_tables(dtype)
    q, k, v = reference_rotary_qkv(qkv, cos, sin, H, KV)
    assert q.shape == (B, H, T, D) and k.shape == v.shape == (B, KV, T, D)
    assert all(t.transpose(1, 2).is_contiguous() for t in (q, k, v))  # stored [B, T, heads, D], dense
    split = [t.unflatten(-1, (-1, D)) for t in qkv.split([H * D, KV * D, KV * D], -1)]
    want_q, want_k = (apply_rotary(t, cos, sin, heads_dim=2).transpose(1, 2) for t in split[:2])
    assert torch.equal(v, split[2].transpose(1, 2))
    if dtype == torch.float32:
        assert torch.equal(q, want_q) and torch.equal(k, want_k)
    else:  # rounded once against eager's rounding of each product: within a rounding
        for got, want in ((q, want_q), (k, want_k)):
            torch.testing.assert_close(got, want, rtol=2 ** -7, atol=2 ** -7)


def test_the_backward_reference_is_autograds_gradient_of_the_reference():
    qkv, cos, sin = product_and_tables(torch.float64)
    qkv.requires_grad_()
    out = reference_rotary_qkv(qkv, cos.double(), sin.double(), H, KV)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in out]
    torch.autograd.backward(out, grads)
    # the gradients as the attention's backward hands them: [B, heads, T, D] stored [B, T, heads, D]
    strided = [g.transpose(1, 2).contiguous().transpose(1, 2) for g in grads]
    got = reference_rotary_qkv_backward(*strided, cos.double(), sin.double())
    assert got.shape == qkv.shape
    torch.testing.assert_close(got, qkv.grad, rtol=1e-12, atol=1e-12)
    assert not torch.equal(got, torch.cat([g.transpose(1, 2).flatten(2) for g in grads], -1))  # rotated back


def test_the_layer_takes_the_op_only_for_cuda_tensors_with_tables_and_no_cache(monkeypatch):
    calls = []

    def rotary_qkv(qkv, cos, sin, heads, kv_heads):
        calls.append(qkv.shape)
        return reference_rotary_qkv(qkv, cos, sin, heads, kv_heads)

    monkeypatch.setattr(attention_module, "triton_ops", lambda name: types.SimpleNamespace(rotary_qkv=rotary_qkv))
    layer = Attention(H * D, H, KV, fused_projections="qkv")
    assert layer._rotary_qkv is rotary_qkv
    assert Attention(H * D, H, KV, fused_projections=False)._rotary_qkv is None  # separate products: no op
    assert Attention(H * D, H, KV, fused_projections="kv")._rotary_qkv is None
    x = torch.randn(B, T, H * D)
    positions = torch.cat([torch.arange(T - 10), torch.arange(10)]).repeat(B, 1)
    rope = RotaryEmbedding(D, theta=10000.0)(positions)
    mask = AttentionMask(T, T, document_ids_from_positions(positions), x.device)
    out = layer(x, rope, mask)
    assert calls == []  # CPU tensors: the torch rotation
    q, k, v = reference_rotary_qkv(fused_product(x, (layer.q_proj, layer.k_proj, layer.v_proj)), *rope, H, KV)
    want = layer.o_proj(layer.attention_fn(q, k, v, mask, 0.0).transpose(1, 2).flatten(2))
    torch.testing.assert_close(out, want)  # fp32: the reference is the layer's rotation


def test_a_layer_holding_the_op_pickles_and_copies():
    layer = Attention(H * D, H, KV, fused_projections="qkv")
    layer._rotary_qkv = reference_rotary_qkv  # a module's function, as triton_ops("fused_rotary").rotary_qkv is
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone._rotary_qkv is reference_rotary_qkv


def test_the_ops_tables_take_one_row_for_all_and_any_layout_with_the_head_dim_contiguous():
    """cos/sin as the kernels read them ([B, T, D] with D contiguous): a table of one batch row serves every row
    (stride 0, no copy), a table whose D is strided is copied, values unchanged."""
    from forgather.models.fused_rotary import _tables

    qkv = torch.zeros(3, T, (H + 2 * KV) * D)
    one = torch.randn(1, T, D)
    shared = _tables(one, qkv)
    assert shared.shape == (3, T, D) and shared.stride(0) == 0 and shared.data_ptr() == one.data_ptr()
    strided = torch.randn(3, T, 2 * D)[..., ::2]
    copied = _tables(strided, qkv)
    assert copied.stride(-1) == 1 and torch.equal(copied, strided)
    with pytest.raises(ValueError, match="even head_dim"):
        reference_rotary_qkv(torch.zeros(1, T, (H + 2 * KV) * 7), one[..., :7], one[..., :7], H, KV)
