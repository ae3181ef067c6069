"""SwiGLU's gate as our ops (forgather.models.fused_swiglu) on the CPU: the torch reference that the kernels
compute (the GPU tests hold the kernels to it) is the layer's own gate, and the kernels' closed-form gradient is
autograd's; the layer takes the op only for CUDA tensors. The kernels themselves: tests/gpu/test_models_gpu.py
(on a GPU) and scripts/interpret_fused_swiglu.py (Triton's interpreter)."""

from __future__ import annotations

import copy
import pickle
import types

import pytest
import torch
import torch.nn.functional as F

from forgather.models import feedforward
from forgather.models.feedforward import SwiGLU
from forgather.models.fused_swiglu import reference_swiglu


def kernels_backward(dh, g, u):
    """The backward kernel's arithmetic, transcribed: s = sigmoid(g), du = dh silu(g),
    dg = dh u (s + silu(g)(1 - s))."""
    s = 1 / (1 + torch.exp2(-g * 1.4426950408889634))
    silu = g * s
    return dh * u * (s + silu * (1 - s)), dh * silu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_reference_is_the_layers_gate(dtype):
    gen = torch.Generator().manual_seed(0)
    g, u = (3 * torch.randn(5, 64, generator=gen)).to(dtype), torch.randn(5, 64, generator=gen).to(dtype)
    got, eager = reference_swiglu(g, u), F.silu(g) * u
    assert got.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(got, eager)
    else:  # rounded once against eager's rounding of silu(g) first: within a rounding
        torch.testing.assert_close(got, eager, rtol=2 ** -7, atol=2 ** -7)


def test_the_kernels_gradient_is_autograds():
    gen = torch.Generator().manual_seed(1)
    g = (4 * torch.randn(7, 33, generator=gen, dtype=torch.float64)).requires_grad_()
    u = torch.randn(7, 33, generator=gen, dtype=torch.float64).requires_grad_()
    dh = torch.randn(7, 33, generator=gen, dtype=torch.float64)
    (F.silu(g) * u).backward(dh)  # in float64 (the reference computes in fp32 whatever its inputs)
    dg, du = kernels_backward(dh, g.detach(), u.detach())
    torch.testing.assert_close(dg, g.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(du, u.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fused_projections", [False, True])
def test_the_layer_takes_the_op_only_for_cuda_tensors(monkeypatch, fused_projections):
    calls = []

    def swiglu(gate, up):
        calls.append(gate.shape)
        return reference_swiglu(gate, up)

    monkeypatch.setattr(feedforward, "triton_ops", lambda name: types.SimpleNamespace(swiglu=swiglu))
    layer = SwiGLU(16, 40, fused_projections=fused_projections, fused=True)
    assert layer._swiglu is swiglu and SwiGLU(16, 40)._swiglu is None
    plain = SwiGLU(16, 40, fused_projections=fused_projections)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 16)
    assert torch.equal(layer(x), plain(x))  # CPU tensors: the torch expression
    assert calls == []


def test_without_triton_a_gpu_machine_is_told_why_the_torch_gate_runs(monkeypatch):
    monkeypatch.setattr(feedforward, "triton_ops", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.warns(UserWarning, match="SwiGLU\\(fused=True\\) runs the torch expression: Triton is not installed"):
        layer = SwiGLU(16, 40, fused=True)
    assert layer._swiglu is None


def test_a_layer_holding_the_op_pickles_and_copies():
    layer = SwiGLU(16, 40)
    layer._swiglu = reference_swiglu  # a module's function, as triton_ops("fused_swiglu").swiglu is
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone._swiglu is reference_swiglu


def test_gate_and_up_of_two_shapes_are_refused():
    from forgather.models.fused_swiglu import _check

    with pytest.raises(ValueError, match="gate and up must have one shape and dtype"):
        _check(torch.zeros(2, 4), torch.zeros(2, 5))
