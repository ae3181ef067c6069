"""Multi-head / grouped-query self-attention with a pluggable attention function.

`Attention(x [B, T, H], rope, mask, kv_cache) -> [B, T, H]` projects queries, keys and values, rotates
them with RoPE, appends keys/values to the layer's cache, and calls the attention function:
`fn(q [B, heads, Tq, D], k, v [B, kv_heads, Tk, D], mask, dropout_p) -> [B, heads, Tq, D]`.
The functions -- "sdpa" (PyTorch fused), "flex" (flex attention with a block mask), "packed" (our Triton kernels
for packed documents on GPUs, packed_attention.py), "eager" (the explicit reference) -- all honour one
`AttentionMask`: causal, and within a document when document ids are given.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import typing
import warnings
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import flex_attention as flex

from .checks import positive_sizes, probabilities
from .fused import fusable, fused_attention_projections, fused_linear, fused_product, fusion
from .kv_cache import LayerKVCache
from .rope import apply_rotary
from .triton_ops import triton_ops


def document_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Packed rows: a position of 0 starts a new document. [B, T] -> document index per token [B, T]."""
    return (position_ids == 0).cumsum(dim=-1)


def document_bounds(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Document ids [B, T] -> (start, end), int32 [B, T]: the first position of each token's document and one
    past its last, each run of one id a document (ids nondecreasing along a row, as packing's are, give the
    same mask as comparing ids)."""
    batch, length = document_ids.shape
    positions = torch.arange(length, device=document_ids.device).expand(batch, length)
    begins = torch.ones_like(document_ids, dtype=torch.bool)
    begins[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start = torch.where(begins, positions, 0).cummax(dim=1).values
    ends = torch.ones_like(begins)
    ends[:, :-1] = begins[:, 1:]
    end = torch.where(ends, positions + 1, length).flip(1).cummin(dim=1).values.flip(1)
    return start.to(torch.int32), end.to(torch.int32)


class AttentionMask:
    """Which keys each query may see, shared by every layer of one forward pass.

    Queries are the last `num_queries` of `num_keys` tokens (earlier keys come from the KV cache). Key j is
    visible to query i when j <= i (causal) and, if `document_ids` [B, num_keys] is given, both tokens lie in
    the same document. The dense and block-mask forms are built on first use and reused by later layers.
    """

    def __init__(
        self, num_queries: int, num_keys: int, document_ids: torch.Tensor | None, device: torch.device
    ) -> None:
        self.num_queries = num_queries
        self.num_keys = num_keys
        self.query_offset = num_keys - num_queries
        self.document_ids = document_ids
        self.device = device
        # Built on first use. Not functools.cached_property: its lock (Python 3.11) breaks torch.compile graphs.
        self._dense: torch.Tensor | None = None
        self._block_mask: flex.BlockMask | None = None
        self._bounds: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def is_plain_causal(self) -> bool:
        """True when a square causal mask says it all (SDPA's `is_causal=True` fast path)."""
        return self.document_ids is None and self.query_offset == 0

    @property
    def dense(self) -> torch.Tensor:
        """Boolean [B or 1, 1, Tq, Tk]; True where attention is allowed."""
        if self._dense is None:
            self._dense = self._build_dense()
        return self._dense

    @property
    def block_mask(self) -> flex.BlockMask:
        """The same mask as a flex-attention BlockMask."""
        if self._block_mask is None:
            self._block_mask = self._build_block_mask()
        return self._block_mask

    @property
    def document_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The documents' (start, end) per token, int32 [B, num_keys] (`document_bounds`); needs document ids."""
        if self._bounds is None:
            self._bounds = document_bounds(self.document_ids)
        return self._bounds

    def _build_dense(self) -> torch.Tensor:
        query_index = torch.arange(self.num_queries, device=self.device)[:, None] + self.query_offset
        key_index = torch.arange(self.num_keys, device=self.device)[None, :]
        allowed = (key_index <= query_index)[None, None]
        if self.document_ids is not None:
            query_docs = self.document_ids[:, self.query_offset :]
            allowed = allowed & (query_docs[:, None, :, None] == self.document_ids[:, None, None, :])
        return allowed

    def _build_block_mask(self) -> flex.BlockMask:
        offset, docs = self.query_offset, self.document_ids

        def causal_in_document(b, h, q_idx, kv_idx):
            visible = kv_idx <= q_idx + offset
            if docs is None:
                return visible
            return visible & (docs[b, q_idx + offset] == docs[b, kv_idx])

        batch = None if docs is None else docs.shape[0]
        # Packed training rows on a GPU: built eagerly, the mask costs ~7.5 ms at 4 x 2048 tokens on an H100,
        # compiled 2.7 ms (scripts/bench_block_mask.py). Not for prompts (lengths vary: one compile each), nor
        # inside a compiled layer (dynamo traces the mask into the graph there anyway).
        compiled = (
            self.device.type == "cuda" and docs is not None and offset == 0 and not torch.compiler.is_compiling()
        )
        return flex.create_block_mask(
            causal_in_document, batch, None, self.num_queries, self.num_keys, device=str(self.device),
            _compile=compiled,
        )


def _is_gqa(q: torch.Tensor, k: torch.Tensor) -> bool:
    return q.shape[1] != k.shape[1]


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, dropout_p: float = 0.0
) -> torch.Tensor:
    """PyTorch scaled_dot_product_attention; a plain causal mask uses its `is_causal` fast path."""
    attn_mask = None if mask.is_plain_causal else mask.dense
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=mask.is_plain_causal, enable_gqa=_is_gqa(q, k)
    )


