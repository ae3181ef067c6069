"""Token embedding: ids [B, T] -> vectors [B, T, H].

`weight` is a plain [V, H] parameter, so a tied LM head can use it as its output projection.

A tied weight's two gradients, in one pass (`TiedGradient`, what CausalLM's `sparse_tied_grad` turns on). Left
to autograd, the lookup's backward writes a dense [V, H] gradient (a zero fill, then the looked-up rows
scattered in) and autograd adds it to the head's dense [V, H] gradient: three weight-sized passes for a few
thousand rows. Instead the head's use of the weight hands its gradient to the lookup's backward, which adds
the looked-up rows into it in place and returns it as the weight's one gradient.

- The rows go in with `index_put_(accumulate=True)`: the ids sorted, each row's duplicates summed in fp32 and
  added once. On CUDA that is deterministic and never waits for the device. torch's sparse gradient
  (`F.embedding(sparse=True)`, tried before) did neither: dense + sparse copies the dense gradient into a new
  tensor, then adds the rows with atomics.
- The hand-over happens only when the lookup's backward runs later in the same backward pass
  (`torch._C._will_engine_execute_node`, as torch's checkpointing asks). Otherwise the head's gradient goes to
  autograd as usual, so nothing waits in the meeting for a backward that never comes. The cases: the head used
  without the lookup; a second forward's head; `autograd.grad` on other inputs.
- The lookup's backward may run before the head's in the same pass. The engine runs the later-created node
  first when both are ready, and the head's is created after the lookup's, so this does not happen. If it did,
  each gradient would reach autograd whole, which is still right.
- Where no head gradient came, the lookup's backward writes its own dense gradient, as F.embedding's does.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .checks import positive_sizes


class TokenEmbedding(nn.Module):
    """A lookup table of `vocab_size` vectors of size `hidden_size`, times an optional `scale`.

    `scale` multiplies the looked-up vectors (Gemma uses sqrt(hidden_size)); 1.0 leaves them unchanged.
    `tied`: this forward's `TiedGradient`, when a tied head's gradient should take the lookup's rows in place.
    """

    def __init__(self, vocab_size: int, hidden_size: int, scale: float = 1.0, init_std: float = 0.02):
        super().__init__()
        positive_sizes("TokenEmbedding", vocab_size=vocab_size, hidden_size=hidden_size)
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, input_ids: torch.Tensor, tied: TiedGradient | None = None) -> torch.Tensor:
        x = tied.lookup(self.weight, input_ids) if tied is not None else F.embedding(input_ids, self.weight)
        return x * self.scale if self.scale != 1.0 else x


class TiedGradient:
    """Where one forward's two uses of a tied weight meet in backward: `lookup(weight, ids)` for the embedding,
    `head(weight)` for the output projection (the module docstring says how)."""

    def __init__(self) -> None:
        self._node: weakref.ref | None = None  # the lookup's autograd node, while its graph lives
        self._dense: torch.Tensor | None = None  # the head's gradient, handed over
        self._done_in: int | None = None  # the backward pass in which the lookup's backward last ran

    def __getstate__(self) -> dict:  # a copied or pickled model carries no graph
        return {"_node": None, "_dense": None, "_done_in": None}

    def lookup(self, weight: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        out = _Lookup.apply(weight, input_ids, self)
        self._node = weakref.ref(out.grad_fn) if out.grad_fn is not None else None
        return out

    def waiting(self) -> bool:
        """True while the lookup's graph lives: a head used now can hand its gradient over."""
        return self._lookup_node() is not None

    def _lookup_node(self):
        return self._node() if self._node is not None else None

    def head(self, weight: torch.Tensor) -> torch.Tensor:
        return _Head.apply(weight, self)

    def _hand_over(self, grad: torch.Tensor, weight_dtype: torch.dtype) -> bool:
        node = self._lookup_node()
        if (node is None or self._dense is not None or torch.is_grad_enabled()  # create_graph: grads are graphs
                or grad.layout != torch.strided or not grad.is_contiguous() or grad.dtype != weight_dtype):
            return False
        try:
            later = (self._done_in != torch._C._current_graph_task_id()
                     and torch._C._will_engine_execute_node(node))
        except RuntimeError:  # an engine that cannot say (compiled autograd): each gradient goes on whole
            return False
        if later:
            self._dense = grad
        return later

    def _take(self) -> torch.Tensor | None:
        dense, self._dense = self._dense, None
        self._done_in = torch._C._current_graph_task_id()
        return dense


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, input_ids: torch.Tensor, tied: TiedGradient) -> torch.Tensor:
        ctx.save_for_backward(input_ids)
        ctx.tied, ctx.weight_shape, ctx.weight_dtype = tied, weight.shape, weight.dtype
        return F.embedding(input_ids, weight)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        (input_ids,) = ctx.saved_tensors
        dense = ctx.tied._take()
        if dense is None:
            dense = grad_rows.new_zeros(ctx.weight_shape, dtype=ctx.weight_dtype)
        rows = grad_rows.reshape(-1, grad_rows.shape[-1]).to(dense.dtype)
        dense.index_put_((input_ids.reshape(-1),), rows, accumulate=True)
        return dense, None, None


class _Head(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, tied: TiedGradient) -> torch.Tensor:
        ctx.tied, ctx.weight_dtype = tied, weight.dtype
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None if ctx.tied._hand_over(grad, ctx.weight_dtype) else grad), None
