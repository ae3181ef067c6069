"""The fused decoder's attention="triton": rotary, the cache write and attention of one decode token a row,
in one kernel launch where the matmul path runs six (two rotaries, a scatter, two products, a softmax).

Why a kernel of our own: at batch 1 on the H200 those six took ~15 us of a 1.24B layer's ~75 (docs/
benchmarks.md, serving), and neither torch's fused attentions (cuDNN's SDPA: 6.6 us plus its own copies,
measured slower than the matmul path end to end) nor inductor's fusions of the sums remove them; the cache
write and the rotary belong in the same launch, which no library's decode attention takes.

`decode_attention(q, k, v, cos, sin, positions, cache, keys, workspace)` is a torch custom op, so
torch.compile and CUDA graphs treat it as one opaque call that mutates the cache:
- q [B, heads, D], k and v [B, kv_heads, D] (views of the fused q/k/v product, before rotary), cos and sin
  [B, D]; row b is slot b of `cache` [2, slots, kv_heads, length + 1, D] (SlotKVCache.pairs), its new
  token at positions[b];
- writes the rotated key and the value at [:, b, :, positions[b]], attends over the positions
  0..positions[b] of the first `keys` (the step's window; a position past the window, the scratch one,
  sees the whole window but not itself, as the matmul path's mask does) and returns [B, heads, D].
On a CPU the op runs `reference`, which is the matmul path itself (fused.decode_layer's arithmetic): the CPU
tests hold the op to it, and tests/gpu/ and scripts/gpu_check_serve.sh hold the kernel to the reference.

The kernel (decode_kernels.py) splits a row's window across programs when rows x kv heads would leave the
GPU idle (flash-decoding); `workspace(...)` allocates its partial sums and counters once per decoder.
"""

from __future__ import annotations

import math

import torch

from forgather.models.norm import rms_norm
from forgather.models.rope import rotate_half
from forgather.triton_support import interpreting, triton_runs

__all__ = ["advance_inputs", "decode_attention", "greedy_advance", "reference", "workspace", "split_plan"]

BLOCK_N = 32  # keys per inner iteration of the kernel
GROUP_PAD = 16  # tl.dot's least row count: a kv head's query heads, padded with masked rows
NUM_WARPS = 4
TARGET_PROGRAMS = 264  # about two programs per SM on an H100/H200 (132 SMs)
MIN_CHUNK = 64  # fewest keys a split reads (on the H200 at batch 1: 32 was slower at every window, 0.8-0.96x)
# Most splits of one (row, kv head), unless that would give a split more than MAX_CHUNK keys: past a few
# splits the combining step costs more than the split saves. On the H200 at batch 1 (1.24B, 8 kv heads;
# docs/benchmarks.md) a window of 1,024 took 7.6 us in 8 splits against 8.4 in 16, one of 2,048 10.0 us in 8
# against 13.2 in 32, one of 4,096 12.2 us in 16 against 14.5 in 32.
SPLIT_CAP = 8
MAX_CHUNK = 256