_compiled_flex_attention: Callable | None = None


def _uncompiled_flex_attention(*args, **kwargs) -> torch.Tensor:
    """Flex attention run eagerly; torch warns that this path is unfused, which on CPU is the point."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex.flex_attention(*args, **kwargs)


def _flex_kernel(device: torch.device) -> Callable:
    """Compiled flex attention on GPUs (compiled once per process); the eager path on CPU.

    On CPU, torch 2.13 runs flex attention eagerly (it materializes the scores) and compiling costs ~12 s,
    which is not worth it for the small models a CPU serves. Inside an outer torch.compile, dynamo
    compiles flex attention in place.
    """
    global _compiled_flex_attention
    if torch.compiler.is_compiling():
        return flex.flex_attention
    if device.type == "cpu":
        return _uncompiled_flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex.flex_attention)
    return _compiled_flex_attention


FLEX_MIN_QUERIES = 128  # one flex-attention tile


def _flex_unavailable(q: torch.Tensor, k: torch.Tensor, mask: AttentionMask) -> bool:
    """Where flex attention is not used: backward on CPU (torch 2.13 has none), and, on a GPU, fewer queries
    than one tile (KV-cache decoding): compiled flex attention failed there in one decoding test (torch 2.11,
    H100, inductor NoValidChoicesError after several recompiles), and a dense mask of a few rows costs little."""
    if q.device.type == "cpu":
        return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    return mask.num_queries < FLEX_MIN_QUERIES


# Flex attention's tiling for packed documents where torch's own default was measured slower, by (GPU compute
# capability, dtype, head dim). Hopper, bf16, head dim 64: torch's heuristics tile the forward 128 x 128 and the
# backward 64 / 128 with 8 warps (torch 2.13's template_heuristics) over the mask's 128-token blocks; finer tiles
# waste less of the blocks that straddle short documents. On the training bench's own rows (stdlib corpus, ~19
# documents of median ~52 tokens a row of 2,048) this tiling is 1.25x on the attention alone (forward +
# backward) and 1.02x on the whole 1.24B training step, H200, 2026-12-04 (scripts/bench_step_pieces.py --duel
# --sweep; scripts/gpu_check_train.sh k and l; docs/benchmarks.md). Every tile divides the 128-token blocks that
# AttentionMask builds. Plain causal rows keep torch's default (the forward tiling measured level there); other
# GPUs, dtypes and head dims were not measured.
PACKED_TILINGS: dict[tuple[tuple[int, int], torch.dtype, int], dict[str, Any]] = {
    ((9, 0), torch.bfloat16, 64): dict(fwd_BLOCK_M=64, fwd_BLOCK_N=64, fwd_num_warps=4, fwd_num_stages=3,
                                       bwd_BLOCK_M1=64, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=64,
                                       bwd_num_warps=4, bwd_num_stages=3),
}


def packed_kernel_options(q: torch.Tensor, packed: bool) -> dict[str, Any] | None:
    """The measured tiling of PACKED_TILINGS for q's GPU, dtype and head dim when the mask holds documents
    (`packed`); None (torch's own choice) otherwise. torch.cuda.get_device_properties is folded to a constant
    under torch.compile, so a compiled layer asks this when it is traced, not every step."""
    if not packed or q.device.type != "cuda":
        return None
    properties = torch.cuda.get_device_properties(q.device)
    return PACKED_TILINGS.get(((properties.major, properties.minor), q.dtype, q.shape[-1]))


def flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, dropout_p: float = 0.0,
    kernel_options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Flex attention with the mask as a BlockMask: packed documents cost no more than one long row.

    Where flex attention is not used (see `_flex_unavailable`) SDPA computes the same thing with the dense
    mask: same result, no block sparsity -- cheap for the few query rows of a decoding step. `kernel_options`
    (checked by `flex_kernel_options`) choose the GPU kernel's tiling; they change speed, not the result.
    Without them, packed documents get the tiling measured fastest for the GPU, dtype and head
    dim (`packed_kernel_options`), and everything else torch's own.
    """
    if dropout_p:
        raise ValueError(f"flex attention has no attention dropout (dropout_p={dropout_p}); use sdpa or eager")
    if _flex_unavailable(q, k, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=_is_gqa(q, k))
    if kernel_options is None:
        kernel_options = packed_kernel_options(q, mask.document_ids is not None)
    return _flex_kernel(q.device)(q, k, v, block_mask=mask.block_mask, enable_gqa=_is_gqa(q, k),
                                  kernel_options=kernel_options)


def flex_kernel_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Flex attention's kernel options as a plain dict, each key one of torch's `FlexKernelOptions` (optionally
    `fwd_` / `bwd_`-prefixed, for the forward or backward kernel alone) with a value of its type. torch accepts
    any key and ignores those it does not know, so a misspelled tiling would silently change nothing."""
    if not isinstance(options, Mapping):
        raise TypeError(f"kernel_options must be a mapping, e.g. {{fwd_BLOCK_M: 64}}; got {type(options).__name__}")
    declared = getattr(flex, "FlexKernelOptions", None)  # torch >= 2.8; before, the options pass unchecked
    if declared is None:
        return dict(options)
    types = typing.get_type_hints(declared)
    known = [f"{prefix}{key}" for key in types for prefix in ("", "fwd_", "bwd_")]
    for key, value in options.items():
        if key not in known:
            # difflib itself, not forgather.errors.did_you_mean: model files are exported as standalone code
            close = difflib.get_close_matches(str(key), known, n=3)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"kernel_options: {key!r} is not an option of flex attention's kernels{hint} "
                             f"(torch.nn.attention.flex_attention.FlexKernelOptions)")
        kind = types[key.removeprefix("fwd_").removeprefix("bwd_")]
        if kind in (bool, int) and (type(value) is not kind):
            raise ValueError(f"kernel_options: {key} takes {'true or false' if kind is bool else 'an integer'}; "
                             f"got {type(value).__name__} {value!r}")
        if typing.get_origin(kind) is typing.Literal and value not in typing.get_args(kind):
            raise ValueError(f"kernel_options: {key} takes one of {list(typing.get_args(kind))}; got {value!r}")
    return dict(options)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, dropout_p: float = 0.0
) -> torch.Tensor:
    """The textbook computation, softmax(q k^T / sqrt(d) + mask) v, as the reference for the fused ones."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask.dense, float("-inf"))
    weights = F.dropout(scores.float().softmax(dim=-1).to(q.dtype), p=dropout_p)
    return weights @ v


def packed_kernel(options: Mapping[str, Any] | None = None) -> Callable | None:
    """forgather's packed-document attention op (packed_attention.py) with the tiling of `options` (checked
    there), or None where it cannot run: without Triton (CPU builds of torch), and in standalone exported code,
    where forgather is absent -- the module is imported by name, so that code still loads and runs SDPA."""
    try:
        module = importlib.import_module("forgather.models.packed_attention")
    except ImportError:
        return None
    tiles = module.tiling(options)
    try:
        importlib.import_module("triton")
    except ImportError:
        return None
    return functools.partial(module.packed_attention, tiles=tiles)


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, dropout_p: float = 0.0,
    kernel: Callable | None = None,
) -> torch.Tensor:
    """Packed documents on a GPU through our Triton kernels (`kernel`, from `packed_kernel`): a query sees the
    keys from its document's start to itself. Everything else -- rows without documents (SDPA's causal kernel
    is faster there), decoding after a KV cache, the CPU, code without the kernels -- runs SDPA with the same
    mask, so the result never depends on which path ran."""
    if dropout_p:
        raise ValueError(f"packed attention has no attention dropout (dropout_p={dropout_p}); use sdpa or eager")
    if kernel is None or q.device.type != "cuda" or mask.document_ids is None or mask.query_offset:
        return sdpa_attention(q, k, v, mask)
    return kernel(q, k, v, *mask.document_bounds)


