"""Rotary position embedding (RoFormer, Su et al. 2021) with optional Llama-3 frequency scaling.

`RotaryEmbedding(position_ids [B, T]) -> (cos, sin)`, each [B, T, head_dim], computed once per forward and
shared by every layer; `apply_rotary(x [B, heads, T, head_dim], cos, sin)` rotates queries and keys
(`heads_dim=2` for x [B, T, heads, head_dim], the order the projections store them in).
Pairs are (i, i + head_dim/2) -- the "rotate half" layout of Hugging Face Llama checkpoints. Frequencies
are computed on the fly (no buffers), so a model built on the meta device needs no re-initialization.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .checks import is_number, positive_sizes


def rope_frequencies(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """The inverse frequencies theta^(-2i/d), i = 0 .. d/2-1, in float32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def llama3_scale_frequencies(
    inv_freq: torch.Tensor,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> torch.Tensor:
    """Llama 3.1 context extension: long wavelengths slow down by `factor`, short ones stay, a smooth ramp between."""
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    ramped = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, ramped)
    return torch.where(wavelen < high_freq_wavelen, inv_freq, scaled)


LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def llama3_scaling_keys(scaling: dict) -> dict:
    """The four keys `llama3_scale_frequencies` takes, from a Llama 3.1 `rope_scaling` (whose `rope_type`, or old
    `type`, "llama3" says nothing more); a missing or unknown key is refused when the model is built, not at its
    first forward."""
    scaling = dict(scaling)
    for key in ("rope_type", "type"):
        kind = scaling.pop(key, "llama3")
        if kind != "llama3":
            raise ValueError(f"RotaryEmbedding: llama3_scaling has {key}={kind!r}; it takes Llama 3.1's scaling, "
                             f"'llama3', only")
    unknown = [key for key in scaling if key not in LLAMA3_SCALING_KEYS]
    missing = [key for key in LLAMA3_SCALING_KEYS if key not in scaling]
    problems = ([f"unknown: {', '.join(map(repr, unknown))}"] if unknown else []) + (
        [f"missing: {', '.join(missing)}"] if missing else [])
    if problems:
        raise ValueError(f"RotaryEmbedding: llama3_scaling takes {', '.join(LLAMA3_SCALING_KEYS)}; "
                         f"{'; '.join(problems)}")
    return scaling


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the given positions.

    Args:
        head_dim: size of one attention head (must match the attention's head_dim).
        theta: the RoPE base (10000 in RoFormer, 500000 in Llama 3).
        llama3_scaling: optional dict with `factor`, `low_freq_factor`, `high_freq_factor`,
            `original_max_position_embeddings` (the keys of a Llama 3.1 `rope_scaling`).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, llama3_scaling: dict | None = None):
        super().__init__()
        positive_sizes("RotaryEmbedding", head_dim=head_dim)
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim={head_dim} must be even (rotation pairs (i, i + head_dim/2))")
        if not is_number(theta) or not 0 < theta < math.inf:
            # a base of 0 or less makes every frequency inf or nan, and so every rotated query and key
            raise ValueError(f"RotaryEmbedding: theta={theta!r} must be a positive number (the RoPE base: 10000.0 in "
                             f"RoFormer, 500000.0 in Llama 3)")
        self.head_dim = head_dim
        self.theta = theta
        self.llama3_scaling = llama3_scaling_keys(llama3_scaling) if llama3_scaling else None

    def inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        inv_freq = rope_frequencies(self.head_dim, self.theta, device)
        if self.llama3_scaling:
            inv_freq = llama3_scale_frequencies(inv_freq, **self.llama3_scaling)
        return inv_freq

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids.float()[..., None] * self.inv_freq(position_ids.device)  # [B, T, D/2]
        angles = torch.cat((angles, angles), dim=-1)  # [B, T, D]
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_dim: int = 1) -> torch.Tensor:
    """Rotate x [B, heads, T, D] (or [B, T, heads, D] with heads_dim=2) by the per-position angles (cos/sin
    [B, T, D], broadcast over the heads)."""
    cos = cos.unsqueeze(heads_dim).to(x.dtype)
    sin = sin.unsqueeze(heads_dim).to(x.dtype)
    return x * cos + rotate_half(x) * sin