def residual_add(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x + delta in float32, rounded once to x's dtype: what a bf16 add computes, written so that inductor
    does not fold it into the product that made `delta` (fused.py's module docstring)."""
    return (x.float() + delta.float()).to(x.dtype)


def rotate_and_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     positions: torch.Tensor, cache: torch.Tensor, keys: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotary on q and k in the activations' dtype (cos, sin [B, D]), one scatter of the rows' keys and values
    into `cache`; the grouped queries [B, kv_heads, group, D] and the window's cached keys and values [B,
    kv_heads, keys, D]: every torch attention of the fused decoder starts here."""
    batch, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    rows = torch.arange(batch, device=q.device)
    cache[:, rows, :, positions] = torch.stack((k, v), dim=1)  # [B, 2, kv_heads, D]
    # Query head i reads kv head i // group: the group's query heads are the "queries" of their kv head.
    grouped = q.view(batch, kv_heads, heads // kv_heads, head_dim)
    return grouped, cache[0, :batch, :, :keys], cache[1, :batch, :, :keys]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              positions: torch.Tensor, cache: torch.Tensor, keys: int) -> torch.Tensor:
    """The op's semantics in torch: rotate_and_write, then grouped-query attention as two batched products
    with a float32 softmax between them."""
    batch, heads, head_dim = q.shape
    grouped, cached_keys, cached_values = rotate_and_write(q, k, v, cos, sin, positions, cache, keys)
    visible = torch.arange(keys, device=q.device)[None, :] <= positions[:, None]
    scores = torch.matmul(grouped, cached_keys.transpose(-1, -2)).float() * head_dim ** -0.5
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    attended = torch.matmul(scores.softmax(dim=-1).to(v.dtype), cached_values)  # [B, kv_heads, group, D]
    return attended.reshape(batch, heads, head_dim)


def split_plan(batch: int, kv_heads: int, keys: int, block: int = 32) -> tuple[int, int]:
    """(splits, chunk): how many programs share a row's window, and the keys each reads (a multiple of
    `block`), so that batch x kv_heads x splits is about TARGET_PROGRAMS, each split at least MIN_CHUNK keys,
    and at most SPLIT_CAP splits unless their chunks would pass MAX_CHUNK keys."""
    splits = min(math.ceil(TARGET_PROGRAMS / (batch * kv_heads)), math.ceil(keys / MIN_CHUNK))
    splits = max(1, min(splits, max(SPLIT_CAP, math.ceil(keys / MAX_CHUNK))))
    chunk = math.ceil(math.ceil(keys / splits) / block) * block
    return math.ceil(keys / chunk), chunk


def workspace(slots: int, kv_heads: int, head_dim: int, max_keys: int, device: torch.device | str
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's partial sums ([slots x kv_heads x splits, 16, D] float32, and their max and sum) and its
    per-(row, kv head) counters, for windows of up to `max_keys` positions. Several layers share it: the
    kernel's last program of a row resets its counter."""
    most = min(math.ceil(TARGET_PROGRAMS / kv_heads), math.ceil(max_keys / MIN_CHUNK))  # split_plan's bound
    partial = torch.empty(slots * kv_heads * most * GROUP_PAD * (head_dim + 2), dtype=torch.float32, device=device)
    counter = torch.zeros(slots * kv_heads, dtype=torch.int32, device=device)
    return partial, counter


@torch.library.custom_op("forgather::decode_attention", mutates_args=("cache", "partial", "counter"))
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     positions: torch.Tensor, cache: torch.Tensor, keys: int, partial: torch.Tensor,
                     counter: torch.Tensor, release_late: bool = False, rope_table: bool = False) -> torch.Tensor:
    """`release_late`: skinny_norm_linear's. `rope_table`: cos and sin are tables of every cache position [length
    + 1, D], read at each row's position (the step computes no rotary of its own), not [B, D]."""
    if rope_table:
        _check_rope_table(cos, sin, cache)
    if q.device.type == "cpu" and not interpreting():
        if rope_table:
            cos, sin = cos[positions], sin[positions]
        return reference(q, k, v, cos, sin, positions, cache, keys)
    return launch(q, k, v, cos, sin, positions, cache, keys, partial, counter, release_late, rope_table)


@decode_attention.register_fake
def _(q, k, v, cos, sin, positions, cache, keys, partial, counter, release_late=False, rope_table=False):
    return q.new_empty(q.shape)


def _check_rope_table(cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor) -> None:
    if cos.shape != sin.shape or cos.shape[0] != cache.shape[3] or cos.shape[1] != cache.shape[4]:
        raise ValueError(f"decode_attention: rope tables of [{cache.shape[3]}, {cache.shape[4]}] (every cache "
                         f"position); got cos {tuple(cos.shape)} and sin {tuple(sin.shape)}")


# Programmatic dependent launch (triton_support.pdl_supported) of the decode kernels: None where the GPU and
# Triton support it, or True/False. Each of our kernels then launches while the kernel before it still runs,
# and waits only before its first read (decode_kernels._dependent_launch_point): the launch and the program's
# setup overlap the kernel before's tail. On the H200 that made our norm + product kernels 1.02-1.03x faster
# end to end than cuBLAS's products (without PDL they are level); asking L2 for the weights before the wait
# (prefetch.global.L2) was also measured, and was slower, as was reading each program's first weight tile into
# registers before the wait (1.114 ms a step against 1.103, same call; docs/benchmarks.md).
PDL: bool | None = None
# Where a kernel under PDL lets the next one launch: "start" (right after its own wait) or "end" (after its
# loads, before its stores): with "start" the next kernel's programs sit on the SMs, waiting, while a grid
# of several waves still has programs to run. A split-K product's grid is such a grid: it releases at the end
# under either setting (decode_kernels._dependent_launch_point).
PDL_TRIGGER = "start"
_PDL_DEVICES: dict[str, bool] = {}


