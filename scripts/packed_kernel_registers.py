"""Registers a thread of our packed attention kernels at sm_90, compiled on a machine without a GPU.

The kernels' occupancy on Hopper is set by their registers (Nsight Compute, docs/benchmarks.md: dk/dv at 246 a
thread leave room for two programs an SM), and a change to their code moves them. This compiles each kernel for
sm_90 as torch's launcher specializes it at the training bench's shape (pointers and the multiples of 16 among
the integers marked divisible by 16) and reads the registers of the cubin with Triton's own cuobjdump. Use the
Triton of the GPU machine's torch (torch 2.11: Triton 3.7). Against what Nsight Compute read on the H200
(2026-12-04), for the kernels before and after that day's change: dq 92 and 98, the same; the forward 117 and
163 against 127 and 160; dk/dv 216 and 243 against 246 and 252. A guide to which way a change moves, not a count.

    pip install --target /tmp/triton37 triton==3.7.0
    PYTHONPATH=/tmp/triton37 python scripts/packed_kernel_registers.py [--kernels FILE] [KERNEL:BM,BN,WARPS,STAGES ...]
    PYTHONPATH=/tmp/triton37 python scripts/packed_kernel_registers.py --norm 2048    # the fused RMSNorm's kernels

Without tilings, each kernel at its default (`packed_attention.TILING`); `--kernels` compiles another revision of
packed_attention_kernels.py (e.g. `git show REV:forgather/models/packed_attention_kernels.py > FILE`). `--norm`
compiles the fused RMSNorm's two kernels (fused_rms_norm_kernels.py) at `fused_rms_norm.NORM_TILING` instead,
which also shows a compile error that Triton's interpreter cannot.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import tempfile
from pathlib import Path

KERNELS_FILE = Path(__file__).resolve().parents[1] / "forgather" / "models" / "packed_attention_kernels.py"
POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "DO": "*bf16", "DQ": "*bf16", "DK": "*bf16",
            "DV": "*bf16", "START": "*i32", "END": "*i32", "LSE": "*fp32", "DELTA": "*fp32"}
NOT_MULTIPLES_OF_16 = {"kv_heads"}  # 8 at the bench's shape; T (2,048) and every stride are multiples of 16


def compiled_registers(kernel, launch: dict, pointers: dict[str, str], not_multiples_of_16=frozenset()) -> int:
    """Registers a thread of `kernel` (a triton.jit function) compiled for sm_90 with the constants and launch
    options of `launch` (num_warps, num_stages), its pointer arguments typed by `pointers`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launch = dict(launch)
    options = {name: launch.pop(name) for name in ("num_warps", "num_stages") if name in launch}
    names = kernel.arg_names
    constants = {name: value for name, value in launch.items() if name in names}
    signature = {name: "constexpr" if name in constants else pointers.get(name, "i32") for name in names}
    divisible = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
                 if name not in constants and name not in not_multiples_of_16}
    source = ASTSource(kernel, signature, constexprs={(names.index(n),): v for n, v in constants.items()},
                       attrs=divisible)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"), "-res-usage",
                                cubin.name], capture_output=True, text=True, check=True).stdout
    return int(usage.split("REG:")[1].split()[0])


def registers(kernel, tiles: tuple[int, int, int, int], head_dim: int = 64, group: int = 4) -> int:
    """Registers a thread of a packed attention kernel compiled for sm_90 with these tiles."""
    import torch

    from forgather.models.packed_attention import launch_constants

    launch = launch_constants(tiles, head_dim, torch.bfloat16, GROUP=group, sm_scale=1.0 / math.sqrt(head_dim))
    return compiled_registers(kernel, launch, POINTERS, NOT_MULTIPLES_OF_16)


def norm_registers(hidden: int) -> None:
    """The fused RMSNorm kernels' registers at NORM_TILING, bf16 rows of `hidden`, with and without the residual."""
    from forgather.models import fused_rms_norm_kernels as kernels
    from forgather.models.fused_rms_norm import NORM_TILING, launch_constants

    pointers = {name: "*bf16" for name in ("X", "DELTA", "W", "Y", "S", "DY", "DS", "DX")}
    pointers.update(RSTD="*fp32", DW_PARTIAL="*fp32")
    for name, kernel, flag in (("forward", kernels._rms_norm_forward, "HAS_DELTA"),
                               ("backward", kernels._rms_norm_backward, "HAS_DS")):
        for residual in (True, False):
            extra = dict(eps=1e-5) if name == "forward" else {}
            count = compiled_registers(kernel, launch_constants(name, hidden, **{flag: residual}, **extra), pointers)
            print(f"norm {name} {NORM_TILING[name]} hidden {hidden}, residual {residual}: {count} registers",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tilings", nargs="*", metavar="KERNEL:BM,BN,WARPS,STAGES",
                        help="kernel (forward, dq, dkdv) and tiles; default: each kernel at TILING's")
    parser.add_argument("--kernels", default=str(KERNELS_FILE), help="the kernels' file (default: ours)")
    parser.add_argument("--norm", type=int, metavar="HIDDEN",
                        help="instead: the fused RMSNorm kernels (fused_rms_norm.py) at NORM_TILING, rows of HIDDEN")
    args = parser.parse_args()
    if args.norm:
        norm_registers(args.norm)
        return
    spec = importlib.util.spec_from_file_location("packed_attention_kernels", args.kernels)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kernels = {"forward": module._packed_attention_forward, "dq": module._packed_attention_dq,
               "dkdv": module._packed_attention_dkdv}
    if args.tilings:
        runs = [(name, tuple(int(x) for x in tiles.split(","))) for name, tiles in
                (tiling.split(":") for tiling in args.tilings)]
    else:
        from forgather.models.packed_attention import TILING
        runs = [(name, tuple(TILING[name])) for name in kernels]
    for name, tiles in runs:
        print(f"{name} {'x'.join(map(str, tiles[:2]))} w{tiles[2]} s{tiles[3]}: {registers(kernels[name], tiles)} "
              f"registers", flush=True)


if __name__ == "__main__":
    main()
