"""TritonAdamW's kernel run by Triton's interpreter on the CPU, against its reference and torch's fused AdamW.

For working on forgather/optim/adamw_kernels.py without a GPU: the interpreter runs each program in numpy, so
a wrong work list, address, mask or formula shows here in seconds (compile errors and speed need the GPU:
tests/gpu/test_optim_gpu.py, `bash scripts/gpu_check_train.sh y`). Needs Triton, which CPU builds of torch
do not bring:

    pip install --target /tmp/triton triton
    TRITON_INTERPRET=1 PYTHONPATH=/tmp/triton python scripts/interpret_adamw.py

Each case steps the same tensors (sizes that do not fill a block, one empty, one non-contiguous that takes the
reference path, a group without weight decay; once with clipping by global norm, folded into our kernel) with
TritonAdamW and with torch's AdamW(fused=True), and prints the largest difference of the parameters and moments
from the fused run, relative to each tensor's largest magnitude. It exits non-zero where one exceeds the case's
tolerance (fp32: 1e-6; fp16: two of its ulps; bf16, one step: one ulp, as the interpreter truncates to bf16), or
where bf16 parameters rounded stochastically are not, bit for bit, the reference rounding (rounding.py) of the
fp32 result the kernel computes, or that result is over two fp32 ulps from reference_step's, or where the norm a
step measures (request_grad_norm) is not get_total_norm's.
"""

from __future__ import annotations

import sys

import torch
from interpret_checks import relative_difference

from forgather.optim.rounding import step_seed, stochastic_round_to_bf16
from forgather.optim.triton_adamw import TritonAdamW, reference_step
from forgather.triton_support import interpreting

SHAPES = [(37, 65), (4096,), (3000,), (0,), (32, 48)]  # the second group aligned (the ALIGNED hint)
CASES = [  # (dtype, options, steps, clipping by global norm to)
    (torch.float32, dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1), 4, None),
    (torch.float32, dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1), 4, 0.5),
    # one step: the interpreter truncates to bf16 where the GPU rounds to nearest, and the steps' 1-ulp
    # differences would add up (tests/gpu/test_optim_gpu.py checks bf16 over several steps on the GPU)
    (torch.bfloat16, dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01), 1, None),
    (torch.float16, dict(lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0, maximize=True), 3, None),
]
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2.0 ** -7, torch.float16: 2 * 2.0 ** -10}


def params_of(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = [(torch.randn(shape, generator=gen) * 0.02).to(dtype).requires_grad_() for shape in SHAPES]
    # a non-contiguous parameter (a transposed view's storage): the reference path
    params.append((torch.randn(9, 6, generator=gen) * 0.02).to(dtype).t().detach().requires_grad_())
    return params


def groups(params: list[torch.Tensor]) -> list[dict]:
    return [{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0}]


def run(make, dtype: torch.dtype, options: dict, steps: int, clip):
    params = params_of(dtype)
    optimizer = make(groups(params), **options)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype).reshape(p.shape)
            if not p.is_contiguous():
                p.grad = p.grad.t().contiguous().t()
        if clip is not None:  # ours: the factor, applied in the kernel; torch's: the gradients scaled in place
            if isinstance(optimizer, TritonAdamW):
                optimizer.clip_grad_norm_(clip)
            else:
                torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
    return params, optimizer


def main() -> None:
    if not interpreting():
        raise SystemExit("run with TRITON_INTERPRET=1 (see the docstring)")
    failed = False
    for dtype, options, steps, clip in CASES:
        ours, ours_opt = run(TritonAdamW, dtype, options, steps, clip)
        fused, fused_opt = run(lambda g, **o: torch.optim.AdamW(g, fused=True, **o), dtype, options, steps, clip)
        worst = 0.0
        for a, b in zip(ours, fused):
            pairs = [(a, b)] + [(ours_opt.state[a][k], fused_opt.state[b][k]) for k in ("exp_avg", "exp_avg_sq")]
            for x, y in pairs:
                if y.numel():
                    worst = max(worst, relative_difference(x, y))
        ok = worst <= TOLERANCE[dtype]
        failed |= not ok
        clipped = f", clipped to {clip}" if clip else ""
        print(f"{str(dtype):15} {steps} steps{clipped} {options}: largest difference from fused AdamW {worst:.2e} "
              f"{'ok' if ok else 'FAIL'}")
    failed |= not stochastic_rounding_matches()
    failed |= not fp32_moments_match()
    failed |= not measured_norm_matches()
    sys.exit(1 if failed else 0)