def dependent_launch(device: torch.device) -> bool:
    """Whether the decode kernels launch on `device` with PDL (the PDL setting, else what the device supports)."""
    if PDL is not None:
        return PDL and not interpreting()
    key = str(device)
    if key not in _PDL_DEVICES:
        from forgather.triton_support import pdl_supported

        _PDL_DEVICES[key] = pdl_supported(device)
    return _PDL_DEVICES[key]


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: float32 products stay float32 (no TF32); bf16 ignores it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           positions: torch.Tensor, cache: torch.Tensor, keys: int, partial: torch.Tensor,
           counter: torch.Tensor, release_late: bool = False, rope_table: bool = False) -> torch.Tensor:
    """Run the Triton kernel (decode_kernels.py) on the op's arguments."""
    from . import decode_kernels as kernels

    batch, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    if group > GROUP_PAD or head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"the decode kernel runs up to {GROUP_PAD} query heads per kv head and a power-of-two "
                         f"head_dim >= 16; got {group} and {head_dim}")
    for name, tensor in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin), ("cache", cache)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"decode_attention: {name}'s last dimension must be contiguous")
    splits, chunk = split_plan(batch, kv_heads, keys, BLOCK_N)
    most = partial.numel() // (counter.numel() * GROUP_PAD * (head_dim + 2))
    if splits > most or batch * kv_heads > counter.numel():
        raise ValueError(f"decode_attention: the workspace holds {most} splits of {counter.numel()} rows x kv heads; "
                         f"this step needs {splits} of {batch * kv_heads}")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    part_acc = partial[:counter.numel() * most * GROUP_PAD * head_dim]
    part_ml = partial[counter.numel() * most * GROUP_PAD * head_dim:]
    kernels.decode_attention_kernel[(batch * kv_heads, splits)](
        q, k, v, cos, sin, positions, cache, out, part_acc, part_ml, counter,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3), out.stride(0), out.stride(1),
        keys, chunk, head_dim ** -0.5,
        KV_HEADS=kv_heads, GROUP=group, GP=GROUP_PAD, D=head_dim, BLOCK_N=BLOCK_N, MAX_SPLITS=most,
        PRECISION=_precision(q.dtype), ROPE_TABLE=rope_table,
        num_warps=NUM_WARPS, **_pdl_options(q.device, release_late),
    )
    return out


# --- products of a few rows ---------------------------------------------------------------------------------

SKINNY_ROWS = 16  # rows a skinny product takes (tl.dot's least tile); more go to F.linear


@torch.library.custom_op("forgather::skinny_linear", mutates_args=())
def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  release_late: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [M, K], weight [N, K]: on a GPU, for M <= SKINNY_ROWS, a Triton kernel
    that streams each weight row once (decode_kernels.skinny_matmul_kernel, autotuned per shape), where
    cuBLAS's kernels for one row reached 1.8-2.6 TB/s of the H200's 4.8 on the 1.24B layer's q/k/v, output
    and down products (docs/benchmarks.md); elsewhere F.linear. `release_late`: skinny_norm_linear's."""
    if not _skinny(x, weight):
        return torch.nn.functional.linear(x, weight, bias)
    return launch_skinny(x.contiguous(), weight, bias, release_late=release_late)


@skinny_linear.register_fake
def _(x, weight, bias=None, release_late=False):
    return x.new_empty((x.shape[0], weight.shape[0]))


