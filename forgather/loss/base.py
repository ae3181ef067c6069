"""The causal-LM loss interface: label shifting, ignore-index and option checks, done once for every loss.

`CausalLMLoss.forward(hidden [B, T, H], weight [V, H], labels [B, T])` shifts the labels by one (the target
of position t is labels[t + 1]; the last position of each row gets `ignore_index`), flattens the tokens and
calls `token_loss(hidden [N, H], weight, targets [N])` of the implementation, which returns the mean over
the non-ignored tokens of cross-entropy (+ `z_loss` * logsumexp^2 when set; logits soft-capped as
`softcap * tanh(logits / softcap)` when set), 0 with a zero gradient when every target is ignored. Hidden states
are never copied: shifting moves labels only.

Checked here for every implementation: labels of any integer dtype (taken as int64), each target in [0, V) or
`ignore_index` (asserted on the device, without making the host wait: the Triton kernels would read past the
logits row and return a wrong value silently), and hidden and weight of one dtype unless autocast is on (under
autocast the matmuls run in its dtype). Losses are computed in fp32, or fp64 for fp64 inputs.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from forgather.models.checks import is_number

IGNORE_INDEX = -100


class MissingExtraError(ImportError):
    """An implementation whose optional package is not installed; the message names the extra."""


def require_extra(loss_name: str, package: str, module: str) -> None:
    """Import `module` or raise MissingExtraError naming the pip package and forgather's extra."""
    try:
        __import__(module)
    except ImportError as exc:
        raise MissingExtraError(f"loss {loss_name!r} needs {package}: pip install 'forgather[gpu]'") from exc


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token targets [B, T] -> flat [B * T]: targets[b, t] = labels[b, t + 1], the last one ignored."""
    targets = labels.new_full(labels.shape, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    return targets.reshape(-1)


class CausalLMLoss(nn.Module):
    """Mean next-token cross-entropy from hidden states and the output projection (see module docstring)."""

    name: ClassVar[str] = "base"
    supports_z_loss: ClassVar[bool] = False
    supports_softcap: ClassVar[bool] = False

    def __init__(self, ignore_index: int = IGNORE_INDEX, z_loss: float = 0.0, softcap: float | None = None):
        super().__init__()
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"{type(self).__name__}(ignore_index={ignore_index!r}): ignore_index takes the integer "
                             f"label that marks padding, e.g. {IGNORE_INDEX}")
        if not is_number(z_loss) or not math.isfinite(z_loss) or z_loss < 0:
            raise ValueError(f"{type(self).__name__}(z_loss={z_loss!r}): z_loss takes a number >= 0, e.g. 1e-4")
        if softcap is not None and (not is_number(softcap) or not math.isfinite(softcap) or softcap <= 0):
            raise ValueError(f"{type(self).__name__}(softcap={softcap!r}): softcap takes a number > 0, e.g. 30.0")
        if z_loss and not self.supports_z_loss:
            raise ValueError(f"loss {self.name!r} does not support z_loss; use 'naive', 'chunked' or 'liger'")
        if softcap is not None and not self.supports_softcap:
            raise ValueError(f"loss {self.name!r} does not support softcap; use 'naive', 'chunked', 'liger' or 'cce'")
        self.ignore_index = ignore_index
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
            raise ValueError(
                f"expected hidden [B, T, H] and labels [B, T], got {tuple(hidden.shape)} and {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer token ids (the input ids), got a {labels.dtype} tensor")
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
            raise ValueError(f"weight must be [V, H] with H the hidden size {hidden.shape[2]}, "
                             f"got {tuple(weight.shape)}")
        if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
            raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}: give both one dtype, or call the "
                             "loss under torch.autocast (Lightning's '-mixed' precisions)")
        targets = shift_labels(labels.long(), self.ignore_index)
        vocab = weight.shape[0]
        in_range = (targets == self.ignore_index) | ((targets >= 0) & (targets < vocab))
        torch._assert_async(in_range.all(), f"labels must be token ids in [0, {vocab}) or ignore_index "
                                            f"({self.ignore_index})")
        return self.token_loss(hidden.reshape(-1, hidden.shape[-1]), weight, targets)

    def check_chunk_size(self, chunk_size: object) -> None:
        """For the losses that take `chunk_size` tokens at a time."""
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"{type(self).__name__}(chunk_size={chunk_size!r}): chunk_size takes a number of tokens "
                             ">= 1, e.g. 1024")

    def token_loss(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss over the tokens of hidden [N, H] whose targets [N] are not ignore_index."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, z_loss={self.z_loss}, softcap={self.softcap}"