def measured_norm_matches() -> bool:
    """request_grad_norm: the kernel's per-program sums of squares (the reference path's tensor summed beside
    them), in fp32 and bf16, give get_total_norm's value within fp32 rounding (relative 1e-6)."""
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        params = params_of(dtype)
        optimizer = TritonAdamW(groups(params), lr=1e-3)
        gen = torch.Generator().manual_seed(4)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype).reshape(p.shape)
        expected = torch.nn.utils.get_total_norm([p.grad.float() for p in params])
        optimizer.request_grad_norm()
        optimizer.step()
        got = optimizer.take_grad_norm()
        good = got is not None and bool((got - expected).abs() <= 1e-6 * expected)
        ok &= good
        print(f"{str(dtype):15} the step's measured gradient norm {got.item() if got is not None else None:.6f} "
              f"against get_total_norm {expected.item():.6f} {'ok' if good else 'FAIL'}")
    return ok


def fp32_moments_match() -> bool:
    """state_dtype=torch.float32 beside bf16 parameters, 3 steps: the moments stay fp32 and are reference_step's
    within fp32 rounding (relative to the largest), the parameters within a bf16 ulp of the largest a step (the
    interpreter truncates where the GPU rounds)."""
    options = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    ours = [p for p in params_of(torch.bfloat16) if p.is_contiguous() and p.numel()]
    theirs = [p.detach().clone() for p in ours]
    moments = [(torch.zeros_like(q, dtype=torch.float32), torch.zeros_like(q, dtype=torch.float32)) for q in theirs]
    optimizer = TritonAdamW(ours, state_dtype=torch.float32, **options)
    gen = torch.Generator().manual_seed(2)
    for step in range(1, 4):
        for p, q, (m, v) in zip(ours, theirs, moments):
            p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
            reference_step(q, p.grad, m, v, step=step, beta1=0.9, beta2=0.95, lr=options["lr"], eps=options["eps"],
                           weight_decay=options["weight_decay"], maximize=False)
        optimizer.step()
    ok = True
    for p, q, (m, v) in zip(ours, theirs, moments):
        state = optimizer.state[p]
        ok &= state["exp_avg"].dtype == torch.float32
        for mine, expected in ((state["exp_avg"], m), (state["exp_avg_sq"], v)):
            ok &= bool((mine - expected).abs().max() <= 1e-6 * expected.abs().max())
        # a bf16 ulp of the largest value a step: the interpreter's truncated stores add up
        ok &= bool((p.detach().float() - q.float()).abs().max() <= 3 * 2.0 ** -7 * q.float().abs().max())
    print(f"torch.bfloat16  3 steps, fp32 moments: the reference's within rounding {'ok' if ok else 'FAIL'}")
    return ok


def stochastic_rounding_matches() -> bool:
    """stochastic_rounding=True on bf16 parameters, one step. The rounding's noise hashes the fp32 result's bits,
    so a result one fp32 ulp off rounds the other way about half the time: comparing with reference_step's bf16
    bits counts the arithmetic's last-bit differences (the interpreter's numpy and the GPU's fused multiply-adds
    differ from torch's in ~1% of elements), not the rounding. So the two are checked apart: the kernel's bf16
    bits are exactly stochastic_round_to_bf16 of the fp32 result the kernel computes (the same step on fp32 copies
    of the parameters), and that result is within two fp32 ulps (of the step's larger term) of reference_step's."""
    options = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    ours = [p for p in params_of(torch.bfloat16) if p.is_contiguous()]
    gen = torch.Generator().manual_seed(1)
    for p in ours:
        p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
    exact = [p.detach().float().requires_grad_() for p in ours]  # the same values and gradients, in fp32
    for p, q in zip(exact, ours):
        p.grad = q.grad.float()
    references = [p.detach().float() for p in ours]
    befores = [r.clone() for r in references]
    TritonAdamW(ours, stochastic_rounding=True, seed=3, **options).step()
    TritonAdamW(exact, **options).step()
    seed = step_seed(3, 1)
    misrounded = off = total = 0
    for p, e, r, before in zip(ours, exact, references, befores):
        reference_step(r, p.grad.float(), torch.zeros_like(r), torch.zeros_like(r), step=1, beta1=0.9, beta2=0.95,
                       lr=options["lr"], eps=options["eps"], weight_decay=options["weight_decay"], maximize=False)
        e = e.detach()
        misrounded += int((p.detach().view(torch.int16) != stochastic_round_to_bf16(e, seed).view(torch.int16)).sum())
        # an ulp of the step's larger term: the old value or the update (at most lr in Adam's first step), as the
        # two cancel where they are close
        ulp = torch.finfo(torch.float32).eps * (before.abs() + options["lr"])
        off += int(((e - r).abs() > 2 * ulp).sum())
        total += p.numel()
    ok = misrounded == 0 and off == 0
    print(f"torch.bfloat16  1 step, stochastic rounding: {misrounded} of {total} elements not the reference rounding "
          f"of the kernel's fp32 result, {off} of that result over two ulps from reference_step's "
          f"{'ok' if ok else 'FAIL'}")
    return ok

if __name__ == "__main__":
    main()