def launch_skinny(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: dict | None = None,
                  delta: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                  gated: bool = False, release_late: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run the skinny product's kernel (its tiling chosen by TUNER, or `config`: BLOCK_N, BLOCK_K, SPLIT_K,
    num_warps, num_stages) on x @ weight.T + bias; with `delta` and `norm_weight`, on rms_norm(x + delta) and
    also return x + delta; `gated`: weight holds gate rows then up rows, and the result is silu(gate) * up
    (half weight's rows); `release_late`: skinny_norm_linear's."""
    if TUNER not in ("triton", "graph"):
        raise ValueError(f"decode_attention.TUNER={TUNER!r}; choose 'triton' or 'graph'")
    import triton

    from . import decode_kernels as kernels

    rows = x.shape[0]
    outputs, inner = weight.shape
    if gated:
        if outputs % 2:
            raise ValueError(f"a gated product needs gate and up rows of equal count; weight has {outputs} rows")
        outputs //= 2
    norm = delta is not None
    y = x.new_empty((rows, outputs))
    x_out = torch.empty_like(x) if norm else y
    # split-K's float32 partial tiles (for the most splits a config may take; the norm's products tune among
    # whole-K tilings only) and its per-tile counters
    splits = 1 if norm and (config is None or config.get("SPLIT_K", 1) == 1) else MAX_SPLIT_K
    partial = torch.empty(splits * SKINNY_ROWS * outputs * (2 if gated else 1), dtype=torch.float32,
                          device=x.device)
    args = (x, weight, bias if bias is not None else weight, y, rows, outputs, inner, x.stride(0), weight.stride(0),
            y.stride(0), delta if norm else x, norm_weight if norm else weight, x_out, eps, partial,
            _tile_counters(x.device, outputs))
    constants = dict(HAS_BIAS=bias is not None, M_PAD=SKINNY_ROWS, NORM=norm, GATED=gated,
                     PRECISION=_precision(x.dtype), **_pdl_options(x.device, release_late))
    if config is None and interpreting():
        config = dict(BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=1)
    if config is None and TUNER == "graph":
        config = _graph_tuned(x, weight, bias, delta, norm_weight, eps, gated, release_late)
    if config is not None:
        block_n, block_k, split = config["BLOCK_N"], config["BLOCK_K"], config.get("SPLIT_K", 1)
        kernels.skinny_matmul_kernel[(triton.cdiv(outputs, block_n), split)](
            *args, **constants, BLOCK_N=block_n, BLOCK_K=block_k, EVEN=outputs % block_n == 0 and inner % block_k == 0,
            SPLIT_K=split, num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3))
    else:
        (kernels.skinny_matmul if norm else kernels.skinny_matmul_split)(*args, **constants)
    return (y, x_out) if norm else y


# How the skinny products' tilings are chosen, once per weight shape and options in a process: "graph"
# (tuning.py: each candidate timed as the decode step runs it, launches back to back in a CUDA graph over
# copies of the weight that outgrow L2) or "triton" (Triton's autotuner: each candidate timed call by call,
# the L2 cache flushed). On the H200 the graph tuner's engine decoded the same in two processes (948.8 and
# 948.6 tokens/s with the down product ours) where the autotuner's picks, and so the tokens/s, varied by
# process (910-939): docs/benchmarks.md.
TUNER = "graph"


def skinny_tilings(split: bool) -> list[dict]:
    """The skinny product's candidate tilings (BLOCK_N, BLOCK_K, num_warps, num_stages; SPLIT_K where K is
    split): whole-K ones, and with `split` also split-K ones, for products of few output tiles (the 1.24B
    layer's output and down products: 128 tiles of 16 rows for 132 SMs). Both tuners choose among these."""
    tilings = [dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=stages)
               for block_n in (16, 32, 64) for block_k in (128, 256, 512) for stages in (3, 5)]
    tilings += [dict(BLOCK_N=64, BLOCK_K=256, num_warps=8, num_stages=4),
                dict(BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4)]
    if split:
        tilings += [dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=splits, num_warps=4, num_stages=4)
                    for block_n in (16, 32) for block_k in (128, 256) for splits in (2, 4, 8)]
    return tilings


MAX_SPLIT_K = 8  # the most splits a tiling takes (the split-K partial buffer is sized for it)


def _graph_tuned(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, delta: torch.Tensor | None,
                 norm_weight: torch.Tensor | None, eps: float, gated: bool, release_late: bool) -> dict:
    """The tiling tuning.choose picks for this product (its key: the weight's shape and dtype, the options
    that change the kernel, the device), timed over copies of the weight."""
    from . import tuning

    norm = delta is not None
    key = ("skinny", tuple(weight.shape), weight.dtype, x.dtype, norm, gated, bias is not None, str(x.device),
           tuple(sorted(_pdl_options(x.device, release_late).items())))
    copies = tuning.copies_for(weight.numel() * weight.element_size(), tuning.l2_bytes(x.device))
    # The copies are made on the first timed launch, so a product already chosen copies nothing: this runs on
    # every call, inside the decode step's CUDA graph capture too (where a copy would join every step).
    weights = {0: weight}

    def run(tiling: dict, i: int) -> None:
        if i not in weights:
            weights[i] = weight.clone()
        launch_skinny(x, weights[i], bias, config=tiling, delta=delta, norm_weight=norm_weight, eps=eps,
                      gated=gated, release_late=release_late)

    # the norm's products take whole-K tilings only: a split would recompute the norm's statistics in each
    return tuning.choose(key, skinny_tilings(split=not norm), run, copies)


