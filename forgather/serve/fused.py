"""The engine's fast decode step for Llama-family models: fused projections, one compiled layer function.

A decode step feeds one token per row. At batch 1 its cost is reading the weights once, plus whatever
else the GPU runs: through the models' own modules that is ~30 small kernels a layer (norms in six
pieces, rotary in eight, cache writes, a dense-mask SDPA), which take as long as the matrix products.
This module runs the same arithmetic in few kernels:

- `FusedDecoder.from_model(model, cache)` gathers the weights of either model kind the server loads into
  one layout: a Forgather model whose layers are all `PreLNLayer(RMSNorm, Attention, SwiGLU)` without
  dropout, or a Hugging Face Llama, Mistral, Qwen2 or Qwen3 (SiLU MLP; Qwen3's per-head q/k norms and
  Qwen2's q/k/v biases included). Anything else raises `UnsupportedModel`, and the engine keeps stepping
  through the model's own modules.
- Per layer, the q, k and v weights become one [(heads + 2 kv_heads) * head_dim, hidden] matrix and gate/up
  one [2 * intermediate, hidden]: one matrix-vector product where there were three (and two). The
  modules' own parameters are rebound as views of the fused tensors, so the weights are not held twice and
  the model's forward (the engine's prefill) reads the same memory.
- `decode_layer` is one function for every layer: the previous layer's residual add, norm, q/k/v, rotary,
  the cache write at each row's position, attention over the step's window of the cache (grouped queries as
  [B, kv_heads, group, D] against [B, kv_heads, keys, D]: no copy of the keys per query head), output
  projection, residual, norm, gate/up, SiLU, down. Each residual add is done in float32 and is the first
  thing a norm kernel does: inductor would otherwise fold `x + x @ W.T` into cuBLAS's addmm, which copies x
  into the output before the product (a device-to-device copy and a slower product per add, measured on the
  H200); so a layer returns its down projection unadded (`(x, delta)`) and the next layer, or the
  epilogue's final norm, adds it. On a GPU it goes through torch.compile once (dynamic shapes):
  every layer has the same shapes, so that one compile serves them all, and inductor fuses the norms,
  rotary and SiLU into the products' neighbours. (Inductor's coordinate-descent tuning, which turns
  batch-1 products into tuned reductions, was measured too: no faster on the H200, minutes more at start;
  docs/benchmarks.md.) `prologue` (embedding, cos/sin, the window's mask) and
  `head` (final norm, LM head) are compiled likewise. The greedy argmax runs in two stages (inductor runs a
  one-row argmax over a 128k vocabulary as one thread block, 29 us on the H200, where the row's chunk maxima
  spread it over the GPU): chunked_argmax, and on a GPU decode_attention.greedy_advance, one kernel that also
  writes the next step's inputs. The engine captures the whole
  step in CUDA graphs, two per (batch, window) bucket (engine.py).

The arithmetic is the models' own (RMSNorm in float32 cast back before the weight, rotary in the
activations' dtype, softmax in float32), so greedy tokens match the modules' step; on the CPU nothing is
compiled and the CPU tests hold the two to the same tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from forgather.models.kv_cache import SlotKVCache
from forgather.models.norm import rms_norm

from .decode_attention import (SKINNY_ROWS, decode_attention, reference, residual_add, rotate_and_write,
                               skinny_linear, skinny_norm_linear, workspace)

__all__ = ["FusedDecoder", "UnsupportedModel"]

# Every decoder in a process (one per model shape, dtype and option set) adds graphs to the one cache that
# dynamo keeps for decode_layer's code; the default limit (8) is meant for one function's varying inputs.
RECOMPILE_LIMIT = 64

HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION = ("matmul", "triton", "sdpa", "reduce")
MATMUL = ("torch", "triton", "fused", "fused_down", "fused_all")


def _check_attention(attention: Any, matmul: Any = "torch") -> None:
    for name, value, choices in (("attention", attention, ATTENTION), ("matmul", matmul, MATMUL)):
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{name}={value!r}; choose one of {choices}")


def _compile(fn: Callable, **options: Any) -> Callable:
    """torch.compile(fn, dynamic=True) allowed RECOMPILE_LIMIT graphs. Since torch 2.13 dynamo's config is
    per thread (the engine's thread, which compiles, would not see a limit set here), and torch.compile takes
    the limit itself; before, the config was global."""
    import inspect

    import torch._dynamo

    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        options["recompile_limit"] = RECOMPILE_LIMIT
    else:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(fn, dynamic=True, **options)


class UnsupportedModel(ValueError):
    """A model whose modules the engine cannot drive (the server then decodes one request at a time)."""


@dataclass
class LayerWeights:
    attention_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    feedforward_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


def _fuse(modules: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for `modules` stacked by output rows; each module's parameters become views of it."""
    weight = torch.cat([module.weight.detach() for module in modules])
    biases = [module.bias for module in modules]
    if any(bias is not None for bias in biases) and not all(bias is not None for bias in biases):
        raise UnsupportedModel("some of the projections to fuse have a bias and some do not")
    bias = torch.cat([b.detach() for b in biases]) if biases[0] is not None else None
    start = 0
    for module in modules:
        rows = module.weight.shape[0]
        module.weight = nn.Parameter(weight[start:start + rows], requires_grad=False)
        if bias is not None:
            module.bias = nn.Parameter(bias[start:start + rows], requires_grad=False)
        start += rows
    return weight, bias


STOCK_ATTENTION = ("sdpa_attention", "flex_attention", "eager_attention")  # forgather.models.attention's
# transformers' rotary types whose cos and sin at a position do not depend on the other positions of the call
# (the "dynamic" and "longrope" ones rescale by the longest sequence: computed each step instead)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _same_class(module: Any, cls: type) -> bool:
    """`module` is a `cls`, or an instance of a class of that name: a Forgather directory's generated code
    carries copies of our classes. (The engine then checks the fused step's logits against the modules'.)"""
    return isinstance(module, cls) or type(module).__name__ == cls.__name__


def _bias(module: nn.Linear) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach()


def decode_layer(x: torch.Tensor, delta: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 visible: torch.Tensor, cache: torch.Tensor, w: LayerWeights,
                 heads: int, kv_heads: int, eps: float, qk_eps: float, attention: str = "matmul",
                 workspace: tuple[torch.Tensor, ...] = (), matmul: str = "torch", rope_table: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-LN layer for one token a row, its input the residual stream x + delta ([B, hidden] each: the
    previous layer's output left unadded; cos and sin [B, D]) -> the same pair for its own output. Writes row
    b's key and value at [:, b, :, positions[b]] of the layer's cache pair [2, slots, kv_heads, length + 1, D]
    (SlotKVCache.pairs), and attends over the first `visible.shape[1]` positions (visible
    [B, keys]: True where a row may look). `attention`: "matmul" (two batched products and a softmax between
    them: decode_attention.reference), "triton" (rotary, cache write and attention in one kernel launch on a
    GPU, given the decoder's `workspace`; the matmul path's arithmetic on a CPU: decode_attention.py), "sdpa"
    (scaled_dot_product_attention: one fused kernel on a GPU) or "reduce" (the products as float32 sums over
    broadcast rows, which inductor fuses with the softmax into few kernels of its own). `matmul`: the four
    products by F.linear ("torch"); for up to 16 rows on a GPU, by decode_attention.skinny_linear ("triton"), or
    by it with the residual add and norm before q/k/v and gate/up, and the SwiGLU after gate/up, done in the
    product's kernel, the output and down products left to cuBLAS, as fast or faster on the 1.24B shape
    ("fused": skinny_norm_linear), with the down product by skinny_linear too ("fused_down"), or both those
    (split-K where the autotuner finds it faster: "fused_all", every kernel of the layer ours). `rope_table`
    (attention "triton" only): cos and sin are tables of every cache position, which the kernel reads at each
    row's position, rather than [B, D]. Under PDL, with
    the down product ours every kernel lets the next one launch only after its loads; otherwise
    decode_attention.PDL_TRIGGER says where (a split-K grid always releases late). On a CPU these run their
    torch semantics."""
    # Where the down product is ours (a split-K grid of several waves), every kernel of ours lets the next one
    # launch only after its loads (release_late): on the H200, 1.24B at batch 1, 949-951 tokens/s against
    # 913-915 with only the split-K grid and the kernel before it released late (docs/benchmarks.md).
    late = matmul in ("fused_down", "fused_all")
    ours = functools.partial(skinny_linear, release_late=late)
    linear = ours if matmul in ("triton", "fused_all") else F.linear
    down_linear = ours if matmul in ("triton", "fused_down", "fused_all") else F.linear
    fused = matmul.startswith("fused")
    batch = x.shape[0]
    head_dim = cos.shape[-1]
    if fused:
        qkv, x = skinny_norm_linear(x, delta, w.attention_norm, eps, w.qkv, w.qkv_bias, release_late=late)
    else:
        x = residual_add(x, delta)
        qkv = linear(rms_norm(x, w.attention_norm, eps), w.qkv, w.qkv_bias)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(batch, heads, head_dim), k.view(batch, kv_heads, head_dim), v.view(batch, kv_heads, head_dim)
    if w.q_norm is not None:
        q, k = rms_norm(q, w.q_norm, qk_eps), rms_norm(k, w.k_norm, qk_eps)
    keys = visible.shape[1]
    if attention == "triton":
        attended = decode_attention(q, k, v, cos, sin, positions, cache, keys, *workspace, release_late=late,
                                    rope_table=rope_table)
    elif attention == "matmul":
        attended = reference(q, k, v, cos, sin, positions, cache, keys)
    else:
        grouped, cached_keys, cached_values = rotate_and_write(q, k, v, cos, sin, positions, cache, keys)
        if attention == "sdpa":
            attended = F.scaled_dot_product_attention(grouped, cached_keys, cached_values,
                                                      attn_mask=visible[:, None, None, :])
        else:
            scores = (grouped[:, :, :, None, :].float() * cached_keys[:, :, None].float()).sum(-1) * head_dim ** -0.5
            scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
            weights = scores.softmax(dim=-1)[..., None]  # [B, kv_heads, group, keys, 1]
            attended = (weights * cached_values[:, :, None].float()).sum(-2).to(v.dtype)
    attended = linear(attended.reshape(batch, heads * head_dim), w.o, w.o_bias)
    if fused:
        activated, x = skinny_norm_linear(x, attended, w.feedforward_norm, eps, w.gate_up, w.gate_up_bias, gated=True,
                                          release_late=late)
        return x, down_linear(activated, w.down, w.down_bias)
    x = residual_add(x, attended)
    gate, up = linear(rms_norm(x, w.feedforward_norm, eps), w.gate_up, w.gate_up_bias).chunk(2, dim=-1)
    return x, down_linear(F.silu(gate) * up, w.down, w.down_bias)


ARGMAX_CHUNK = 1024


def chunked_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1) for [B, V], in two stages that keep the GPU busy at batch 1: each chunk's maximum,
    then the first chunk holding the row's maximum, then the first index of it within that chunk (ties go
    to the lowest index, as argmax's do)."""
    batch, vocab = logits.shape
    pad = -vocab % ARGMAX_CHUNK
    if pad:
        logits = F.pad(logits, (0, pad), value=float("-inf"))
    chunks = logits.view(batch, -1, ARGMAX_CHUNK)
    best = chunks.amax(dim=-1).argmax(dim=-1)  # [B]: the first chunk holding the maximum
    within = chunks[torch.arange(batch, device=logits.device), best].argmax(dim=-1)
    return best * ARGMAX_CHUNK + within


class FusedDecoder:
    """The decode step over a SlotKVCache: `decoder(ids [B], positions [B], keys) -> (logits [B, V],
    greedy [B])` for the rows of slots 0..B-1, each at its own position; attention reads the first `keys`
    positions of each slot. Build with `from_model`."""

    def __init__(self, embed: Callable, rope: Callable, final_norm: torch.Tensor, lm_head: torch.Tensor,
                 layers: list[LayerWeights], heads: int, kv_heads: int, head_dim: int, eps: float,
                 qk_eps: float, cache: SlotKVCache, compile: bool, attention: str = "matmul", matmul: str = "torch",
                 static_rope: bool = False):
        self.embed, self.rope, self.final_norm, self.lm_head = embed, rope, final_norm, lm_head
        self.layers, self.heads, self.kv_heads, self.head_dim = layers, heads, kv_heads, head_dim
        self.eps, self.qk_eps, self.cache = eps, qk_eps, cache
        _check_attention(attention, matmul)
        self.attention, self.matmul = attention, matmul
        self.workspace: tuple[torch.Tensor, ...] = ()
        self.zeros: dict[tuple, torch.Tensor] = {}
        # A rotary that depends on the position alone (not on the longest sequence, as a dynamic scaling's does)
        # is a table of every cache position, made once: the step then computes none (on the H200 the rotary of a
        # Hugging Face model was three kernels a step, a float32 product among them), and our attention kernel
        # reads its rows at the positions.
        self.rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None
        if static_rope:
            every = torch.arange(cache.pairs[0].shape[3], device=lm_head.device)
            with torch.no_grad():
                cos, sin = rope(every)
            self.rope_tables = cos.reshape(len(every), -1).contiguous(), sin.reshape(len(every), -1).contiguous()
        self.table_rope = attention == "triton" and self.rope_tables is not None
        if attention == "triton":
            pair = cache.pairs[0]
            self.workspace = workspace(cache.slots, kv_heads, head_dim, pair.shape[3], pair.device)
        self.layer_fn, self.prologue_fn, self.head_fn = decode_layer, self.prologue, self.head
        if compile:  # dynamic: the batch and window buckets share one compiled graph (batch 1 gets its own)
            self.layer_fn = _compile(decode_layer, fullgraph=True)
            self.prologue_fn = _compile(self.prologue)
            self.head_fn = _compile(self.head, fullgraph=True)

    @classmethod
    def from_model(cls, model: Any, cache: SlotKVCache, compile: bool = False, attention: str = "matmul",
                   matmul: str = "torch") -> "FusedDecoder":
        """The decoder for a Forgather or Llama-family Hugging Face model (UnsupportedModel otherwise).
        Rebinds the model's q/k/v and gate/up parameters as views of the fused weights; `compile` compiles
        the step's functions; `attention` is one of ATTENTION and `matmul` one of MATMUL (decode_layer)."""
        _check_attention(attention, matmul)
        options = dict(compile=compile, attention=attention, matmul=matmul)
        inner = getattr(model, "model", None)
        with torch.no_grad():
            if inner is not None and hasattr(inner, "lm_head_weight") and hasattr(inner, "layers"):
                return cls._from_forgather(inner, cache, options)
            if getattr(getattr(model, "config", None), "model_type", None) in HF_MODEL_TYPES:
                return cls._from_hugging_face(model, cache, options)
        raise UnsupportedModel(f"{type(model).__name__} is neither a Forgather Llama-style model nor one of "
                               f"Hugging Face's {', '.join(HF_MODEL_TYPES)}")

    @classmethod
    def _from_forgather(cls, inner: Any, cache: SlotKVCache, options: dict) -> "FusedDecoder":
        from forgather.models.attention import Attention
        from forgather.models.feedforward import SwiGLU
        from forgather.models.layers import PreLNLayer
        from forgather.models.norm import RMSNorm
        from forgather.models.rope import RotaryEmbedding

        def check(ok: bool, what: str) -> None:
            if not ok:
                raise UnsupportedModel(f"the fused decoder runs PreLNLayer(RMSNorm, Attention, SwiGLU) layers; {what}")

        check(_same_class(inner.norm, RMSNorm) and _same_class(inner.rope, RotaryEmbedding),
              "the final norm or rope differs")
        check(not isinstance(getattr(inner, "embedding_dropout", None), nn.Dropout), "embedding dropout")
        layers, eps = [], inner.norm.eps
        for layer in inner.layers:
            sublayer, feedforward = getattr(layer, "attention", None), getattr(layer, "feedforward", None)
            check(_same_class(layer, PreLNLayer), f"a {type(layer).__name__}")
            check(_same_class(sublayer, Attention) and _same_class(feedforward, SwiGLU), "another sublayer")
            check(getattr(sublayer.attention_fn, "__name__", None) in STOCK_ATTENTION, "a custom attention_fn")
            check(all(_same_class(norm, RMSNorm) and norm.eps == eps
                      for norm in (layer.attention_norm, layer.feedforward_norm)), "another norm")
            check(not any(isinstance(m, nn.Dropout) for m in layer.modules()), "dropout")
        for layer in inner.layers:  # every layer checked first: a refused model keeps its parameters as they were
            sublayer, feedforward = layer.attention, layer.feedforward
            qkv, qkv_bias = _fuse([sublayer.q_proj, sublayer.k_proj, sublayer.v_proj])
            gate_up, gate_up_bias = _fuse([feedforward.gate_proj, feedforward.up_proj])
            layers.append(LayerWeights(
                layer.attention_norm.weight.detach(), qkv, qkv_bias, None, None, sublayer.o_proj.weight.detach(),
                _bias(sublayer.o_proj), layer.feedforward_norm.weight.detach(), gate_up, gate_up_bias,
                feedforward.down_proj.weight.detach(), _bias(feedforward.down_proj)))
        first = inner.layers[0].attention
        dtype = inner.lm_head_weight.dtype

        def rope(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            cos, sin = inner.rope(positions[:, None])
            return cos.to(dtype), sin.to(dtype)

        return cls(lambda ids: inner.embed(ids), rope, inner.norm.weight.detach(), inner.lm_head_weight.detach(),
                   layers, first.num_heads, first.num_kv_heads, first.head_dim, eps, eps, cache, **options,
                   static_rope=True)

    @classmethod
    def _from_hugging_face(cls, model: Any, cache: SlotKVCache, options: dict) -> "FusedDecoder":
        config, inner = model.config, model.model
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"hidden_act={config.hidden_act!r}; the fused decoder runs SiLU MLPs")
        layers, q_eps = [], None
        for layer in inner.layers:
            sublayer, mlp = layer.self_attn, layer.mlp
            qkv, qkv_bias = _fuse([sublayer.q_proj, sublayer.k_proj, sublayer.v_proj])
            gate_up, gate_up_bias = _fuse([mlp.gate_proj, mlp.up_proj])
            q_norm, k_norm = getattr(sublayer, "q_norm", None), getattr(sublayer, "k_norm", None)
            if q_norm is not None:
                q_eps = q_norm.variance_epsilon
            layers.append(LayerWeights(
                layer.input_layernorm.weight.detach(), qkv, qkv_bias,
                None if q_norm is None else q_norm.weight.detach(), None if k_norm is None else k_norm.weight.detach(),
                sublayer.o_proj.weight.detach(), _bias(sublayer.o_proj), layer.post_attention_layernorm.weight.detach(),
                gate_up, gate_up_bias, mlp.down_proj.weight.detach(), _bias(mlp.down_proj)))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        scaling = getattr(inner.layers[0].self_attn, "scaling", head_dim ** -0.5)
        if abs(scaling - head_dim ** -0.5) > 1e-9:
            raise UnsupportedModel(f"attention scaling {scaling} is not 1/sqrt(head_dim)")
        eps = inner.norm.variance_epsilon
        embed = inner.embed_tokens

        def rope(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return inner.rotary_emb(embed.weight[:1], positions[:, None])  # weight: the dtype and device

        static = getattr(inner.rotary_emb, "rope_type", "default") in STATIC_ROPE_TYPES
        return cls(lambda ids: embed(ids), rope, inner.norm.weight.detach(), model.lm_head.weight.detach(), layers,
                   config.num_attention_heads, config.num_key_value_heads, head_dim, eps,
                   q_eps if q_eps is not None else eps, cache, **options, static_rope=static)

    def compare(self, ids: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
                seen: list[tuple[torch.Tensor, torch.Tensor]], logits: torch.Tensor) -> float:
        """The largest relative error of this decoder's pieces against the model's modules, given what the
        modules' step of the same rows recorded: (input, output) [B, hidden] of every layer, then of the final
        norm, and its logits. A layer is compared by what it adds to the residual stream."""
        def relative(mine: torch.Tensor, theirs: torch.Tensor) -> float:
            mine, theirs = mine.float(), theirs.float()
            return ((mine - theirs).norm() / theirs.norm().clamp_min(1e-12)).item()

        if len(seen) != len(self.layers) + 1:
            return float("inf")
        x, cos, sin, visible = self.prologue(ids, positions, keys)
        errors = [relative(x, seen[0][0])]
        for index, (weights, (given, output)) in enumerate(zip(self.layers, seen)):
            base, delta = decode_layer(given, torch.zeros_like(given), cos, sin, positions, visible,
                                       self.cache.pairs[index], weights, self.heads, self.kv_heads, self.eps,
                                       self.qk_eps, self.attention, self.workspace, self.matmul, self.table_rope)
            mine = base.float() + delta.float()
            errors.append(relative(mine - given.float(), output.float() - given.float()))
        final = seen[-1][0]
        errors.append(relative(self.head(final, torch.zeros_like(final)), logits))
        return max(errors)

    # --- the step -----------------------------------------------------------------------------------------

    def prologue(self, ids: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor):
        """The embedded tokens [B, hidden], cos/sin [B, D] (the tables themselves where our attention kernel
        reads them: table_rope) and the window's mask [B, keys] (`keys` is an arange over the window; our kernel
        needs only its length, and gets keys[None] without a launch to compute a mask)."""
        if self.table_rope:
            cos, sin = self.rope_tables
        elif self.rope_tables is not None:
            cos, sin = self.rope_tables[0][positions], self.rope_tables[1][positions]
        else:
            cos, sin = self.rope(positions)
            cos, sin = cos.reshape(ids.shape[0], -1), sin.reshape(ids.shape[0], -1)
        visible = keys[None, :] if self.attention == "triton" else keys[None, :] <= positions[:, None]
        return self.embed(ids), cos, sin, visible

    def head(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The final norm and the LM head: the logits [B, V] (the engine's step ends with their greedy argmax, in
        one kernel with the next step's inputs: decode_attention.greedy_advance)."""
        return F.linear(rms_norm(residual_add(x, delta), self.final_norm, self.eps), self.lm_head)

    def _zeros(self, x: torch.Tensor) -> torch.Tensor:
        """Zeros like x, made once per shape and never written (no step writes its inputs): a step starts
        without a launch to clear them."""
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self.zeros:
            self.zeros[key] = torch.zeros_like(x)
        return self.zeros[key]

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, positions [B] (rows of slots 0..B-1); keys: arange(window) on the device -> (logits [B, V],
        greedy ids [B])."""
        logits = self.step(ids, positions, keys)
        return logits, chunked_argmax(logits)

    def step(self, ids: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """__call__'s step up to the logits (head)."""
        x, cos, sin, visible = self.prologue_fn(ids, positions, keys)
        delta = self._zeros(x)  # the residual stream is x + delta (decode_layer)
        # Past SKINNY_ROWS rows our product kernels would run their torch semantics inside an opaque op, where
        # inductor cannot fuse the norms: 1.7x the batch-32 step on the H200. torch's path serves those steps.
        matmul = self.matmul if ids.shape[0] <= SKINNY_ROWS else "torch"
        for index, weights in enumerate(self.layers):
            x, delta = self.layer_fn(x, delta, cos, sin, positions, visible, self.cache.pairs[index], weights,
                                     self.heads, self.kv_heads, self.eps, self.qk_eps, self.attention,
                                     self.workspace, matmul, self.table_rope)
        return self.head_fn(x, delta)
