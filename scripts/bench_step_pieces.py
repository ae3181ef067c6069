"""Two pieces of the 1.24B training step (issue 17) under their options, each beside its default, one run.

- attention: flex attention forward + backward at the step's shape (4 x 2048 tokens, 32 query / 8 kv heads of
  64, bf16), compiled, for a causal mask (bench_train's rows: one document each; every option set) and a
  packed one (documents of random lengths; the first two sets), under `kernel_options` sets
  (torch.nn.attention.flex_attention.FlexKernelOptions): the default; ROWS_GUARANTEED_SAFE (each query sees
  itself: true of every mask forgather.models.attention builds) + BLOCKS_ARE_CONTIGUOUS (true of a causal
  mask; not of packed documents, whose partial blocks sit at document boundaries and on the diagonal: the
  packed row shows what breaks); those with TMA; with other block sizes. Beside them SDPA with is_causal,
  and flash attention's variable-length kernels (torch.nn.attention.varlen; FlashAttention-4's too where the
  flash-attn-4 package is installed) on the packed row, each document a sequence, checked against flex's
  outputs and gradients; and cuDNN's attention over the same packed sequences (the aten ops behind SDPA on
  nested tensors, which torch 2.11's varlen_attn leaves switched off).
  Each set's output and gradients against the default's (largest absolute difference).
- norm (`--norm`): the pre-LN layer's residual add + RMSNorm, forward and backward, at the step's shape (8,192
  tokens of 2,048 in bf16): inductor's compiled version (what the step runs without fused_norm), our Triton ops
  (forgather.models.fused_rms_norm, fused_norm=true) at each launch shape of NORM_SWEEP, and Liger's fused add
  + RMSNorm (eager, where liger-kernel is installed), each as a CUDA graph, checked against the torch norm.
- rotary (`--rotary`): one attention layer (fused q/k/v product, rotary, packed attention, o_proj) forward +
  backward, compiled, at the step's shape on the bench's stdlib rows, as forgather.models.attention runs it on
  a GPU (the product rotated and split by the fused_rotary op) beside the torch rotation in the order it had
  before (`HeadsFirstAttention`: the [B, heads, T, D] views rotated) and in the order of storage (the layer
  without the op): the same values in another order of storage, then the op's (within a rounding). The
  backward's kernel that rotates the gradients back and joins them for the fused product took 62-65 us a layer
  (H100 and H200, 2026-12-06) where its bytes need ~20-30. Timed in turn over `--rounds`, outputs and gradients
  compared with the first.
- optimizer: one step of AdamW over the 1.24B shape's bf16 parameters: torch's fused AdamW (the default),
  against the foreach implementation with its step compiled (forgather.optim.CompiledAdamW: torch.compile of
  the capturable step, the rate a device tensor) and against forgather.optim.TritonAdamW (one Triton launch
  over all tensors) at each (BLOCK, num_warps) of adamw_kernels.SWEEP; the first call's seconds (compiles).
  Then both with clipping by global norm before the step: torch's clip_grad_norm_ with the fused AdamW, and
  TritonAdamW's clip_grad_norm_, whose factor its kernel applies as it reads the gradients.
  `--only-optimizer` runs this piece alone.

Milliseconds per call from CUDA events over `--iters` calls after warm-up; the attention's times a layer
(the profile's attention share is 16 layers' worth).

    python scripts/bench_step_pieces.py [--iters 20] [--json FILE] [--skip-optimizer | --only-optimizer]
                                        [--skip-attention]
                                        [--option-sets NAME ...]
    python scripts/bench_step_pieces.py --norm [--rounds 5]
    python scripts/bench_step_pieces.py --rotary [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from forgather.optim import CompiledAdamW

SHAPE = dict(batch=4, seq=2048, heads=32, kv_heads=8, head_dim=64, hidden=2048, layers=16, intermediate=8192,
             vocab=128256)
SAFE = dict(ROWS_GUARANTEED_SAFE=True, BLOCKS_ARE_CONTIGUOUS=True)
OPTION_SETS = {
    "default": {},
    "safe": SAFE,
    "safe+tma": dict(SAFE, USE_TMA=True),
    "safe fwd 128x128 w8 s3": dict(SAFE, fwd_BLOCK_M=128, fwd_BLOCK_N=128, fwd_num_warps=8, fwd_num_stages=3),
    "safe fwd 128x64 w4 s3": dict(SAFE, fwd_BLOCK_M=128, fwd_BLOCK_N=64, fwd_num_warps=4, fwd_num_stages=3),
    "safe bwd 64/128 w8 s3": dict(SAFE, bwd_BLOCK_M1=64, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=64,
                                  bwd_num_warps=8, bwd_num_stages=3),
    # Tilings without the guarantees, which packed documents do not meet (packed rows run these too); the 64-row
    # ones also on a mask of 64-token blocks ("packed, 64 blocks"), which skips more of the area between
    # documents than the default 128.
    "fwd 64x64 w4 s3": dict(fwd_BLOCK_M=64, fwd_BLOCK_N=64, fwd_num_warps=4, fwd_num_stages=3),
    "bwd 32/64 w4 s3": dict(bwd_BLOCK_M1=32, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=32,
                            bwd_num_warps=4, bwd_num_stages=3),
    "bwd 64/128 w8 s3": dict(bwd_BLOCK_M1=64, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=64,
                             bwd_num_warps=8, bwd_num_stages=3),
}
MASK_SETS = {  # the option sets each mask runs (the causal mask: all)
    "packed": ("default", "safe", "fwd 64x64 w4 s3", "bwd 32/64 w4 s3", "bwd 64/128 w8 s3"),
    "packed, 64 blocks": ("fwd 64x64 w4 s3", "bwd 32/64 w4 s3"),
}
ROWS: list[dict] = []


def row(**fields) -> None:
    ROWS.append(fields)
    print(json.dumps(fields), flush=True)


def timed(fn, iters: int) -> float:
    """Milliseconds per call of fn() (CUDA events, after three warm-up calls)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def timed_graph(fn, iters: int) -> tuple[float, bool]:
    """(milliseconds per call of fn(), whether it ran as a CUDA graph): `iters` calls captured in one graph and
    replayed, so the host's launch costs do not count (training launches these kernels from compiled code, and
    keeps ahead of the GPU); where capture fails, `timed`."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        # thread_local: a call that another thread makes meanwhile (a compile worker) does not void the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for _ in range(iters):
                fn()
    except Exception as error:  # noqa: BLE001 - a candidate that cannot be captured is timed from the host
        print(f"graph capture failed, timed from the host: {type(error).__name__}: {str(error)[:300]}", flush=True)
        torch.cuda.synchronize()
        return timed(fn, iters), False
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, True


def random_documents(batch: int, seq: int) -> torch.Tensor:
    """Document ids [batch, seq] of rows packed with documents of 128-1,023 tokens (seeded)."""
    lengths = torch.randint(128, 1024, (batch, 16), generator=torch.Generator().manual_seed(0))
    return torch.stack([torch.repeat_interleave(torch.arange(16), row)[:seq] for row in lengths])


def _repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v [tokens, kv heads, D] with each kv head repeated for its group of query heads (kernels without
    grouped-query attention); the copy counts in their time."""
    group = q.shape[1] // k.shape[1]
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def bench_attention(iters: int, option_sets: list[str]) -> None:
    from torch.nn.attention import flex_attention as flex

    s = SHAPE
    gen = torch.Generator(device="cuda").manual_seed(0)

    def tensor(heads: int) -> torch.Tensor:
        return torch.randn(s["batch"], heads, s["seq"], s["head_dim"], device="cuda", dtype=torch.bfloat16,
                           generator=gen).requires_grad_()

    q, k, v = tensor(s["heads"]), tensor(s["kv_heads"]), tensor(s["kv_heads"])
    grad = torch.randn_like(q)
    docs = random_documents(s["batch"], s["seq"]).cuda()

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    def in_document(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (docs[b, q_idx] == docs[b, kv_idx])

    masks = {
        "causal": flex.create_block_mask(causal, None, None, s["seq"], s["seq"], device="cuda"),
        "packed": flex.create_block_mask(in_document, s["batch"], None, s["seq"], s["seq"], device="cuda"),
        "packed, 64 blocks": flex.create_block_mask(in_document, s["batch"], None, s["seq"], s["seq"], device="cuda",
                                                    BLOCK_SIZE=64),
    }
    # Each option set and mask is a recompile of flex_attention; past dynamo's limit (8) the calls ran uncompiled
    # (50-60 ms a layer on 2026-12-04): room for all of them.
    torch._dynamo.config.recompile_limit = 64
    compiled = torch.compile(flex.flex_attention)
    for mask_name, mask in masks.items():
        if not mask_name.startswith("packed, "):  # the 64-block mask is held to the packed default's results
            reference = None
        for name, options in OPTION_SETS.items():
            if name not in option_sets:
                continue
            if name not in MASK_SETS.get(mask_name, OPTION_SETS):
                continue
            def step(options=options, mask=mask):
                for t in (q, k, v):
                    t.grad = None
                out = compiled(q, k, v, block_mask=mask, enable_gqa=True, kernel_options=options or None)
                out.backward(grad)
                return out

            try:
                begin = time.perf_counter()
                out = step()
                first_s = time.perf_counter() - begin
                result = (out.detach().float(), *(t.grad.float() for t in (q, k, v)))
                ms = timed(step, iters)
            except Exception as error:  # an option set the kernel cannot take on this GPU: a row, not a crash
                row(piece="attention", mask=mask_name, options=name,
                    error=f"{type(error).__name__}: {str(error)[:300]}")
                continue
            if reference is None:
                reference = result
            diff = max((a - b).abs().max().item() for a, b in zip(result, reference))
            row(piece="attention", mask=mask_name, options=name, ms_per_layer=ms, ms_16_layers=16 * ms,
                max_abs_diff_vs_default=diff, first_call_s=first_s)
    qs = q.detach().requires_grad_()

    def sdpa():
        qs.grad = None
        out = torch.nn.functional.scaled_dot_product_attention(qs, k, v, is_causal=True, enable_gqa=True)
        out.backward(grad)

    ms = timed(sdpa, iters)
    row(piece="attention", mask="causal", options="sdpa is_causal (cuDNN or flash)", ms_per_layer=ms,
        ms_16_layers=16 * ms)
    bench_varlen(q, k, v, grad, docs, masks, compiled, iters)


def _varlen_call():
    """torch.nn.attention.varlen.varlen_attn as (q, k, v, cu_seqlens, max_len) -> out for causal attention
    within each sequence, across the API's versions (torch 2.10: is_causal; later: window_size and enable_gqa),
    repeating the kv heads where the version has no enable_gqa."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    parameters = inspect.signature(varlen_attn).parameters

    def call(q, k, v, cu, max_len):
        if "enable_gqa" not in parameters and q.shape[1] != k.shape[1]:
            k, v = _repeat_kv(q, k, v)
        options = dict(window_size=(-1, 0)) if "window_size" in parameters else dict(is_causal=True)
        if "enable_gqa" in parameters:
            options["enable_gqa"] = q.shape[1] != k.shape[1]
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **options)

    return call


def _flash4_call():
    """FlashAttention-4's variable-length kernels (the flash-attn-4 package, CuTe DSL, Hopper and Blackwell) as
    _varlen_call's (q, k, v, cu_seqlens, max_len) -> out; grouped kv heads natively."""
    from flash_attn.cute import flash_attn_varlen_func

    def call(q, k, v, cu, max_len):
        out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                     max_seqlen_k=max_len, causal=True)
        return out[0] if isinstance(out, tuple) else out

    return call


