"""A tiny forgather.models CausalLM and one learnable toy batch, shared by the Lightning tests."""

import functools

import torch
from torch.utils.data import DataLoader

from forgather.models.attention import Attention
from forgather.models.causal_lm import CausalLM
from forgather.models.feedforward import SwiGLU
from forgather.models.layers import PreLNLayer
from forgather.models.norm import RMSNorm
from forgather.models.rope import RotaryEmbedding

VOCAB, HIDDEN, BATCH, SEQ = 16, 32, 4, 8


def tiny_model(vocab_size: int = VOCAB) -> CausalLM:
    """A two-layer Llama-style model (tied head, RoPE, GQA, SwiGLU, RMSNorm)."""
    layer = functools.partial(
        PreLNLayer,
        attention_factory=functools.partial(Attention, num_heads=4, num_kv_heads=2),
        feedforward_factory=functools.partial(SwiGLU, intermediate_size=64),
        norm_factory=RMSNorm,
    )
    return CausalLM(vocab_size, HIDDEN, 2, layer, RMSNorm, rope=RotaryEmbedding(HIDDEN // 4, theta=10000.0))


def padded_batch() -> dict[str, torch.Tensor]:
    """Four random rows; the first two are mostly padding (2 targets each), the last two full (SEQ - 1 each)."""
    ids = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:2, 3:] = -100
    return {"input_ids": ids, "labels": labels}


def toy_loader(batches: int = 1) -> DataLoader:
    """The same learnable batch (each row counts up from a different start), padding in the last column."""
    input_ids = (torch.arange(SEQ) + torch.arange(BATCH)[:, None]) % VOCAB
    labels = input_ids.clone()
    labels[:, -1] = -100
    sample = {"input_ids": input_ids, "position_ids": torch.arange(SEQ).expand(BATCH, SEQ), "labels": labels}
    return DataLoader([sample] * batches, batch_size=None)


def tiny_tree(
    vocab_size: int,
    feedforward: str = "forgather.models.feedforward:SwiGLU",
    tie_embeddings: bool = True,
    rope_theta: float = 10000.0,
    norm_eps: float = 1e-6,
) -> dict:
    """The same shape of model written in Forgather's config vocabulary, as training configs build it."""

    def partial(target: str, **kwargs) -> dict:
        return {"_target_": target, "_partial_": True, **kwargs}

    return {
        "_target_": "forgather.models.causal_lm:CausalLM",
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "num_layers": 2,
        "init_std": 0.3,
        "layer_factory": partial(
            "forgather.models.layers:PreLNLayer",
            attention_factory=partial("forgather.models.attention:Attention", num_heads=4, num_kv_heads=2),
            feedforward_factory=partial(feedforward, intermediate_size=64),
            norm_factory=partial("forgather.models.norm:RMSNorm", eps=norm_eps),
        ),
        "norm_factory": partial("forgather.models.norm:RMSNorm", eps=norm_eps),
        "rope": {"_target_": "forgather.models.rope:RotaryEmbedding", "head_dim": HIDDEN // 4, "theta": rope_theta},
        "tie_embeddings": tie_embeddings,
    }