_TILE_COUNTERS: dict[str, torch.Tensor] = {}
TILE_COUNTERS = 1 << 16  # output tiles of a split-K product at most (weights of up to 1M rows in tiles of 16)


def _tile_counters(device: torch.device, outputs: int) -> torch.Tensor:
    """The split-K products' per-tile counters on `device`, zeros, allocated on first use (the engine's warm-up
    runs before its CUDA graphs are captured) and shared by every product: each tile's last program resets
    its counter, and products run one after another."""
    if outputs > TILE_COUNTERS * 16:
        raise ValueError(f"skinny products take weights of up to {TILE_COUNTERS * 16} rows; got {outputs}")
    key = str(device)
    if key not in _TILE_COUNTERS:
        _TILE_COUNTERS[key] = torch.zeros(TILE_COUNTERS, dtype=torch.int32, device=device)
    return _TILE_COUNTERS[key]


def _pdl_options(device: torch.device, release_late: bool = False) -> dict:
    """The kernels' launch options for PDL (the constants and the launch flag), or none; `release_late`: let
    the next kernel launch after the loads whatever PDL_TRIGGER says."""
    if not dependent_launch(device):
        return {}
    if PDL_TRIGGER not in ("start", "end"):
        raise ValueError(f"decode_attention.PDL_TRIGGER={PDL_TRIGGER!r}; choose 'start' or 'end'")
    return dict(PDL=True, PDL_EARLY=PDL_TRIGGER == "start" and not release_late, launch_pdl=True)


