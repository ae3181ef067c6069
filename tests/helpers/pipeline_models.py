"""Tiny models and batches shared by the pipeline-strategy tests and helpers (all seeded, CPU-sized)."""

import functools

import torch

from forgather.models.attention import Attention
from forgather.models.causal_lm import CausalLM
from forgather.models.feedforward import SwiGLU
from forgather.models.layers import PreLNLayer
from forgather.models.norm import RMSNorm
from forgather.models.rope import RotaryEmbedding

VOCAB, HIDDEN, LAYERS, ROWS, SEQ = 32, 32, 4, 8, 12


def causal_lm(tie_embeddings: bool = True, seed: int = 0) -> CausalLM:
    """A four-layer Llama-style model, the same weights for a given seed."""
    torch.manual_seed(seed)
    layer = functools.partial(
        PreLNLayer,
        attention_factory=functools.partial(Attention, num_heads=4, num_kv_heads=2),
        feedforward_factory=functools.partial(SwiGLU, intermediate_size=64),
        norm_factory=RMSNorm,
    )
    return CausalLM(VOCAB, HIDDEN, LAYERS, layer, RMSNorm, rope=RotaryEmbedding(HIDDEN // 4, theta=10000.0),
                    tie_embeddings=tie_embeddings)


def packed_batch(seed: int = 1, padded_tail: int = 0) -> dict[str, torch.Tensor]:
    """ROWS rows of two packed documents each (positions restart), padded unevenly so microbatches differ, and
    `padded_tail` more positions at the end of every row."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=generator)
    cut = SEQ // 2
    position_ids = torch.cat((torch.arange(cut), torch.arange(SEQ - cut))).expand(ROWS, SEQ).clone()
    labels = input_ids.clone()
    for row in range(ROWS):
        labels[row, SEQ - row % 5 :] = -100
    if padded_tail:
        labels[:, SEQ - padded_tail :] = -100
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def sequential_model(seed: int = 0) -> torch.nn.Sequential:
    """A plain six-part MLP (6 -> 3 features) for the nn.Sequential path."""
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16), nn.Linear(16, 3))