ATTENTION_FUNCTIONS: dict[str, Callable] = {
    "sdpa": sdpa_attention,
    "flex": flex_attention,
    "packed": packed_attention,
    "eager": eager_attention,
}

PACKED_HEAD_DIMS = (16, 32, 64, 128)


def _check_divides(divisor_name: str, divisor: int, dividend_name: str, dividend: int) -> None:
    if divisor <= 0 or dividend % divisor:
        raise ValueError(f"Attention: {divisor_name}={divisor} does not divide {dividend_name}={dividend}; choose a "
                         f"{divisor_name} that divides it")


def head_dim(hidden_size: int, num_heads: int) -> int:
    """hidden_size // num_heads, refused where num_heads does not divide it (a config computes the rotary
    embedding's size with this before any attention layer is built to check it)."""
    positive_sizes("Attention", hidden_size=hidden_size, num_heads=num_heads)
    _check_divides("num_heads", num_heads, "hidden_size", hidden_size)
    return hidden_size // num_heads


def check_packed(num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """The shapes attention_fn='packed' takes (num_kv_heads dividing num_heads is checked before)."""
    groups = num_heads // num_kv_heads
    if groups & (groups - 1) or head_dim not in PACKED_HEAD_DIMS:
        raise ValueError(f"attention_fn='packed' stacks each kv head's query heads in one program: it takes "
                         f"num_heads / num_kv_heads a power of two and head_dim in {PACKED_HEAD_DIMS}; got "
                         f"{num_heads} / {num_kv_heads} heads of {head_dim} (use attention_fn='flex')")


class Attention(nn.Module):
    """Causal multi-head attention; grouped-query when `num_kv_heads` < `num_heads` (Ainslie et al., 2023).

    Args:
        hidden_size: model width (passed by the layer: `attention_factory(hidden_size)`).
        num_heads: query heads; must divide hidden_size unless head_dim is given.
        num_kv_heads: key/value heads (default num_heads); must divide num_heads.
        head_dim: per-head size (default hidden_size // num_heads).
        attention_fn: "sdpa", "flex", "packed", "eager", or a callable with the same signature.
        dropout: attention-probability dropout while training (not available with flex or packed).
        bias: biases on the q/k/v/o projections.
        fused_projections: true or "qkv" computes q, k and v as one matmul over the three weights concatenated
            (`forgather.models.fused`: same parameters and state dict), "kv" only k and v, "auto" "qkv" on a GPU
            and separate products elsewhere; projections that are not plain nn.Linear layers (QK-norm variants)
            run separately. With q/k/v as one product, CUDA tensors, rotary tables and no KV cache, the product
            is rotated and split by our Triton op (`forgather.models.fused_rotary`), where Triton is installed.
        kernel_options: with attention_fn="flex", the GPU kernel's options (`flex_kernel_options`), e.g.
            `{fwd_BLOCK_M: 64, fwd_BLOCK_N: 64}`: tilings change speed, not the result. Without them, packed
            documents get the tiling measured fastest for the GPU, dtype and head dim (`PACKED_TILINGS`).
            With attention_fn="packed", each kernel's tiles, e.g. `{dkdv: [32, 32, 8, 3]}`
            (packed_attention.tiling).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        attention_fn: str | Callable = "sdpa",
        dropout: float = 0.0,
        bias: bool = False,
        fused_projections: bool | str = False,
        kernel_options: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        positive_sizes("Attention", hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                       head_dim=head_dim)
        probabilities("Attention", dropout=dropout)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if head_dim is None:
            _check_divides("num_heads", num_heads, "hidden_size", hidden_size)
            head_dim = hidden_size // num_heads
        _check_divides("num_kv_heads", num_kv_heads, "num_heads", num_heads)
        if isinstance(attention_fn, str):
            if attention_fn not in ATTENTION_FUNCTIONS:
                close = difflib.get_close_matches(attention_fn, list(ATTENTION_FUNCTIONS), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"attention_fn={attention_fn!r}; {hint}choose one of {sorted(ATTENTION_FUNCTIONS)}")
            if attention_fn in ("flex", "packed") and dropout:
                raise ValueError(f"attention_fn={attention_fn!r} has no attention dropout, but dropout={dropout}")
            if attention_fn == "packed":
                check_packed(num_heads, num_kv_heads, head_dim)
            if kernel_options and attention_fn not in ("flex", "packed"):
                raise ValueError(f"kernel_options are flex's or packed attention's; attention_fn={attention_fn!r} "
                                 f"takes none (set attention_fn='flex' or 'packed', or leave them out)")
            attention_fn = ATTENTION_FUNCTIONS[attention_fn]
            if attention_fn is packed_attention:
                attention_fn = functools.partial(packed_attention, kernel=packed_kernel(kernel_options))
            elif kernel_options:
                attention_fn = functools.partial(attention_fn, kernel_options=flex_kernel_options(kernel_options))
        elif kernel_options:
            raise ValueError("kernel_options are for attention_fn='flex' or 'packed'; a callable attention_fn takes "
                             "its own")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.attention_fn = attention_fn
        self.dropout = dropout
        self.fused_projections = fusion("Attention", fused_projections)
        ops = triton_ops("fused_rotary") if self.fused_projections not in (False, "kv") else None
        # the op itself, not its module: a model must stay picklable and deep-copyable
        self._rotary_qkv = ops.rotary_qkv if ops is not None else None
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: AttentionMask,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        projections = (self.q_proj, self.k_proj, self.v_proj)
        fused = fused_attention_projections(self.fused_projections, x)
        qkv = (fused is True or fused == "qkv") and fusable(*projections)
        if qkv and rope is not None and kv_cache is None and x.is_cuda and self._rotary_qkv is not None:
            # the product rotated and split by our kernels (fused_rotary.py: its gradient in one pass)
            q, k, v = self._rotary_qkv(fused_product(x, projections), *rope, self.num_heads, self.num_kv_heads)
        else:
            if qkv:
                q, k, v = fused_linear(x, projections)
            elif fused == "kv" and fusable(self.k_proj, self.v_proj):
                q, (k, v) = self.q_proj(x), fused_linear(x, (self.k_proj, self.v_proj))
            else:
                q, k, v = (projection(x) for projection in projections)
            q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in (q, k, v))  # [B, T, heads, D], as stored
            if rope is not None:
                q, k = apply_rotary(q, *rope, heads_dim=2), apply_rotary(k, *rope, heads_dim=2)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, D]
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        y = self.attention_fn(q, k, v, mask, self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).flatten(2))
