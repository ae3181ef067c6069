"""Our SwiGLU gate kernels run by Triton's interpreter on the CPU, against `fused_swiglu.reference_swiglu`.

For working on forgather/models/fused_swiglu_kernels.py without a GPU: a wrong offset, mask or gradient shows
here in seconds (compile errors and speed need the GPU: tests/gpu/test_models_gpu.py -k swiglu). Needs Triton,
which CPU builds of torch do not bring:

    pip install --target /tmp/triton triton
    TRITON_INTERPRET=1 PYTHONPATH=/tmp/triton python scripts/interpret_fused_swiglu.py

Prints one line per case with the largest difference of h, dg and du from autograd through the reference,
relative to that tensor's largest magnitude, and exits non-zero when one exceeds the case's tolerance (fp32:
1e-5; bf16: one ulp, 7.9e-3).
"""

from __future__ import annotations

import sys

import torch
from interpret_checks import relative_differences, report

from forgather.models import fused_swiglu
from forgather.models.fused_swiglu import reference_swiglu, swiglu
from forgather.triton_support import interpreting

# (leading shape, columns, dtype, tiling, halves of one product): a row that does not fill its last program, the
# two halves of one gate/up product (views with a row stride twice their width)
CASES = [
    ((3, 5), 40, torch.float32, (16, 4), False),
    ((2, 7), 96, torch.bfloat16, (64, 4), False),
    ((4, 3), 48, torch.bfloat16, (32, 2), True),
    ((1, 9), 64, torch.float32, (64, 4), True),
]


def run_case(shape, cols, dtype, tiling, halves) -> float:
    generator = torch.Generator().manual_seed(0)
    if halves:
        product = (3 * torch.randn(*shape, 2 * cols, generator=generator)).to(dtype).requires_grad_()
        gate, up = product.chunk(2, dim=-1)
        leaves = [product]
    else:
        gate, up = ((3 * torch.randn(*shape, cols, generator=generator)).to(dtype).requires_grad_()
                    for _ in range(2))
        leaves = [gate, up]
    dh = torch.randn(*shape, cols, generator=generator).to(dtype)

    def run(fn):
        for t in leaves:
            t.grad = None
        h = fn(gate, up)
        h.backward(dh)
        return [h.detach().clone(), *(t.grad.clone() for t in leaves)]

    fused_swiglu.SWIGLU_TILING = tiling
    expected, got = run(reference_swiglu), run(swiglu)
    names = ["h", "d(gate, up)"] if halves else ["h", "dg", "du"]
    worst = report(f"{tuple(shape)} x {cols} {dtype} {tiling} halves={halves}",
                   relative_differences(names, got, expected))
    return worst / (1e-5 if dtype == torch.float32 else 7.9e-3)


def main() -> int:
    if not interpreting():
        print("set TRITON_INTERPRET=1 (and PYTHONPATH to a Triton install): the kernels run on CPU tensors only "
              "under Triton's interpreter", file=sys.stderr)
        return 2
    worst = max(run_case(*case) for case in CASES)
    print(f"worst / tolerance: {worst:.2f}")
    return 0 if worst <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
