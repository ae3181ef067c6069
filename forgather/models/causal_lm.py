"""Causal language model: embedding -> layer stack -> final norm -> LM head, plus KV-cached generate().

Interface the rest of Forgather relies on:
    model(input_ids [B, T], position_ids=None) -> logits [B, T, V]
    model.hidden_states(input_ids, position_ids=None) -> [B, T, H]   (after the final norm, before the head)
    model.lm_head_weight -> [V, H]                                    (the embedding weight when tied)
    model.embed, model.layers (ModuleList), model.norm, model.lm_head (None when tied)
    model.generate(input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_token_id=None,
                   generator=None)
`position_ids` that restart at 0 inside a row mark packed documents; attention then stays inside each one. They are
[B, T], or one row ([1, T] or [T]) for every row of the batch.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import AttentionMask, document_ids_from_positions
from .checks import is_number, positive_sizes, probabilities
from .embedding import TiedGradient, TokenEmbedding
from .kv_cache import KVCache
from .norm import add_and_norm
from .rope import RotaryEmbedding


def _positions_and_documents(
    batch: int, seq: int, position_ids: torch.Tensor | None, kv_cache: KVCache | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions of the new tokens and document ids of all keys (None: one document per row).

    Without `position_ids`, positions continue from the cache (or start at 0). With them, each 0 starts a new
    document, numbered on from the cache's last document.
    """
    past = kv_cache.length if kv_cache is not None else 0
    past_docs = kv_cache.document_ids if kv_cache is not None else None
    if position_ids is None:
        start = kv_cache.position_ids[:, -1:] + 1 if past else 0
        position_ids = (start + torch.arange(seq, device=device)).expand(batch, seq)
        new_docs = None if past_docs is None else past_docs[:, -1:].expand(batch, seq)
    else:
        last_doc = past_docs[:, -1:] if past_docs is not None else 0
        new_docs = last_doc + document_ids_from_positions(position_ids)
    documents = new_docs
    if new_docs is not None and past:
        documents = torch.cat((past_docs if past_docs is not None else new_docs.new_zeros(batch, past), new_docs), 1)
    if kv_cache is not None:
        kv_cache.record(position_ids, documents)
    return position_ids, documents


