"""Our fused residual add + RMSNorm kernels run by Triton's interpreter on the CPU, against `norm.rms_norm`.

For working on forgather/models/fused_rms_norm_kernels.py without a GPU: the interpreter runs each program in
numpy, so a wrong index, mask or gradient shows here in seconds (compile errors and speed need the GPU:
tests/gpu/test_models_gpu.py, `bash scripts/gpu_check_train.sh u`). Needs Triton, which CPU builds of torch do
not bring:

    pip install --target /tmp/triton triton
    TRITON_INTERPRET=1 PYTHONPATH=/tmp/triton python scripts/interpret_fused_rms_norm.py

Prints one line per case with the largest difference of each output and gradient from autograd through the
torch expression, relative to that tensor's largest magnitude, and exits non-zero when one exceeds the case's
tolerance (fp32: 1e-5; bf16: 2 of its ulps, 1.6e-2).
"""

from __future__ import annotations

import sys

import torch
from interpret_checks import relative_differences, report

from forgather.models import fused_rms_norm
from forgather.models.fused_rms_norm import add_rms_norm, rms_norm
from forgather.models.norm import add_rms_norm as reference_add_rms_norm
from forgather.models.norm import rms_norm as reference_rms_norm
from forgather.triton_support import interpreting

# (leading shape, hidden, dtype, with the residual add, tiling): rows that do not fill the last program or
# iteration, a hidden size that is not a power of two, weights in fp32 beside bf16 activations
CASES = [
    ((2, 5), 48, torch.float32, True, {"forward": (1, 4), "backward": (2, 4, 1)}),
    ((3, 7), 40, torch.float32, False, {"forward": (2, 4), "backward": (4, 4, 2)}),
    ((1, 33), 64, torch.bfloat16, True, {"forward": (1, 8), "backward": (2, 8, 2)}),
    ((4, 9), 96, torch.bfloat16, False, {"forward": (4, 4), "backward": (1, 4, 1)}),
]


def run_case(shape, hidden, dtype, residual, tiling, weight_dtype=None) -> float:
    generator = torch.Generator().manual_seed(0)

    def tensor(*size, dtype=dtype):
        return torch.randn(*size, generator=generator).to(dtype).requires_grad_()

    x, delta = tensor(*shape, hidden), tensor(*shape, hidden)
    weight = (1 + 0.1 * torch.randn(hidden, generator=generator)).to(weight_dtype or dtype).requires_grad_()
    dy = torch.randn(*shape, hidden, generator=generator).to(torch.promote_types(dtype, weight.dtype))
    ds = torch.randn(*shape, hidden, generator=generator).to(dtype)

    def run(fused: bool):
        for t in (x, delta, weight):
            t.grad = None
        if residual:
            s, y = (add_rms_norm if fused else reference_add_rms_norm)(x, delta, weight, 1e-5)
            torch.autograd.backward([y, s], [dy, ds])
            return [y, s, x.grad, delta.grad, weight.grad]
        y = (rms_norm if fused else reference_rms_norm)(x, weight, 1e-5)
        y.backward(dy)
        return [y, x.grad, weight.grad]

    fused_rms_norm.NORM_TILING.update(tiling)
    expected, got = run(False), run(True)
    names = ["y", "s", "dx", "ddelta", "dweight"] if residual else ["y", "dx", "dweight"]
    worst = report(f"{tuple(shape)} x {hidden} {dtype} weight {weight.dtype} residual={residual} {tiling}",
                   relative_differences(names, got, expected))
    return worst / (1e-5 if dtype == torch.float32 else 1.6e-2)


def main() -> int:
    if not interpreting():
        raise SystemExit("set TRITON_INTERPRET=1: the kernels run in Triton's interpreter on CPU tensors")
    worst = max([run_case(*case) for case in CASES]
                + [run_case((2, 6), 32, torch.bfloat16, True, CASES[2][-1], weight_dtype=torch.float32)])
    return 0 if worst <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