def _cudnn_call(repeat_kv: bool):
    """cuDNN's attention over packed sequences (aten._cudnn_attention_forward with cumulative sequence lengths:
    the kernels behind SDPA on nested tensors), causal within each sequence, as _varlen_call's
    (q, k, v, cu_seqlens, max_len) -> out. torch 2.11's varlen_attn keeps this backend switched off
    (_should_use_cudnn), so the bench calls the op itself."""
    def make():
        def call(q, k, v, cu, max_len):
            if repeat_kv and q.shape[1] != k.shape[1]:
                k, v = _repeat_kv(q, k, v)
            # the op's own autograd formula (aten._cudnn_attention_backward with the same lengths) runs backward
            return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_len, max_len, True, 0.0, True,
                                                           False)[0]
        return call
    return make


def _nested_cudnn_call():
    """The same kernels through the public route: SDPA on jagged nested tensors with only cuDNN's backend allowed
    (TORCH_CUDNN_SDPA_NESTED_TENSOR_ENABLED=1 lets SDPA pick it for nested tensors)."""
    import os

    from torch.nn.attention import SDPBackend, sdpa_kernel

    os.environ["TORCH_CUDNN_SDPA_NESTED_TENSOR_ENABLED"] = "1"

    def call(q, k, v, cu, max_len):
        if q.shape[1] != k.shape[1]:
            k, v = _repeat_kv(q, k, v)
        offsets = cu.long()
        nested = [torch.nested.nested_tensor_from_jagged(t, offsets, max_seqlen=max_len).transpose(1, 2)
                  for t in (q, k, v)]
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = torch.nn.functional.scaled_dot_product_attention(*nested, is_causal=True)
        return out.transpose(1, 2).values()

    return call


