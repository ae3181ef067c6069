"""Stochastic rounding of fp32 results to bf16 parameters, the same bits in PyTorch and in the Triton kernel.

Why: with pure bf16 weights (trainer=gpu's default, and the 7B-in-24-GiB recipe) an update smaller than half a
bf16 step of the weight (2^-9 of its magnitude, ~0.2%) rounds back to the old value. Adafactor's relative step
makes updates about lr x the weight's RMS, so at fine-tuning rates (1e-5..1e-3) nearly every update vanished.
Rounding up with probability equal to the discarded fraction keeps each update in expectation (Gupta et al.,
2015), with no extra state.

How: x (fp32) keeps its top 16 bits after adding a 16-bit noise to its bit pattern (carrying into the kept bits
exactly when noise >= 2^16 - the discarded bits; for negative x the pattern is sign + magnitude, so the same
rule rounds the magnitude). The noise is a hash, not a random generator, so that the kernel and this reference
produce identical bits and a resumed run rounds exactly as the uninterrupted one (nothing to checkpoint):
    key   = hash32(index ^ step_seed)             index: the element's flat position in the parameter
    noise = hash32(key ^ bits(x)) & 0xFFFF        bits(x): the fp32 result (differs between parameters)
hash32 is the "lowbias32" integer hash (two multiply-xorshift rounds), chosen for its low bias, not secrecy.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_HASH_MUL1 = 0x7FEB352D
_HASH_MUL2 = 0x846CA68B
_GOLDEN = 0x9E3779B1


def step_seed(seed: int, step: int) -> int:
    """The 31-bit seed of one optimizer step (a kernel argument, so it stays below 2^31)."""
    return (seed * _GOLDEN + step) & 0x7FFFFFFF


def hash32(h: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding values in [0, 2^32); products wrap, their low 32 bits are exact."""
    h = h ^ (h >> 16)
    h = (h * _HASH_MUL1) & _MASK32
    h = h ^ (h >> 15)
    h = (h * _HASH_MUL2) & _MASK32
    return h ^ (h >> 16)


def stochastic_round_to_bf16(
    x: torch.Tensor, seed: int | torch.Tensor, index: torch.Tensor | None = None
) -> torch.Tensor:
    """x (fp32) rounded to bf16 stochastically, as described in the module docstring. `seed` may be a 0-dim
    int64 tensor (inside torch.compile: a new seed each step must not mean a new graph). `index`: each element's
    position in its parameter (int64, broadcast to x's shape), by default its position in x; k parameters of n
    elements stacked as [k, n] pass arange(n)."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic rounding takes fp32 values, got {x.dtype}")
    bits = x.contiguous().view(torch.int32).to(torch.int64) & _MASK32
    if index is None:
        index = torch.arange(x.numel(), device=x.device, dtype=torch.int64).view(x.shape)
    noise = hash32(hash32(index ^ seed) ^ bits) & 0xFFFF
    rounded = ((bits + noise) & 0xFFFF0000).to(torch.int32)  # low 32 bits: int64 -> int32 keeps the pattern
    return rounded.view(torch.float32).to(torch.bfloat16)
