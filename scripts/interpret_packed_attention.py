"""Our packed-document attention kernels run by Triton's interpreter on the CPU, against their torch reference.

For working on forgather/models/packed_attention_kernels.py without a GPU: the interpreter runs each program in
numpy, so a wrong mask, index or gradient shows here in seconds (compile errors and speed do not: those need
the GPU checks, `bash scripts/gpu_check_train.sh o`). Needs Triton, which CPU builds of torch do not bring:

    pip install --target /tmp/triton triton
    TRITON_INTERPRET=1 PYTHONPATH=/tmp/triton python scripts/interpret_packed_attention.py

Prints one line per case (shape, tiles) with the largest difference of the output and each gradient from
`reference_packed_attention` in fp32, and exits non-zero when one exceeds 1e-4.
"""

from __future__ import annotations

import sys

import torch
from interpret_checks import report

from forgather.models.attention import document_bounds
from forgather.models.packed_attention import packed_attention, reference_packed_attention, tiling
from forgather.triton_support import interpreting

# (batch, heads, kv heads, length, head dim, documents a row, tiles): lengths that are not multiples of the tiles,
# one-token documents, a row that is one document, groups of 1, 2 and 4, the default tiles over long documents
CASES = [
    (2, 4, 2, 100, 16, [[5, 30, 1, 64], [100]],
     {"forward": [8, 16, 4, 1], "dq": [8, 32, 4, 1], "dkdv": [16, 16, 4, 1]}),
    (1, 8, 2, 70, 16, [[1, 1, 40, 28]], {"forward": [4, 16, 4, 1], "dq": [4, 16, 4, 1], "dkdv": [4, 32, 4, 1]}),
    (1, 2, 2, 48, 32, [[20, 28]], {"forward": [16, 16, 4, 1], "dq": [16, 16, 4, 1], "dkdv": [16, 16, 4, 1]}),
    # the default tiles' proportions over long documents: most tiles lie whole inside one and skip the mask
    (2, 8, 2, 300, 16, [[300], [10, 200, 3, 87]], {"forward": [16, 64, 4, 1], "dq": [16, 32, 4, 1],
                                                   "dkdv": [16, 64, 4, 1]}),
]


def run_case(batch, heads, kv_heads, length, dim, documents, options) -> float:
    generator = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in documents])
    start, end = document_bounds(ids)

    def tensor(h: int) -> torch.Tensor:  # stored [B, T, H, D], as a layer's heads are
        return torch.randn(batch, length, h, dim, generator=generator).transpose(1, 2).requires_grad_()

    q, k, v = tensor(heads), tensor(kv_heads), tensor(kv_heads)
    grad = torch.randn(batch, heads, length, dim, generator=generator)
    reference = reference_packed_attention(q, k, v, start)
    reference.backward(grad)
    expected = [reference, q.grad, k.grad, v.grad]
    q.grad = k.grad = v.grad = None
    out = packed_attention(q, k, v, start, end, tiling(options))
    out.backward(grad)
    differences = {name: (got - want).abs().max().item()
                   for name, got, want in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), expected)}
    return report(f"B={batch} H={heads}/{kv_heads} T={length} D={dim} {options}", differences)


def main() -> int:
    if not interpreting():
        raise SystemExit("set TRITON_INTERPRET=1: the kernels run in Triton's interpreter on CPU tensors")
    worst = max(run_case(*case) for case in CASES)
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
