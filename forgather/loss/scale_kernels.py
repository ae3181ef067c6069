"""Triton kernel behind chunked.scale_unless_one: x *= factor in place, skipped on the device when factor is 1.

The factor is an fp32 device scalar (the loss's incoming gradient); asking the host whether it is 1 would make
the host wait for the GPU. Each program reads it and returns at once when it is exactly 1, so the usual case
(`loss.backward()` on the loss itself) costs one launch instead of a read and a write of the whole tensor
(the head's weight gradient: 525 MB at vocab 128k, hidden 2,048, bf16; ~245 us on an H200). Otherwise the
product is taken in fp32 and rounded once to x's dtype, as scale_in_place does. Programs stride over the
flat tensor (a few per SM), with int64 offsets (V x H may pass 2^31 elements).

Imported only where a GPU runs the kernel (or TRITON_INTERPRET=1 runs it on CPU tensors).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _scale_unless_one(x_ptr, factor_ptr, n, BLOCK: tl.constexpr):
    factor = tl.load(factor_ptr)
    if factor != 1.0:
        start = tl.program_id(0).to(tl.int64) * BLOCK
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for offset in range(start, n, step):
            offsets = offset + tl.arange(0, BLOCK)
            mask = offsets < n
            x = tl.load(x_ptr + offsets, mask=mask)
            tl.store(x_ptr + offsets, (x.to(tl.float32) * factor).to(x.dtype), mask=mask)
