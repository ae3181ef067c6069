"""GaLoreAdamW (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection").

Our implementation on LowRankAdamW (see lowrank.py): the projection is the top-`rank` singular vectors of the
gradient, recomputed by SVD every `update_proj_gap` steps; the update is the Adam direction projected back,
times `scale` (GaLore's alpha, 0.25 in the paper). It matches galore-torch 1.0 to fp32 rounding (weight
decay aside: we decay before the update, as torch.optim.AdamW does). Why not the `galore-torch` package: it imports bitsandbytes
at import time and keeps projector objects in the optimizer state, which `torch.load(weights_only=True)`
(torch's default) refuses.
"""

from __future__ import annotations

from typing import Any

import torch

from forgather.optim.lowrank import LowRankAdamW


class GaLoreAdamW(LowRankAdamW):
    def new_projection(self, grad: torch.Tensor, rank: int, right: bool, draw: tuple[int, int]) -> torch.Tensor:
        u, _, vh = torch.linalg.svd(grad, full_matrices=False)
        return vh[:rank].contiguous() if right else u[:, :rank].t().contiguous()

    def full_rank_update(
        self, grad: torch.Tensor, low_rank_grad: torch.Tensor, direction: torch.Tensor, state: dict[str, Any],
        group: dict[str, Any],
    ) -> torch.Tensor:
        projection = state["projection"]
        right = grad.shape[0] >= grad.shape[1]
        back = direction @ projection if right else projection.t() @ direction
        return back * group["scale"]