def bench_varlen(q, k, v, grad, docs, masks, compiled, iters: int) -> None:
    """Variable-length flash attention on the packed rows, tokens as [B * T, heads, D] with each document a
    sequence, against flex attention's packed row: the same outputs and gradients, and the time a layer:
    torch.nn.attention.varlen (flash attention 2's kernels) and, where the flash-attn-4 package is installed,
    FlashAttention-4's. max_len is given as the row length (an upper bound: no host read of the documents'
    lengths) and as the longest document."""
    for label, make in (("varlen (flash)", _varlen_call), ("flash-attn-4 varlen", _flash4_call),
                        ("cuDNN varlen, kv heads repeated", _cudnn_call(True)),
                        ("cuDNN varlen, grouped kv heads", _cudnn_call(False)),
                        ("cuDNN via nested tensors, kv heads repeated", _nested_cudnn_call)):
        try:
            call = make()
        except ImportError as error:
            row(piece="attention", mask="packed", options=label, error=str(error))
            continue
        _bench_varlen(label, call, q, k, v, grad, docs, masks, compiled, iters)


def _as_sequences(docs, q, k, v, grad):
    """Packed rows as variable-length sequences, each document one: cumulative lengths (int32), the longest
    document's length, and q, k, v (leaves of their own) and the output gradient as [B * T, heads, D]."""
    flat = (docs + torch.arange(docs.shape[0], device=docs.device)[:, None] * (docs.max() + 1)).flatten()
    starts = torch.nonzero(torch.cat([flat.new_ones(1), flat[1:] != flat[:-1]])).flatten()
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)

    def packed(t):  # [B, H, T, D] -> [B * T, H, D]
        return t.detach().transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]).contiguous()

    return (cu, int((cu[1:] - cu[:-1]).max()), *(packed(t).requires_grad_() for t in (q, k, v)), packed(grad))


def _bench_varlen(name, call, q, k, v, grad, docs, masks, compiled, iters: int) -> None:
    s = SHAPE
    cu, longest, qv, kv_, vv, grad_v = _as_sequences(docs, q, k, v, grad)
    for t in (q, k, v):
        t.grad = None
    out = compiled(q, k, v, block_mask=masks["packed"], enable_gqa=True)
    out.backward(grad)
    reference = [out.detach().transpose(1, 2).reshape(qv.shape).float()] + [
        t.grad.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]).float() for t in (q, k, v)]
    for label, max_len in (("row length", s["seq"]), ("longest document", longest)):
        def step(max_len=max_len):
            for t in (qv, kv_, vv):
                t.grad = None
            result = call(qv, kv_, vv, cu, max_len)
            result.backward(grad_v)
            return result

        try:
            begin = time.perf_counter()
            result = step()
            first_s = time.perf_counter() - begin
            diff = max((a.float() - b).abs().max().item()
                       for a, b in zip((result.detach(), qv.grad, kv_.grad, vv.grad), reference))
            ms = timed(step, iters)
        except Exception as error:  # noqa: BLE001 - a version without the kernel: a row, not a crash
            import traceback

            where = " <- ".join(f"{f.name}:{f.lineno}" for f in traceback.extract_tb(error.__traceback__)[-3:])
            row(piece="attention", mask="packed", options=f"{name}, max_len {label}",
                error=f"{type(error).__name__}: {str(error)[:600]} (at {where})")
            continue
        row(piece="attention", mask="packed", options=f"{name}, max_len {label}", ms_per_layer=ms,
            ms_16_layers=16 * ms, max_abs_diff_vs_flex=diff, documents=cu.numel() - 1, first_call_s=first_s)


