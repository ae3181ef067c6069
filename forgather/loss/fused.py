"""FusedLoss: the default fused linear cross-entropy on GPU, the best measured choice with our tuning.

Chosen from scripts/bench_loss.py on an H100 (docs/benchmarks.md, "Fused linear cross-entropy"): Liger's
kernel with chunks twice Liger's default (`chunk_mem_const=2`: 1024-token chunks at hidden 4096 / vocab 128k),
0.88x Liger's time for +0.12 GiB; 4 gives 0.84x for +0.36 GiB. Cut-Cross-Entropy keeps the least memory
(the gradients alone) but ran 3.4x slower than Liger there. Without liger-kernel the error names the extra;
ChunkedLoss is the choice that needs no extra.
"""

from __future__ import annotations

from forgather.loss.base import IGNORE_INDEX
from forgather.loss.liger import LigerLoss

DEFAULT_CHUNK_MEM_CONST = 2


class FusedLoss(LigerLoss):
    name = "fused"

    def __init__(
        self,
        chunk_mem_const: int = DEFAULT_CHUNK_MEM_CONST,
        ignore_index: int = IGNORE_INDEX,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ):
        super().__init__(chunk_mem_const=chunk_mem_const, ignore_index=ignore_index, z_loss=z_loss, softcap=softcap)
