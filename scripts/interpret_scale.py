"""chunked.scale_unless_one's Triton kernel run by Triton's interpreter on the CPU, against scale_in_place.

For working on forgather/loss/scale_kernels.py without a GPU (the exact bf16 check and the speed need one:
tests/gpu/test_loss_gpu.py, `bash scripts/gpu_check_train.sh blas`). Needs Triton, which CPU builds of torch do
not bring:

    pip install --target /tmp/triton triton
    TRITON_INTERPRET=1 PYTHONPATH=/tmp/triton python scripts/interpret_scale.py

fp32 tensors (the interpreter truncates to bf16, so bf16 would not be exact here) of sizes that do and do not
fill a block, one empty, one larger than the programs cover in one stride; each with a factor of 1 (nothing
may change) and of 0.37 (the fp32 product). Exits non-zero on the first difference.
"""

from __future__ import annotations

import sys

import torch

from forgather.loss.chunked import SCALE_BLOCK, scale_in_place, scale_unless_one
from forgather.triton_support import interpreting

SIZES = [(0,), (5000,), (3, 4097), (SCALE_BLOCK * 2 * 4 + 17,)]  # the last strides (2 SMs x 4 programs)


def main() -> None:
    if not interpreting():
        sys.exit("run with TRITON_INTERPRET=1 (and Triton on PYTHONPATH)")
    failures = 0
    for size in SIZES:
        for value in (1.0, 0.37):
            x = torch.randn(size, generator=torch.Generator().manual_seed(len(size)))
            expected = x.clone()
            scale_in_place(expected, torch.tensor(value))
            got = x.clone()
            scale_unless_one(got, torch.tensor(value))
            same = torch.equal(got, expected) and (value != 1.0 or torch.equal(got, x))
            failures += not same
            print(f"{str(size):>16} factor {value}: {'same' if same else 'DIFFERENT'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