def stdlib_positions(batch: int, seq: int) -> torch.Tensor:
    """Position ids [batch, seq] of packed rows of the training bench's own data: the stdlib corpus,
    tiny_llama's BPE of 4,096 tokens (its default), rows of `seq` tokens (documents of median ~52 tokens, ~19 a
    row of 2,048)."""
    from forgather.data.corpus import stdlib_documents as documents
    from forgather.data.packing import pack_documents, tokenize_documents
    from forgather.data.tokenizer import train_bpe_tokenizer

    texts = list(documents())
    positions = pack_documents(tokenize_documents(texts, train_bpe_tokenizer(texts, vocab_size=4096)), seq,
                               pad_id=0)["position_ids"]
    # rows drawn across the corpus as the shuffled training loader draws them (its first rows are the long pydoc
    # topics)
    rows = torch.randperm(positions.shape[0] - 1, generator=torch.Generator().manual_seed(0))[:batch]
    return positions[rows]


def stdlib_documents(batch: int, seq: int) -> torch.Tensor:
    """Document ids [batch, seq] of `stdlib_positions`' rows."""
    from forgather.models.attention import document_ids_from_positions

    return document_ids_from_positions(stdlib_positions(batch, seq))


_FWD64 = dict(fwd_BLOCK_M=64, fwd_BLOCK_N=64, fwd_num_warps=4, fwd_num_stages=3)
DUEL_TILINGS = {  # flex tilings on the packed rows' 128-token block mask (each block size divides 128)
    "fwd 64x64 w4 s3": _FWD64,
    "fwd 64x64 w4 s2": dict(_FWD64, fwd_num_stages=2),
    "fwd 64x64 w4 s4": dict(_FWD64, fwd_num_stages=4),
    "fwd 64x64 w8 s3": dict(_FWD64, fwd_num_warps=8),
    "fwd 64x128 w4 s3": dict(_FWD64, fwd_BLOCK_N=128),
    "fwd 128x64 w4 s3": dict(_FWD64, fwd_BLOCK_M=128),
    "fwd 128x64 w8 s3": dict(_FWD64, fwd_BLOCK_M=128, fwd_num_warps=8),
    "fwd 32x64 w4 s3": dict(_FWD64, fwd_BLOCK_M=32),
    "fwd 64x64 + bwd 64/64 w4 s3": dict(_FWD64, bwd_BLOCK_M1=64, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=64,
                                        bwd_num_warps=4, bwd_num_stages=3),
    "fwd 64x64 + bwd 32/128 w4 s3": dict(_FWD64, bwd_BLOCK_M1=32, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128,
                                         bwd_BLOCK_N2=32, bwd_num_warps=4, bwd_num_stages=3),
    "fwd 64x64 + bwd 64/128 w8 s2": dict(_FWD64, bwd_BLOCK_M1=64, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128,
                                         bwd_BLOCK_N2=64, bwd_num_warps=8, bwd_num_stages=2),
    "fwd 64x64 + bwd 64/128 w4 s3": dict(_FWD64, bwd_BLOCK_M1=64, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128,
                                         bwd_BLOCK_N2=64, bwd_num_warps=4, bwd_num_stages=3),
}


# our packed-document kernels' tiles to sweep, each kernel in turn with the others at their default
# (forgather.models.packed_attention.TILING): [BLOCK_M, BLOCK_N, num_warps, num_stages]
PACKED_SWEEP = {
    "forward": [[16, 64, 4, 3], [16, 32, 4, 3], [32, 64, 8, 3], [8, 64, 4, 3], [16, 64, 4, 2], [16, 64, 4, 4],
                [16, 128, 4, 3], [16, 64, 8, 3]],
    "dq": [[16, 32, 4, 3], [16, 64, 4, 3], [32, 32, 8, 3], [8, 64, 4, 3], [16, 32, 4, 2], [16, 32, 2, 3],
           [8, 32, 4, 3], [16, 16, 4, 3]],
    "dkdv": [[16, 64, 4, 3], [8, 64, 4, 3], [16, 128, 8, 3], [16, 32, 4, 3], [32, 32, 8, 3], [16, 64, 4, 2],
             [16, 64, 4, 4], [8, 128, 4, 3], [16, 64, 8, 3], [8, 64, 2, 3]],
}


def packed_inputs(docs: torch.Tensor):
    """q, k, v, grad at the step's shape, stored [B, T, heads, D] as a layer's are, and the documents' bounds."""
    from forgather.models.attention import document_bounds

    s = SHAPE
    gen = torch.Generator(device="cuda").manual_seed(0)

    def tensor(heads: int) -> torch.Tensor:
        x = torch.randn(s["batch"], s["seq"], heads, s["head_dim"], device="cuda", dtype=torch.bfloat16,
                        generator=gen)
        return x.transpose(1, 2).requires_grad_()

    q, k, v = tensor(s["heads"]), tensor(s["kv_heads"]), tensor(s["kv_heads"])
    return q, k, v, torch.randn_like(q), document_bounds(docs)