def _row_positions(position_ids: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """`position_ids` as [B, T]: one row ([1, T] or [T]) serves every row of the batch, as in transformers; any
    other shape is refused here, where it would otherwise fail deep in the attention (or, with flex attention,
    index past the mask's rows)."""
    if position_ids.dim() == 0 or position_ids.dim() > 2 or position_ids.shape[-1] != seq or (
            position_ids.dim() == 2 and position_ids.shape[0] not in (1, batch)):
        raise ValueError(f"CausalLM: position_ids of shape {tuple(position_ids.shape)} do not fit input_ids of shape "
                         f"{(batch, seq)}; give one position per token, [B, T] (or [1, T] for every row)")
    return position_ids.expand(batch, seq)


def _carries_residual(layer: nn.Module) -> bool:
    """Whether `layer` takes the stream as a pair (layers.py): said by the class whose `forward` it runs, so a
    subclass of PreLNLayer with a forward of its own (the one-tensor signature) is called the one-tensor way."""
    return _class_carries_residual(type(layer))


@functools.cache  # asked at every training forward: the class's answer does not change
def _class_carries_residual(layer_class: type) -> bool:
    owner = next((cls for cls in layer_class.__mro__ if "forward" in cls.__dict__), None)
    return owner is not None and bool(owner.__dict__.get("carries_residual", False))


class CausalLM(nn.Module):
    """A decoder-only language model assembled from factories.

    Args:
        vocab_size: number of tokens.
        hidden_size: model width, passed to every factory.
        num_layers: how many times `layer_factory(hidden_size)` is called.
        layer_factory: builds one layer (e.g. a partial of `layers.PreLNLayer`).
        norm_factory: builds the final norm, `norm_factory(hidden_size)`.
        rope: a `RotaryEmbedding` shared by all layers, or None for no position information.
        tie_embeddings: use the embedding matrix as the output projection (no separate `lm_head`).
        embedding_factory: `embedding_factory(vocab_size, hidden_size)`; default `TokenEmbedding`.
        embedding_dropout: dropout on the embedded tokens.
        activation_checkpointing: recompute each layer in backward (torch.utils.checkpoint) to save memory.
        carry_residual: in training without checkpointing, layers that can (`carries_residual`, PreLNLayer) pass
            the residual stream on as a pair, added inside the next norm's kernel (layers.py): the same numbers,
            one kernel fewer a layer, forward and backward.
        init_std: std of the normal init of every nn.Linear (biases start at zero).
        sparse_tied_grad: with a tied head, in training the head's dense gradient takes the embedding's looked-up
            rows in place (embedding.TiedGradient), instead of the lookup writing a dense [V, H] gradient of its
            own that autograd then adds: two weight-sized writes and three reads fewer a step, deterministic.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        layer_factory: Callable[[int], nn.Module],
        norm_factory: Callable[[int], nn.Module],
        rope: RotaryEmbedding | None = None,
        tie_embeddings: bool = True,
        embedding_factory: Callable[[int, int], nn.Module] = TokenEmbedding,
        embedding_dropout: float = 0.0,
        activation_checkpointing: bool = False,
        init_std: float = 0.02,
        carry_residual: bool = True,
        sparse_tied_grad: bool = False,
    ):
        super().__init__()
        positive_sizes("CausalLM", vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers)
        probabilities("CausalLM", embedding_dropout=embedding_dropout)
        if not is_number(init_std) or not init_std >= 0:
            raise ValueError(f"CausalLM: init_std={init_std!r} must be a number >= 0 (the std of the linear layers' "
                             f"normal init, e.g. 0.02)")
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.activation_checkpointing, self.carry_residual = activation_checkpointing, carry_residual
        self.sparse_tied_grad = sparse_tied_grad
        self.embed = embedding_factory(vocab_size, hidden_size)
        self.embedding_dropout = nn.Dropout(embedding_dropout) if embedding_dropout else nn.Identity()
        self.rope = rope
        self.layers = nn.ModuleList(layer_factory(hidden_size) for _ in range(num_layers))
        self.norm = norm_factory(hidden_size)
        self.lm_head = None if tie_embeddings else nn.Linear(hidden_size, vocab_size, bias=False)
        self._check_rope_head_dim()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _check_rope_head_dim(self) -> None:
        for layer in self.layers:
            head_dim = getattr(getattr(layer, "attention", None), "head_dim", None)
            if self.rope is not None and head_dim is not None and head_dim != self.rope.head_dim:
                raise ValueError(f"CausalLM: rope head_dim={self.rope.head_dim} does not match attention "
                                 f"head_dim={head_dim}; build the RotaryEmbedding with the attention's head_dim")

    @property
    def _layers_carry_residual(self) -> bool:
        return getattr(self, "carry_residual", True) and all(map(_carries_residual, self.layers))

    def _sparse_embedding_grad(self) -> bool:
        """Whether this forward's lookup and head share one gradient (`sparse_tied_grad`): tied, training, the
        weight a leaf that autograd accumulates into directly (not FSDP1's views of a flat parameter, not a
        DTensor), and not traced by torch.compile."""
        weight = getattr(self.embed, "weight", None)
        return bool(
            getattr(self, "sparse_tied_grad", False) and self.lm_head is None and isinstance(self.embed, TokenEmbedding)
            and self.training and torch.is_grad_enabled() and weight is not None and weight.requires_grad
            and weight.is_leaf and not hasattr(weight, "device_mesh") and not torch.compiler.is_compiling()
        )

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output projection [V, H]: the embedding weight when tied (in training with `sparse_tied_grad`, the
        same tensor through an autograd node that hands its gradient to the lookup's: embedding.TiedGradient)."""
        if self.lm_head is not None:
            return self.lm_head.weight
        tied = self.__dict__.get("_tied_gradient")
        if tied is not None and torch.is_grad_enabled() and tied.waiting():
            return tied.head(self.embed.weight)
        return self.embed.weight

    def layer_inputs(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, AttentionMask]:
        """What every layer takes besides x: RoPE (cos, sin) and the attention mask.

        Public for pipeline stages, which run a slice of `layers` from outside: only the shape [B, T] and the
        device of `input_ids` are read, so a stage may pass any such tensor (its position_ids, say).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"CausalLM: input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)} (one "
                             f"sequence is input_ids[None])")
        batch, seq = input_ids.shape
        if position_ids is not None:
            position_ids = _row_positions(position_ids, batch, seq)
        past = kv_cache.length if kv_cache is not None else 0
        position_ids, documents = _positions_and_documents(batch, seq, position_ids, kv_cache, input_ids.device)
        rope = self.rope(position_ids) if self.rope is not None else None
        weight = getattr(self.embed, "weight", None)
        if rope is not None and weight is not None and weight.dtype in (torch.bfloat16, torch.float16):
            # apply_rotary rounds the tables to the activations' dtype: for a model stored in half precision do it
            # once here, not in each layer (two launches a layer forward and two in backward, ~0.25 ms a step at
            # the 1.24B shape on an H200). The same values either way; autocast runs (fp32 weights) are unchanged.
            rope = tuple(table.to(weight.dtype) for table in rope)
        return rope, AttentionMask(seq, past + seq, documents, input_ids.device)

    def hidden_states(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        """[B, T] token ids -> [B, T, H] final-normed hidden states."""
        rope, mask = self.layer_inputs(input_ids, position_ids, kv_cache)
        # Only TokenEmbedding takes `tied`; other embedding factories are called as before.
        if self._sparse_embedding_grad():
            self._tied_gradient = TiedGradient()
            embedded = self.embed(input_ids, tied=self._tied_gradient)
        else:
            if self.__dict__.get("_tied_gradient") is not None:  # no attribute write in the common case (compile)
                self._tied_gradient = None
            embedded = self.embed(input_ids)
        x = self.embedding_dropout(embedded)
        checkpointing = self.activation_checkpointing and self.training
        if self.training and not checkpointing and kv_cache is None and self._layers_carry_residual:
            # In training the stream passes between layers as a pair (layers.py): its adds happen inside the next
            # norm's kernel. Not with checkpointing (each layer would keep two inputs, not one), nor in inference,
            # where accelerate's hooks and the serving engine take a layer's output as one tensor.
            delta = None
            for layer in self.layers:
                x, delta = layer(x, rope, mask, None, delta=delta, carry=True)
            return add_and_norm(self.norm, x, delta)[1]
        for index, layer in enumerate(self.layers):
            layer_cache = kv_cache.layers[index] if kv_cache is not None else None
            if checkpointing:
                x = checkpoint(layer, x, rope, mask, layer_cache, use_reentrant=False)
            else:
                x = layer(x, rope, mask, layer_cache)
        return self.norm(x)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        """[B, T] token ids -> [B, T, V] logits."""
        return F.linear(self.hidden_states(input_ids, position_ids, kv_cache), self.lm_head_weight)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend each row of [B, T] by up to `max_new_tokens`; temperature 0 is greedy.

        Rows that produced `eos_token_id` keep emitting it; generation stops once every row has. Returns
        [B, T + generated]. Runs in the module's current mode: call `eval()` first to disable dropout.
        """
        kv_cache = KVCache(len(self.layers))
        logits = self(input_ids, kv_cache=kv_cache)[:, -1]
        tokens = input_ids
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                next_token = next_token.masked_fill(finished, eos_token_id)
                finished |= next_token == eos_token_id
            tokens = torch.cat((tokens, next_token[:, None]), dim=1)
            if step + 1 == max_new_tokens or bool(finished.all()):
                break
            logits = self(next_token[:, None], kv_cache=kv_cache)[:, -1]
        return tokens


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[B, V] logits -> [B] token ids: argmax at temperature 0, else sampling after top-k / top-p filtering."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_largest = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Nucleus sampling (Holtzman et al., 2020): drop a token once the more likely ones already reach top_p.
        outside = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse settings that sample nonsense or fail inside torch: a negative temperature (it inverts the
    distribution), top_k below 1 (a shape error in topk), top_p outside (0, 1] (0 leaves no token: NaN
    probabilities)."""
    if not is_number(temperature) or not temperature >= 0:
        raise ValueError(f"sampling: temperature={temperature!r} must be a number >= 0 (0 is greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"sampling: top_k={top_k!r} must be a positive integer, or None to keep every token")
    if top_p is not None and (not is_number(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"sampling: top_p={top_p!r} must be in (0, 1], or None to keep every token")


def sample_rows(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    top_ps: Sequence[float | None],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """[B, V] logits -> [B] token ids, row i drawn as sample_next_token(logits[i:i+1], temperatures[i], None,
    top_ps[i], generators[i]) draws it (every temperature > 0): the same arithmetic for each row, done for all
    rows at once (one sort of the vocabulary, not one a row), and only each row's draw by its own generator. A
    serving engine samples its batch this way: a row's token does not depend on the other rows."""
    rows = logits.shape[0]
    if not rows == len(temperatures) == len(top_ps) == len(generators):
        raise ValueError(f"sample_rows: {rows} rows of logits, {len(temperatures)} temperatures, {len(top_ps)} top_p "
                         f"values and {len(generators)} generators")
    scaled = logits.float()
    # Divided by each distinct temperature as a Python number, as sample_next_token does: a GPU divides by a
    # scalar as a product with its reciprocal, which can differ in the last bit from dividing by a tensor.
    for temperature in dict.fromkeys(temperatures):
        chosen = [i for i in range(rows) if temperatures[i] == temperature]
        if len(chosen) == rows:
            scaled = scaled / temperature
        else:
            index = torch.tensor(chosen, device=logits.device)
            scaled = scaled.index_copy(0, index, scaled.index_select(0, index) / temperature)
    if any(top_p is not None for top_p in top_ps):
        # A row without top_p keeps every token: its limit is never reached.
        limit = torch.tensor([[math.inf if top_p is None else top_p] for top_p in top_ps], dtype=scaled.dtype,
                             device=logits.device)
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= limit
        scaled = scaled.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    probs = scaled.softmax(dim=-1)
    return torch.cat([torch.multinomial(probs[i:i + 1], num_samples=1, generator=generators[i])[0]
                      for i in range(rows)])
