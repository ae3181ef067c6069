"""Optimizers: Adafactor (PyTorch reference and Triton kernels), optimizer-in-backward, GaLore and APOLLO.

Configs name an optimizer as a partial called with the parameters (`!partial:forgather.optim:Adafactor`).
Names resolve lazily, so importing this package imports neither torch nor triton:

    Adafactor             adafactor.py            reference, any device
    TritonAdafactor       triton_adafactor.py     same math, fused Triton kernels (CUDA + triton)
    AdamW                 adamw.py                AdamW in fp32 math writing bf16 weights with stochastic rounding
    CompiledAdamW         compiled.py             torch's AdamW, its foreach step compiled on CUDA
    TritonAdamW           triton_adamw.py         torch's AdamW, its CUDA step one Triton launch (CUDA + triton)
    optimizer_in_backward in_backward.py          per-parameter optimizers stepped inside backward
    GaLoreAdamW           galore.py               AdamW on a low-rank SVD projection of 2-D gradients
    ApolloAdamW           apollo.py               APOLLO: AdamW states on a random projection, channel-wise scaling
"""

from __future__ import annotations

from forgather.lazy import lazy_exports

_EXPORTS = {
    "Adafactor": "adafactor",
    "TritonAdafactor": "triton_adafactor",
    "AdamW": "adamw",
    "CompiledAdamW": "compiled",
    "TritonAdamW": "triton_adamw",
    "optimizer_in_backward": "in_backward",
    "OptimizerInBackward": "in_backward",
    "GaLoreAdamW": "galore",
    "ApolloAdamW": "apollo",
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