def packed_step(q, k, v, grad, bounds, tiles):
    from forgather.models.packed_attention import packed_attention

    def step():
        for t in (q, k, v):
            t.grad = None
        out = packed_attention(q, k, v, *bounds, tiles)
        out.backward(grad)
        return out, q.grad, k.grad, v.grad
    return step


def baseline_step(path: str, step):
    """`step` with another revision of forgather/models/packed_attention_kernels.py (the file at `path`, e.g.
    `git show REV:forgather/models/packed_attention_kernels.py > FILE`) in place of ours while it runs: the ops
    import the kernels module at each eager call, so a CUDA graph captured inside holds the baseline's kernels."""
    import importlib.util
    import sys

    name = "forgather.models.packed_attention_kernels"
    spec = importlib.util.spec_from_file_location(name, path)
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    import forgather.models as package

    def swapped():
        ours = sys.modules[name]
        sys.modules[name], package.packed_attention_kernels = baseline, baseline
        try:
            return step()
        finally:
            sys.modules[name], package.packed_attention_kernels = ours, ours
    return swapped


def _tiles_name(tiles) -> str:
    return "x".join(map(str, tiles[:2])) + f" w{tiles[2]} s{tiles[3]}"


def sweep_packed(iters: int, rounds: int) -> dict:
    """Each kernel's tiles of PACKED_SWEEP on the training bench's own rows, forward + backward in CUDA graphs,
    the others at their default; returns the best of each kernel as attention_kernel_options."""
    from forgather.models.packed_attention import KERNELS, TILING, tiling

    q, k, v, grad, bounds = packed_inputs(stdlib_documents(SHAPE["batch"], SHAPE["seq"]).cuda())
    best = {}
    for kernel in KERNELS:
        times = {}
        for tiles in PACKED_SWEEP[kernel]:
            name = _tiles_name(tiles)
            try:
                step = packed_step(q, k, v, grad, bounds, tiling({kernel: tiles}))
                step()
                times[name] = (min(timed_graph(step, iters)[0] for _ in range(rounds)), tiles)
            except Exception as error:  # noqa: BLE001 - a tiling this GPU cannot build: a row, not a crash
                row(piece="packed sweep", kernel=kernel, tiles=tiles,
                    error=f"{type(error).__name__}: {str(error)[:200]}")
        base = times.get(_tiles_name(TILING[kernel]))
        for name, (ms, tiles) in sorted(times.items(), key=lambda item: item[1][0]):
            row(piece="packed sweep", kernel=kernel, tiles=tiles, ms_fwd_bwd_per_layer=ms,
                vs_default=base[0] / ms if base else None)
        if times:
            best[kernel] = min(times.values(), key=lambda item: item[0])[1]
    row(piece="packed sweep", best=best, option=kernel_options(best))
    return best


def kernel_options(best: dict[str, list[int]]) -> str:
    """Each packed kernel's tiles as the training override: attention_kernel_options={forward:[16,64,4,3],...}."""
    return "attention_kernel_options={" + ",".join(f"{k}:[{','.join(map(str, t))}]" for k, t in best.items()) + "}"


