"""One Triton kernel for AdamW's step over many tensors in one launch (the math: triton_adamw.reference_step).

Each program updates BLOCK consecutive elements of one tensor. It reads which tensor and which block from the
work list (`work`: row 0 the tensor's index, row 1 the block's, one column a program, built once per set of
tensor sizes), the tensor's four addresses from the address table (`addresses`: rows parameter, gradient,
first moment, second moment; int64, one column a tensor), then streams the four in and the parameter and the
two moments out: 14 bytes an element in bf16, the least AdamW can move. The arithmetic is fp32 whatever the
tensors' dtypes, in the order of torch's fused AdamW kernel (ATen's fused_adam_utils.cuh), rounded once on
the store. ALIGNED (every address of the bucket a multiple of 16 bytes and every size a multiple of 16 elements,
which the host checks) tells the compiler so: an address read from the table, and a size, carry no alignment
Triton can see, and without the hint it cannot prove a load or store of several elements aligned (unhinted, the
step streamed 1.8 TB/s on an H100 at BLOCK 2048, 2026-12-05). The hint goes on the pointers, after the cast
from the table's integers: put on the integers it is lost in the cast and every access stays 2 bytes wide
(scripts/adamw_ptx.py reads the compiled PTX on a CPU and checks for 16-byte accesses). `grad_scale` (where
HAS_GRAD_SCALE) points at one fp32 factor for every gradient: clipping by global norm, applied as the gradient is read instead of by a pass of
its own. HAS_NORM: each program also stores the sum of its gradients' squares (as read, before any
scaling) to `norm_partials[pid]`, from which the host sums the step's gradient norm for logging, without a pass
over the gradients of its own (TritonAdamW.request_grad_norm). STOCHASTIC_ROUNDING (bf16 parameters) rounds the new parameter as forgather/optim/rounding.py does,
bit for bit, with `seed` the step's.

Why not torch's fused AdamW: its multi-tensor launcher hands each CUDA block a fixed chunk with per-launch
tensor lists of bounded length, and it streamed a 1.24B bf16 model's step at 2.7 TB/s of the H200's 4.8
(docs/benchmarks.md); the same arithmetic compiled by inductor streamed 3.9 TB/s but compiles for ~30-60 s
on first use. One launch with a flat work list costs one Triton compile (seconds) per dtype combination.
"""

from __future__ import annotations

import triton
import triton.language as tl

from forgather.optim.adafactor_kernels import _stochastic_round_bits

# Elements a program: the best of the H100's sweep (5.85 ms a 1.24B step, hinted; bench_step_pieces.py sweeps it).
BLOCK = 1024
NUM_WARPS = 4
# The (BLOCK, num_warps) pairs scripts/bench_step_pieces.py times on a GPU and scripts/adamw_ptx.py compiles on a CPU.
SWEEP = [(512, 4), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8)]


@triton.jit(do_not_specialize=["seed"])  # a new seed each step must not mean a new compilation
def adamw_multi_tensor(
    addresses, numels, work, programs, tensors, grad_scale, norm_partials, seed, param0, grad0, state0,
    lr_weight_decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps,
    MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_NORM: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    # The bucket's dtypes, from one tensor of each kind (param0, grad0, state0: one non-empty tensor's)
    PARAM = param0.dtype.element_ty
    GRAD = grad0.dtype.element_ty
    STATE = state0.dtype.element_ty
    pid = tl.program_id(0)
    t = tl.load(work + pid)
    block = tl.load(work + programs + pid).to(tl.int64)
    n = tl.load(numels + t)
    param_address = tl.load(addresses + t)
    grad_address = tl.load(addresses + tensors + t)
    exp_avg_address = tl.load(addresses + 2 * tensors + t)
    exp_avg_sq_address = tl.load(addresses + 3 * tensors + t)
    param_ptr = param_address.to(tl.pointer_type(PARAM))
    grad_ptr = grad_address.to(tl.pointer_type(GRAD))
    exp_avg_ptr = exp_avg_address.to(tl.pointer_type(STATE))
    exp_avg_sq_ptr = exp_avg_sq_address.to(tl.pointer_type(STATE))
    if ALIGNED:  # vectorized loads and stores (module docstring)
        n = tl.multiple_of(n, 16)
        param_ptr = tl.multiple_of(param_ptr, 16)
        grad_ptr = tl.multiple_of(grad_ptr, 16)
        exp_avg_ptr = tl.multiple_of(exp_avg_ptr, 16)
        exp_avg_sq_ptr = tl.multiple_of(exp_avg_sq_ptr, 16)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    param = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:  # the gradients as they are, before clipping's factor (masked elements read as 0)
        tl.store(norm_partials + pid, tl.sum(grad * grad, axis=0))
    if HAS_GRAD_SCALE:  # clipping by global norm, folded in (triton_adamw.TritonAdamW.clip_grad_norm_)
        grad = grad * tl.load(grad_scale)
    if MAXIMIZE:
        grad = -grad
    param = param - lr_weight_decay * param
    exp_avg = beta1 * exp_avg + one_minus_beta1 * grad
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * grad * grad
    # IEEE square root and divisions (tl.sqrt and `/` are approximate on NVIDIA GPUs), as the C++ of torch's kernel
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
    param = param - tl.div_rn(step_size * exp_avg, denom)
    if STOCHASTIC_ROUNDING:  # bf16 parameters: rounding.py's stochastic rounding, the element's index in its tensor
        param = _stochastic_round_bits(param, offsets, seed)
    tl.store(param_ptr + offsets, param.to(PARAM), mask=mask)
    tl.store(exp_avg_ptr + offsets, exp_avg.to(STATE), mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq.to(STATE), mask=mask)
