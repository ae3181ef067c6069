"""The dynamic model library: a causal LM assembled from small components, and standalone export.

One file per component, each importing only torch, the standard library and its siblings (so that
`export.py` can inline them into generated code):
    embedding.py    TokenEmbedding(vocab_size, hidden_size)
    rope.py         RotaryEmbedding(head_dim, theta, llama3_scaling=None), apply_rotary
    attention.py    Attention(hidden_size, num_heads, num_kv_heads, attention_fn="sdpa"|"flex"|"packed"|"eager"),
                    AttentionMask (causal, within documents when position_ids restart at 0)
    packed_attention.py  attention_fn="packed": our Triton kernels for packed documents on GPUs (imported by
                    name from attention.py; standalone exported code runs SDPA instead)
    feedforward.py  SwiGLU(hidden_size, intermediate_size, fused=False), GELUMLP(hidden_size, intermediate_size)
    norm.py         RMSNorm(hidden_size, fused=False), LayerNorm(hidden_size), add_and_norm(norm, x, delta),
                    rms_norm / add_rms_norm (the torch semantics of the fused ops)
    fused_rms_norm.py  RMSNorm(fused=True): the residual add + RMSNorm as our Triton ops on GPUs (imported by
                    name from norm.py; standalone exported code runs the torch norm instead)
    fused_rotary.py  rotary_qkv: the fused q/k/v product rotated and split by our Triton ops on GPUs (imported
                    by name from attention.py; elsewhere, and in standalone exported code, apply_rotary)
    fused_swiglu.py  SwiGLU(fused=True): silu(gate) * up as our Triton ops on GPUs (imported by name from
                    feedforward.py; elsewhere, and in standalone exported code, the torch expression)
    triton_ops.py   triton_ops(name): the fused_* modules above where Triton and forgather are present, else None
    layers.py       PreLNLayer / PostLNLayer(hidden_size, attention_factory, feedforward_factory, norm_factory,
                    dropout, residual_dropout)
    causal_lm.py    CausalLM(vocab_size, hidden_size, num_layers, layer_factory, norm_factory, rope,
                    tie_embeddings, activation_checkpointing, ...) with generate()
    kv_cache.py     KVCache(num_layers)
    builder.py      instantiate(tree, resolve): the config-tree builder generated code reuses
    export.py       save_model(model, model_config, out_dir, name), load_model(out_dir)
Every factory is called with `hidden_size` (the embedding factory with `vocab_size, hidden_size`), so a
config sets everything else in partials:

    model: !call:forgather.models.causal_lm:CausalLM
        vocab_size: 32000
        hidden_size: 256
        num_layers: 4
        layer_factory: !partial:forgather.models.layers:PreLNLayer@layer_factory
            attention_factory: !partial:forgather.models.attention:Attention { num_heads: 4, num_kv_heads: 2 }
            feedforward_factory: !partial:forgather.models.feedforward:SwiGLU { intermediate_size: 688 }
            norm_factory: !partial:forgather.models.norm:RMSNorm {}
        norm_factory: !partial:forgather.models.norm:RMSNorm {}
        rope: !call:forgather.models.rope:RotaryEmbedding { head_dim: 64, theta: 500000.0 }

This package file imports nothing, so `import forgather.models` stays torch-free.
"""