def bench_duel(iters: int, rounds: int, sweep: bool = False, packed_best: dict | None = None,
               row_names: tuple[str, ...] = ("random 128-1023", "stdlib rows"), packed_baselines: tuple[str, ...] = ()
               ) -> None:
    """Packed rows' attention, forward + backward, every candidate timed in turn for `rounds` rounds of `iters`
    calls (medians and minima of the rounds: one slow stretch of the GPU does not decide), on two sets of rows:
    random documents of 128-1,023 tokens, and the training bench's own rows (the stdlib corpus). Candidates:
    flex under its default tiling and the forward's 64 x 64 one, flash attention 2's variable-length kernels (max
    length the longest document's, and the row's), our packed kernels (attention_fn=packed) at their default tiles,
    at `packed_best`'s and in each revision of `packed_baselines` (files), and SDPA's causal kernel as the no-documents
    reference. With `sweep`: flex under every tiling of DUEL_TILINGS instead, beside the default and SDPA. Every
    candidate runs as a CUDA graph of `iters` calls where it can be captured (the `graph` field): the host's
    launch costs do not count."""
    from torch.nn.attention import flex_attention as flex

    from forgather.models.attention import document_bounds
    from forgather.models.packed_attention import tiling

    s = SHAPE
    torch._dynamo.config.recompile_limit = 64
    compiled = torch.compile(flex.flex_attention)
    tilings = dict(DUEL_TILINGS) if sweep else {name: DUEL_TILINGS[name] for name in ("fwd 64x64 w4 s3",)}
    gen = torch.Generator(device="cuda").manual_seed(0)
    row_sets = {}
    if "random 128-1023" in row_names:
        row_sets["random 128-1023"] = random_documents(s["batch"], s["seq"]).cuda()
    try:
        if "stdlib rows" in row_names:
            row_sets["stdlib rows"] = stdlib_documents(s["batch"], s["seq"]).cuda()
    except Exception as error:  # noqa: BLE001 - the random rows still run
        row(piece="duel", rows="stdlib rows", error=f"{type(error).__name__}: {error}")
    varlen = _varlen_call()
    for rows_name, docs in row_sets.items():
        def tensor(heads: int) -> torch.Tensor:
            return torch.randn(s["batch"], heads, s["seq"], s["head_dim"], device="cuda", dtype=torch.bfloat16,
                               generator=gen).requires_grad_()

        q, k, v = tensor(s["heads"]), tensor(s["kv_heads"]), tensor(s["kv_heads"])
        grad = torch.randn_like(q)

        def in_document(b, h, q_idx, kv_idx, docs=docs):
            return (kv_idx <= q_idx) & (docs[b, q_idx] == docs[b, kv_idx])

        mask128 = flex.create_block_mask(in_document, s["batch"], None, s["seq"], s["seq"], device="cuda")

        def flex_step(mask, options):
            def step():
                for t in (q, k, v):
                    t.grad = None
                out = compiled(q, k, v, block_mask=mask, enable_gqa=True, kernel_options=options or None)
                out.backward(grad)
                return out, q.grad, k.grad, v.grad
            return step

        cu, longest, qv, kv_, vv, grad_v = _as_sequences(docs, q, k, v, grad)

        def varlen_step(max_len):
            def step():
                for t in (qv, kv_, vv):
                    t.grad = None
                out = varlen(qv, kv_, vv, cu, max_len)
                out.backward(grad_v)
                back = lambda t: t.view(s["batch"], s["seq"], -1, s["head_dim"]).transpose(1, 2)  # noqa: E731
                return back(out), back(qv.grad), back(kv_.grad), back(vv.grad)
            return step

        qs = q.detach().requires_grad_()

        def sdpa_step():
            qs.grad = None
            out = torch.nn.functional.scaled_dot_product_attention(qs, k, v, is_causal=True, enable_gqa=True)
            out.backward(grad)

        candidates = {"flex default": flex_step(mask128, {})}
        candidates.update({f"flex {name}": flex_step(mask128, options) for name, options in tilings.items()})
        if not sweep:
            # (flex on a mask of 64-token blocks, which skips more between short documents, is not a candidate:
            # torch 2.11 builds its backward only under max-autotune, and the failed build ran while the next
            # candidates' graphs were captured)
            candidates.update({"flash 2 varlen, max_len longest document": varlen_step(longest),
                               "flash 2 varlen, max_len row": varlen_step(s["seq"])})
        bounds = document_bounds(docs)
        candidates["packed default"] = packed_step(q, k, v, grad, bounds, tiling())
        for path in packed_baselines:
            candidates[f"packed, kernels of {Path(path).stem}"] = baseline_step(
                path, packed_step(q, k, v, grad, bounds, tiling()))
        if packed_best:
            candidates["packed best of the sweep"] = packed_step(q, k, v, grad, bounds, tiling(packed_best))
        candidates["sdpa is_causal (no documents)"] = sdpa_step
        reference, times, errors = None, {}, {}
        for name, step in list(candidates.items()):
            try:
                result = step()
                if result is not None:
                    result = [t.detach().float() for t in result]
                    reference = reference or result
                    diff = max((a - b).abs().max().item() for a, b in zip(result, reference))
                    row(piece="duel", rows=rows_name, candidate=name, max_abs_diff_vs_flex=diff)
                times[name] = []
            except Exception as error:  # noqa: BLE001 - a candidate this GPU cannot run: a row, not a crash
                errors[name] = f"{type(error).__name__}: {str(error)[:300]}"
                del candidates[name]
        graphs = {}
        for _ in range(rounds):
            for name, step in candidates.items():
                ms, graphs[name] = timed_graph(step, iters)
                times[name].append(ms)
        base = sorted(times["flex default"])[rounds // 2] if "flex default" in times else None
        for name, ms in times.items():
            median = sorted(ms)[rounds // 2]
            row(piece="duel", rows=rows_name, candidate=name, ms_per_layer_median=median, ms_per_layer_min=min(ms),
                ms_16_layers=16 * median, vs_flex_default=base / median if base else None,
                documents=cu.numel() - 1, longest=longest, graph=graphs[name])
        for name, error in errors.items():
            row(piece="duel", rows=rows_name, candidate=name, error=error)


# forgather.models.fused_rms_norm.NORM_TILING's launch shapes to time: forward (rows a program, warps), backward
# (rows an iteration, warps, programs an SM)
NORM_SWEEP = [
    {"forward": (1, 8), "backward": (2, 8, 2)}, {"forward": (1, 4), "backward": (1, 8, 2)},
    {"forward": (2, 8), "backward": (4, 8, 2)}, {"forward": (1, 8), "backward": (2, 8, 4)},
    {"forward": (1, 8), "backward": (1, 4, 4)}, {"forward": (1, 16), "backward": (2, 16, 1)},
]


def bench_norm(iters: int, rounds: int) -> None:
    """The residual add + RMSNorm forward and backward at the step's shape, every candidate timed in turn for
    `rounds` rounds of CUDA graphs of `iters` calls (medians), beside inductor's compiled version."""
    from forgather.models import fused_rms_norm
    from forgather.models.norm import add_rms_norm

    s = SHAPE
    gen = torch.Generator(device="cuda").manual_seed(0)

    def tensor(scale=1.0, *shape):
        shape = shape or (s["batch"], s["seq"], s["hidden"])
        return (scale * torch.randn(*shape, device="cuda", generator=gen)).to(torch.bfloat16)

    x, delta, dy, ds = (tensor().requires_grad_(), tensor().requires_grad_(), tensor(), tensor())
    weight = (1 + tensor(0.1, s["hidden"])).requires_grad_()

    def torch_add_norm(a, b, w):
        return add_rms_norm(a, b, w, 1e-5)

    def step_of(fn):
        def step():
            for t in (x, delta, weight):
                t.grad = None
            total, y = fn(x, delta, weight)
            torch.autograd.backward([y, total], [dy, ds])
            return total, y, x.grad, weight.grad
        return step

    candidates = {"inductor (torch.compile)": step_of(torch.compile(torch_add_norm))}
    for tiles in NORM_SWEEP:
        def ours(a, b, w, tiles=tiles):
            fused_rms_norm.NORM_TILING.update(tiles)
            return fused_rms_norm.add_rms_norm(a, b, w, 1e-5)
        candidates[f"ours {tiles['forward']} / {tiles['backward']}"] = step_of(ours)
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

        def liger(a, b, w):
            y, total = LigerFusedAddRMSNormFunction.apply(a, b, w, 1e-5, 0.0, "llama", False)
            return total, y
        candidates["liger fused add rms norm (eager)"] = step_of(liger)
    except ImportError as error:
        row(piece="norm", candidate="liger", error=f"{type(error).__name__}: {error}")
    reference = [t.detach().float() for t in step_of(torch_add_norm)()]
    times, errors, graphs = {}, {}, {}
    for name, step in list(candidates.items()):
        try:
            result = [t.detach().float() for t in step()]
            diff = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(result, reference)]
            row(piece="norm", candidate=name, max_rel_diff_s_y_dx_dw=diff)
            times[name] = []
        except Exception as error:  # noqa: BLE001 - a candidate this GPU cannot run: a row, not a crash
            errors[name] = f"{type(error).__name__}: {str(error)[:300]}"
            del candidates[name]
    for _ in range(rounds):
        for name, step in candidates.items():
            ms, graphs[name] = timed_graph(step, iters)
            times[name].append(ms)
    moved = 8 * x.numel() * x.element_size()  # x, delta, s, y forward; s, dy, ds, dx backward
    base = sorted(times["inductor (torch.compile)"])[rounds // 2] if "inductor (torch.compile)" in times else None
    for name, ms in times.items():
        median = sorted(ms)[rounds // 2]
        row(piece="norm", candidate=name, ms_per_norm_median=median, ms_per_norm_min=min(ms),
            ms_32_norms=32 * median, tb_per_s=moved / (median / 1e3) / 1e12,
            vs_inductor=base / median if base else None, graph=graphs[name])
    for name, error in errors.items():
        row(piece="norm", candidate=name, error=error)


def heads_first_attention():
    """forgather.models.attention.Attention as it ran before 2026-12-06 (the fused q/k/v path only, no KV cache):
    the heads made [B, heads, T, D] views, then rotated; what `--rotary` times beside the layer as it is."""
    from forgather.models.attention import Attention
    from forgather.models.fused import fused_linear
    from forgather.models.rope import apply_rotary

    class HeadsFirstAttention(Attention):
        def forward(self, x, rope, mask, kv_cache=None):
            assert kv_cache is None and rope is not None
            q, k, v = fused_linear(x, (self.q_proj, self.k_proj, self.v_proj))
            q = q.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
            k, v = (t.unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2) for t in (k, v))
            y = self.attention_fn(apply_rotary(q, *rope), apply_rotary(k, *rope), v, mask, 0.0)
            return self.o_proj(y.transpose(1, 2).flatten(2))

    return HeadsFirstAttention


def rotary_layers(device: str, dtype: torch.dtype, shape: dict, attention_fn: str):
    """(the layer as forgather runs it, HeadsFirstAttention with the same weights), fused q/k/v."""
    from forgather.models.attention import Attention

    settings = dict(hidden_size=shape["hidden"], num_heads=shape["heads"], num_kv_heads=shape["kv_heads"],
                    head_dim=shape["head_dim"], attention_fn=attention_fn, fused_projections="qkv")
    torch.manual_seed(0)
    now = Attention(**settings).to(device, dtype)
    before = heads_first_attention()(**settings).to(device, dtype)
    before.load_state_dict(now.state_dict())
    return now, before


def rotary_inputs(device: str, dtype: torch.dtype, shape: dict, position_ids: torch.Tensor):
    """x, the output's gradient, rope (cos, sin in the activations' dtype, as CausalLM.layer_inputs gives a bf16
    model) and the packed rows' mask."""
    from forgather.models.attention import AttentionMask, document_ids_from_positions
    from forgather.models.rope import RotaryEmbedding

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape["batch"], shape["seq"], shape["hidden"], device=device, dtype=dtype, generator=gen)
    grad = torch.randn(x.shape, device=device, dtype=dtype, generator=gen)
    position_ids = position_ids.to(device)
    rope = tuple(t.to(dtype) for t in RotaryEmbedding(shape["head_dim"], theta=500000.0)(position_ids))
    mask = AttentionMask(shape["seq"], shape["seq"], document_ids_from_positions(position_ids), torch.device(device))
    return x.requires_grad_(), grad, rope, mask


def rotary_step(layer, x, grad, rope, mask):
    def step():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        out = layer(x, rope, mask)
        out.backward(grad)
        return out, x.grad, *(p.grad for p in layer.parameters())
    return step


def bench_rotary(iters: int, rounds: int) -> None:
    """`--rotary`: the layer as it is (with the fused_rotary op) against HeadsFirstAttention and against the layer
    without the op, compiled, timed in turn."""
    now, before = rotary_layers("cuda", torch.bfloat16, SHAPE, "packed")
    x, grad, rope, mask = rotary_inputs("cuda", torch.bfloat16, SHAPE, stdlib_positions(SHAPE["batch"], SHAPE["seq"]))
    in_torch = copy.deepcopy(now)
    in_torch._rotary_qkv = None  # the rotation as torch ops, compiled by inductor
    steps = {"heads, then rotary (before)": rotary_step(torch.compile(before), x, grad, rope, mask),
             "rotary on [B, T, heads, D], inductor": rotary_step(torch.compile(in_torch), x, grad, rope, mask),
             "fused_rotary op (now)": rotary_step(torch.compile(now), x, grad, rope, mask)}
    results = {name: [t.detach().clone() for t in step()] for name, step in steps.items()}
    (name0, want), *others = results.items()
    diffs = {name: max((a.float() - b.float()).abs().max().item() for a, b in zip(want, got, strict=True))
             for name, got in others}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(timed(step, iters))
    base = min(times[name0])
    for name, ms in times.items():
        row(piece="rotary", variant=name, ms_per_layer=round(min(ms), 4), rounds=[round(t, 4) for t in ms],
            vs_before=round(base / min(ms), 4), median=round(sorted(ms)[len(ms) // 2], 4),
            largest_difference=diffs.get(name, 0.0))


def parameters_1b() -> list[torch.Tensor]:
    s = SHAPE
    hidden, inter, kv = s["hidden"], s["intermediate"], s["kv_heads"] * s["head_dim"]
    shapes = [(s["vocab"], hidden)]
    for _ in range(s["layers"]):
        shapes += [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
                   (hidden, inter), (hidden,), (hidden,)]
    shapes.append((hidden,))
    params = [torch.nn.Parameter(torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02) for shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def bench_optimizer(iters: int, skip_compiled: bool = False) -> None:
    from forgather.optim import TritonAdamW
    from forgather.optim.adamw_kernels import SWEEP

    options = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    candidates = {
        "fused": lambda params: torch.optim.AdamW(params, fused=True, **options),
        # torch's foreach AdamW, capturable, its step compiled, the rate a device tensor
        "compiled foreach": lambda params: CompiledAdamW(params, **options),
        **{f"triton block {block} warps {warps}": (lambda params, block=block, warps=warps:
                                                   TritonAdamW(params, block=block, num_warps=warps, **options))
           for block, warps in SWEEP},
    }
    # Clipping by global norm (forgather's trainers clip at 1.0 by default) before the step: torch's clip_grad_norm_
    # scales the gradients in place; TritonAdamW's folds the factor into its kernel.
    clipped = {"fused, clipped (torch clip_grad_norm_)": "fused", "triton, clipped (folded into the kernel)": "triton"}
    candidates["fused, clipped (torch clip_grad_norm_)"] = candidates["fused"]
    candidates["triton, clipped (folded into the kernel)"] = lambda params: TritonAdamW(params, **options)
    if skip_compiled:
        del candidates["compiled foreach"]
    fused_ms = None
    for name, make in candidates.items():
        params = parameters_1b()
        optimizer = make(params)
        if clipped.get(name) == "fused":
            step = lambda: (torch.nn.utils.clip_grad_norm_(params, 1e-3), optimizer.step())  # noqa: E731
        elif clipped.get(name) == "triton":
            step = lambda: (optimizer.clip_grad_norm_(1e-3), optimizer.step())  # noqa: E731
        else:
            step = optimizer.step
        begin = time.perf_counter()
        step()
        torch.cuda.synchronize()
        first_s = time.perf_counter() - begin
        ms = timed(step, iters)
        fused_ms = fused_ms or ms
        count = sum(p.numel() for p in params)
        row(piece="optimizer", options=name, ms=ms, parameters=count,
            tb_per_s=14 * count / (ms / 1e3) / 1e12, vs_fused=fused_ms / ms, first_call_s=first_s)
        del optimizer, params
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--skip-optimizer", action="store_true")
    parser.add_argument("--only-optimizer", action="store_true")
    parser.add_argument("--skip-compiled", action="store_true", help="no compiled foreach AdamW (~45 s of compile)")
    parser.add_argument("--duel", action="store_true",
                        help="only the packed rows' attention candidates, timed in turn over --rounds rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--norm", action="store_true",
                        help="only the residual add + RMSNorm candidates (inductor, ours at NORM_SWEEP, Liger)")
    parser.add_argument("--rotary", action="store_true",
                        help="only the attention layer: the fused_rotary op against the torch rotation in two orders")
    parser.add_argument("--packed-sweep", action="store_true",
                        help="with --duel: sweep our packed kernels' tiles (PACKED_SWEEP) first, then duel the best")
    parser.add_argument("--rows", nargs="+", default=["random 128-1023", "stdlib rows"],
                        choices=["random 128-1023", "stdlib rows"], help="with --duel: the sets of rows")
    parser.add_argument("--packed-baseline", metavar="FILE", nargs="+", default=[],
                        help="with --duel: also time these revisions of packed_attention_kernels.py, in the same run")
    parser.add_argument("--sweep", action="store_true",
                        help="with --duel: every flex tiling of DUEL_TILINGS instead of the varlen candidates")
    parser.add_argument("--option-sets", nargs="+", choices=OPTION_SETS, default=list(OPTION_SETS),
                        help="flex attention's kernel option sets to time (default: all; 'default' always runs)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_step_pieces.py times CUDA kernels: run it on a GPU")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if args.rotary:
        bench_rotary(args.iters, args.rounds)
    elif args.norm:
        bench_norm(args.iters, args.rounds)
    elif args.duel:
        best = sweep_packed(args.iters, args.rounds) if args.packed_sweep else None
        bench_duel(args.iters, args.rounds, args.sweep, best, tuple(args.rows), tuple(args.packed_baseline))
    elif not args.skip_optimizer:
        bench_optimizer(args.iters, args.skip_compiled)
    if not args.skip_attention and not args.duel and not args.norm and not args.rotary and not args.only_optimizer:
        bench_attention(args.iters, ["default", *args.option_sets])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ROWS, f, indent=1)


if __name__ == "__main__":
    main()