def _skinny(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the Triton kernel takes this product (else the torch path)."""
    return (x.device.type != "cpu" or interpreting()) and x.shape[0] <= SKINNY_ROWS and weight.stride(-1) == 1


@torch.library.custom_op("forgather::skinny_norm_linear", mutates_args=())
def skinny_norm_linear(x: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                       weight: torch.Tensor, bias: torch.Tensor | None = None,
                       gated: bool = False, release_late: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(F.linear(rms_norm(s, norm_weight, eps), weight, bias), s) for s = residual_add(x, delta): the fused
    decoder's norm before a product, in the product's kernel (skinny_linear's, for up to SKINNY_ROWS rows).
    `gated`: the product is a SwiGLU's [gate | up] one, and its activation silu(gate) * up is returned instead,
    computed in the same kernel. `release_late`: under PDL the kernel lets the next one launch only after its
    loads, whatever PDL_TRIGGER says (the fused decoder sets it for all of its kernels where the down product
    is ours: measured faster than releasing at the start, either everywhere or everywhere but before the
    split-K grid)."""
    if not _skinny(x, weight):
        total = residual_add(x, delta)
        y = torch.nn.functional.linear(rms_norm(total, norm_weight, eps), weight, bias)
        if gated:
            gate, up = y.chunk(2, dim=-1)
            y = torch.nn.functional.silu(gate) * up
        return y, total
    return launch_skinny(x.contiguous(), weight, bias, delta=delta.contiguous(), norm_weight=norm_weight, eps=eps,
                         gated=gated, release_late=release_late)


@skinny_norm_linear.register_fake
def _(x, delta, norm_weight, eps, weight, bias=None, gated=False, release_late=False):
    return x.new_empty((x.shape[0], weight.shape[0] // 2 if gated else weight.shape[0])), torch.empty_like(x)


# --- the step's inputs for the next step ----------------------------------------------------------------------

# How advance_inputs runs on a GPU: "triton" (one kernel that also stores the tokens in pinned host memory) or
# "torch" (the same as torch ops and a copy to the host: three launches and a copy-engine transfer).
ADVANCE = "triton"


def _advance_kernels(device: torch.device) -> bool:
    """Whether the advance kernels run on `device`: a GPU that runs Triton (triton_support.triton_runs), or
    Triton's interpreter; elsewhere their torch semantics run."""
    return interpreting() or triton_runs(device)


def _by_kernel(device: torch.device) -> bool:
    """Whether the step's end runs as our kernel (ADVANCE, where the kernels run) rather than as torch ops."""
    if ADVANCE not in ("triton", "torch"):
        raise ValueError(f"decode_attention.ADVANCE={ADVANCE!r}; choose 'triton' or 'torch'")
    return ADVANCE == "triton" and _advance_kernels(device)


def _check_step_buffers(what: str, inputs: torch.Tensor, host: torch.Tensor, batch: int) -> None:
    if inputs.shape != (2, batch) or host.shape != (batch,) or not inputs.is_contiguous() or not host.is_contiguous():
        raise ValueError(f"{what}: inputs [2, {batch}] and host [{batch}], contiguous; got "
                         f"{tuple(inputs.shape)} and {tuple(host.shape)}")


def advance_inputs(inputs: torch.Tensor, greedy: torch.Tensor, scratch: int, host: torch.Tensor) -> None:
    """Feed a decode step's greedy tokens to the next one, on the device: inputs [2, B] (ids, positions) become
    (greedy, positions + 1), positions equal to `scratch` (the rows of no request) staying as they are, and the
    tokens are copied to `host` [B] (pinned on a GPU), where the host reads them once the step is done. The
    engine runs this at the end of every decode step, inside its CUDA graph, so that a step queued ahead needs
    no transfer and no launch before it (engine.py)."""
    batch = greedy.shape[0]
    _check_step_buffers("advance_inputs", inputs, host, batch)
    if _by_kernel(greedy.device) and greedy.is_contiguous():
        import triton

        from . import decode_kernels as kernels

        kernels.advance_kernel[(1,)](inputs, greedy, host, batch, scratch,
                                     BLOCK=max(16, triton.next_power_of_2(batch)), num_warps=1)
        return
    positions = inputs[1]
    inputs[1].copy_(torch.where(positions == scratch, positions, positions + 1))
    inputs[0].copy_(greedy)
    host.copy_(greedy, non_blocking=True)


def greedy_advance(logits: torch.Tensor, inputs: torch.Tensor, scratch: int, host: torch.Tensor) -> torch.Tensor:
    """The greedy ids [B] of `logits` [B, V] (fused.chunked_argmax: argmax's first index), then advance_inputs
    with them: on a GPU one kernel (ADVANCE "triton", a program per row and chunk of the vocabulary) where the
    torch path launches six."""
    from .fused import ARGMAX_CHUNK, chunked_argmax

    batch, vocab = logits.shape
    _check_step_buffers("greedy_advance", inputs, host, batch)
    if _by_kernel(logits.device) and logits.stride(-1) == 1:
        import triton

        from . import decode_kernels as kernels

        chunks = triton.cdiv(vocab, ARGMAX_CHUNK)
        tops, indices, counter = _argmax_workspace(logits.device, batch, chunks)
        greedy = torch.empty(batch, dtype=torch.long, device=logits.device)
        kernels.greedy_advance_kernel[(batch, chunks)](
            logits, tops, indices, counter, inputs, greedy, host, batch, vocab, chunks, logits.stride(0), scratch,
            CHUNK=ARGMAX_CHUNK, BLOCK_C=max(16, triton.next_power_of_2(chunks)), num_warps=4)
        return greedy
    greedy = chunked_argmax(logits)
    advance_inputs(inputs, greedy, scratch, host)
    return greedy


_ARGMAX_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _argmax_workspace(device: torch.device, rows: int, chunks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """greedy_advance's chunk maxima, their indices and per-row counters (zeros; the last program of a row resets
    its counter), made on first use: the engine's warm-up runs before its CUDA graphs are captured."""
    key = (str(device), rows, chunks)
    if key not in _ARGMAX_WORKSPACES:
        _ARGMAX_WORKSPACES[key] = (torch.empty(rows * chunks, dtype=torch.float32, device=device),
                                   torch.empty(rows * chunks, dtype=torch.int32, device=device),
                                   torch.zeros(rows, dtype=torch.int32, device=device))
    return _ARGMAX_WORKSPACES[key]
