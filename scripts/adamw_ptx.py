"""TritonAdamW's kernel compiled for a Hopper GPU on the CPU: are its loads and stores vectorized?

Triton compiles for a GPU it does not have (its own ptxas ships in the wheel), so the PTX of
forgather/optim/adamw_kernels.py can be read without one. The step streams 14 bytes an element; scalar 2-byte
loads (`ld.global.b16`) left it at 1.8-2.8 TB/s on an H100/H200 (docs/benchmarks.md), and the `ALIGNED` hint is
meant to turn them into 16-byte ones (`ld.global.v4.b32`). This prints, for bf16 and fp32 tensors, each
BLOCK x num_warps of adamw_kernels.SWEEP and the hint off and on, the kernel's registers a thread and its global
loads and stores by width, and exits non-zero where the hinted kernel still moves any parameter, gradient or
moment element by element.
Needs Triton, which CPU builds of torch do not bring:

    pip install --target /tmp/triton triton
    PYTHONPATH=/tmp/triton python scripts/adamw_ptx.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from forgather.optim import adamw_kernels

HOPPER = GPUTarget("cuda", 90, 32)
SCALARS = dict(programs="i32", tensors="i32", seed="i32", lr_weight_decay="fp32", beta1="fp32",
               one_minus_beta1="fp32", beta2="fp32", one_minus_beta2="fp32", step_size="fp32",
               bias_correction2_sqrt="fp32", eps="fp32")
POINTERS = dict(addresses="*i64", numels="*i64", work="*i32", grad_scale="*fp32", norm_partials="*fp32")


def memory_ops(dtype: str, aligned: bool, block: int, num_warps: int, norm: bool = False
               ) -> tuple[Counter, Counter, str]:
    """The kernel's global loads and stores in PTX, counted by instruction (`ld.global.v4.b32`: 16 bytes), and
    its registers a thread (cuobjdump of the cubin: fewer resident programs where there are more)."""
    kernel = adamw_kernels.adamw_multi_tensor
    tensors = dict(param0=f"*{dtype}", grad0=f"*{dtype}", state0=f"*{dtype}")
    types = {**SCALARS, **POINTERS, **tensors}
    constants = dict(MAXIMIZE=False, HAS_GRAD_SCALE=False, HAS_NORM=norm, STOCHASTIC_ROUNDING=False, ALIGNED=aligned,
                     BLOCK=block)
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(name),): value for name, value in constants.items()})
    compiled = triton.compile(source, target=HOPPER, options=dict(num_warps=num_warps))
    ptx = compiled.asm["ptx"]
    return (Counter(re.findall(r"ld\.global[\w.]*", ptx)), Counter(re.findall(r"st\.global[\w.]*", ptx)),
            registers(compiled.asm["cubin"]))


def registers(cubin: bytes) -> str:
    """REG:n of `cuobjdump --dump-resource-usage` (the cuobjdump Triton's wheel ships), or '?' without it."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(cubin)
        try:
            usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        except OSError:
            return "?"
    found = re.search(r"REG:(\d+)", usage)
    return found.group(1) if found else "?"


def main() -> int:
    # The element-wide instructions of each dtype; the kernel's own scalars (its work list, addresses and sizes:
    # b32/b64 loads) are not the tensors' and are left out of the check.
    element_wide = {"bf16": ("ld.global.b16", "st.global.b16"), "fp32": ("ld.global.b32", "st.global.b32")}
    failures = 0
    print(f"{'dtype':5} {'block':>5} {'warps':>5} {'aligned':7} {'regs':>4}  loads / stores")
    # the sweep, then the default tiling measuring the gradient norm (HAS_NORM: one more fp32 store a program)
    runs = [(block, num_warps, aligned, False) for block, num_warps in adamw_kernels.SWEEP for aligned in (False, True)]
    runs.append((adamw_kernels.BLOCK, adamw_kernels.NUM_WARPS, True, True))
    for dtype, (scalar_load, scalar_store) in element_wide.items():
        for block, num_warps, aligned, norm in runs:
            loads, stores, regs = memory_ops(dtype, aligned, block, num_warps, norm)
            # fp32 scalars also come from the tables' 32-bit work list: only stores tell for fp32 (less the norm's
            # one partial sum a program).
            elementwise = stores[scalar_store] - (norm and dtype == "fp32") + (loads[scalar_load] if dtype == "bf16" else 0)
            bad = aligned and elementwise > 0
            failures += bad
            print(f"{dtype:5} {block:5d} {num_warps:5d} {str(aligned):7} {regs:>4}  {dict(loads)} / {dict(stores)}"
                  + ("  (measuring the norm)" if norm else "") + ("  <- not vectorized" if bad else ""))
    print("all hinted kernels vectorized" if not failures else f"{failures} hinted kernels not vectorized")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
