"""The Llama-shaped CausalLM the GPU scripts build from sizes (bench_memory.py, bench_pipeline.py,
profile_kernels.py): pre-LN layers of grouped-query attention and SwiGLU around RMSNorm, untied by default as in
the bench shapes. Each script passes its own sizes and settings; the experiments' own models come from
conf/model/llama.yaml."""

from __future__ import annotations

import functools

from forgather.models.attention import Attention
from forgather.models.causal_lm import CausalLM
from forgather.models.feedforward import SwiGLU
from forgather.models.layers import PreLNLayer
from forgather.models.norm import RMSNorm
from forgather.models.rope import RotaryEmbedding


def llama(vocab: int, hidden: int, layers: int, heads: int, intermediate: int, *, kv_heads: int | None = None,
          attention_fn: str = "sdpa", theta: float = 500000.0, mlp_chunk: int | None = None,
          fused_norm: bool = False, tie_embeddings: bool = False, activation_checkpointing: bool = False
          ) -> CausalLM:
    norm = functools.partial(RMSNorm, fused=fused_norm)
    layer = functools.partial(
        PreLNLayer,
        attention_factory=functools.partial(Attention, num_heads=heads, num_kv_heads=kv_heads,
                                            attention_fn=attention_fn),
        feedforward_factory=functools.partial(SwiGLU, intermediate_size=intermediate, chunk_tokens=mlp_chunk),
        norm_factory=norm,
    )
    return CausalLM(vocab, hidden, layers, layer, norm, rope=RotaryEmbedding(hidden // heads, theta=theta),
                    tie_embeddings=tie_embeddings, activation_checkpointing=activation_checkpointing)
