"""ApolloAdamW (Zhu et al., 2024, "APOLLO: SGD-like Memory, AdamW-level Performance").

Our implementation on LowRankAdamW (see lowrank.py): the projection is a random Gaussian matrix (entries
N(0, 1/rank)), redrawn every `update_proj_gap` steps from a generator seeded with (seed, the parameter's place,
the step). Adam runs on the
projected gradient R only to estimate how much to scale each channel of the raw gradient:
    s = ||N_channel|| / (||R_channel|| + 1e-8)    (scale_type="channel"; "tensor": one s for the whole tensor)
    update = scale * s * G, then the norm-growth limiter: ||update_t|| <= gamma ||update_{t-1}|| (gamma = 1.01)
rank=1 with scale_type="tensor" is APOLLO-Mini (the paper uses scale = sqrt(128) there; apollo-torch's `scale`
is the square of ours). With the same projection it matches apollo-torch 1.0.3 to fp32 rounding. Why not the
`apollo-torch` package: it imports bitsandbytes at import time and keeps projector objects in the optimizer
state, which `torch.load(weights_only=True)` (torch's default) refuses. The state dict holds the current
projections; the next ones are a function of the saved step, so a resumed run draws the projections the
uninterrupted one would have drawn, whichever way its state was saved (torch.save of state_dict(), or
torch.distributed.checkpoint, which keeps only the parameters' state and the groups: a generator of the
optimizer's own was lost there).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from forgather.optim.state import Layout, Params
from forgather.optim.lowrank import LowRankAdamW, channel_norm

NORM_GROWTH_LIMIT = 1.01


class ApolloAdamW(LowRankAdamW):
    def __init__(self, params: Params, scale_type: str = "channel", seed: int = 0, **kwargs: Any):
        if scale_type not in ("channel", "tensor"):
            raise ValueError(f"scale_type must be 'channel' or 'tensor', got {scale_type!r}")
        kwargs.setdefault("rank", 256)
        super().__init__(params, **kwargs)
        self.scale_type = scale_type
        self.seed = seed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # a state saved with a generator of its own (before 2026-12-07) loads; its draws come from the steps now
        super().load_state_dict({key: value for key, value in state_dict.items() if key != "generator"})

    def state_layout(self, param: torch.Tensor, group: dict[str, Any]) -> Layout:
        needed, allowed = super().state_layout(param, group)
        if "projection" in needed:  # the norm-growth limiter's last norm, set at every low-rank step
            needed["update_norm"] = None
        return needed, allowed

    def new_projection(self, grad: torch.Tensor, rank: int, right: bool, draw: tuple[int, int]) -> torch.Tensor:
        size = grad.shape[1] if right else grad.shape[0]
        # (seed, place, step) mixed into one seed; torch's CPU generator keeps 32 bits of it
        key = hashlib.blake2b(f"{self.seed}:{draw[0]}:{draw[1]}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key, "little"))
        projection = torch.randn(rank, size, generator=generator) / rank**0.5
        return projection.to(grad.device)

    def full_rank_update(
        self, grad: torch.Tensor, low_rank_grad: torch.Tensor, direction: torch.Tensor, state: dict[str, Any],
        group: dict[str, Any],
    ) -> torch.Tensor:
        if self.scale_type == "channel":
            right = grad.shape[0] >= grad.shape[1]
            factor = channel_norm(direction, right) / (channel_norm(low_rank_grad, right) + 1e-8)
        else:
            factor = direction.norm() / (low_rank_grad.norm() + 1e-8)
        update = grad * factor * group["scale"]
        # The limiter sees the update without Adam's bias correction, as the reference implementation does.
        beta1, beta2 = group["betas"]
        t = state["step"].item() + 1
        norm = update.norm() * (1 - beta1**t) / (1 - beta2**t) ** 0.5
        if "update_norm" in state:
            limit = NORM_GROWTH_LIMIT * state["update_norm"]
            update = update * (limit / norm).clamp(max=1.0)
            norm = torch.minimum(norm, limit)
        state["update_norm"] = norm
        return update
