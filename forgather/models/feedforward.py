"""Position-wise feed-forward blocks: [B, T, H] -> [B, T, H].

Each takes `hidden_size` first, so a layer calls `feedforward_factory(hidden_size)`; set the rest
(`intermediate_size`, `bias`, `chunk_tokens`, `fused_projections`) in the partial.

`chunk_tokens` (long contexts): while gradients are recorded, the tokens go through the block `chunk_tokens` at a
time, each chunk recomputed in backward (torch.utils.checkpoint), so the [tokens, intermediate] activations
(gate, up, their product: ~4 tensors of 2.7x the hidden size each) exist for one chunk only. The price is one more
forward of the block. Inside a layer that is itself checkpointed this bounds the peak of its backward, which
is what limits the context of a long-sequence step (scripts/bench_memory.py).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .checks import positive_sizes
from .fused import fused_linear, fusion
from .triton_ops import triton_ops


def chunked_over_tokens(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk_tokens: int | None) -> torch.Tensor:
    """fn(x) for a position-wise fn, computed `chunk_tokens` tokens at a time with each chunk checkpointed
    (only while gradients are recorded and x holds more tokens than one chunk)."""
    tokens = x.numel() // x.shape[-1]
    if chunk_tokens is None or tokens <= chunk_tokens or not torch.is_grad_enabled():
        return fn(x)
    flat = x.reshape(tokens, x.shape[-1])
    parts = [checkpoint(fn, part, use_reentrant=False) for part in flat.split(chunk_tokens)]
    return torch.cat(parts).reshape(*x.shape[:-1], -1)


class SwiGLU(nn.Module):
    """Gated feed-forward with a SiLU gate (Shazeer, 2020, "GLU Variants"): down(silu(gate(x)) * up(x)).

    `fused_projections`: true computes gate and up as one matmul over both weights concatenated
    (`forgather.models.fused`: same parameters and state dict); "kv", "qkv" and "auto" (the attention's projections
    only) leave them two.
    `fused`: on CUDA tensors, silu(gate) * up as our Triton ops (`fused_swiglu`: one kernel forward and one
    backward, the least arithmetic an element); elsewhere, and without Triton, the torch expression.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, chunk_tokens: int | None = None,
                 fused_projections: bool | str = False, fused: bool = False):
        super().__init__()
        ops = triton_ops("fused_swiglu") if fused else None
        if fused and ops is None and torch.cuda.is_available():
            warnings.warn("SwiGLU(fused=True) runs the torch expression: Triton is not installed (pip install "
                          "triton, or forgather[gpu])", stacklevel=2)
        # the op itself, not its module: a model must stay picklable and deep-copyable
        self._swiglu = ops.swiglu if ops is not None else None
        positive_sizes(type(self).__name__, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       chunk_tokens=chunk_tokens)
        fused_projections = fusion(type(self).__name__, fused_projections)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.chunk_tokens = chunk_tokens
        self.fused_projections = fused_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return chunked_over_tokens(self._block, x, self.chunk_tokens)

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_projections is True:
            gate, up = fused_linear(x, (self.gate_proj, self.up_proj))
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self._swiglu is not None and gate.is_cuda and gate.dtype == up.dtype:
            return self.down_proj(self._swiglu(gate, up))
        return self.down_proj(F.silu(gate) * up)


GELU_APPROXIMATIONS = ("none", "tanh")  # what F.gelu takes


class GELUMLP(nn.Module):
    """The GPT-2 MLP: down(gelu(up(x))); `approximate="tanh"` gives GPT-2's tanh GELU."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = True, approximate: str = "none"):
        super().__init__()
        positive_sizes(type(self).__name__, hidden_size=hidden_size, intermediate_size=intermediate_size)
        if approximate not in GELU_APPROXIMATIONS:
            raise ValueError(f"{type(self).__name__}: approximate={approximate!r}; choose one of "
                             f"{list(GELU_APPROXIMATIONS)} ('tanh' is GPT-2's GELU)")
        self.approximate = approximate
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))
