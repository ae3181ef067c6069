"""Running a Forgather model that `device_map="auto"` spread over several devices (or offloaded to the CPU).

accelerate moves the tensor arguments of every module it placed to that module's device, and loads offloaded
weights when the module is called. A Forgather model hands two things past that mechanism: each layer's
`AttentionMask` (an object, built on the input's device) and the final projection, a functional call on the
embedding (tied) or head weight in the exported wrapper -- the untied head module is never called.
`forgather_device_map` therefore places the head with the embedding, keeps both on the device the model runs on
(an offloaded one would be read as the meta tensor its hook leaves outside calls), and `align_forgather_devices(model)`
adds two hooks: before each layer, the mask is rebuilt on the layer's device (once per device and forward);
after the final norm, the hidden states move to the projection weight's device. A model on one device
needs neither and gets none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` runs: the device accelerate's hook runs it on (its weights may wait elsewhere, or on the meta
    device when offloaded), else its parameters' device."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    return torch.device(device) if device is not None else next(module.parameters()).device


def input_device(model: nn.Module) -> torch.device:
    """Where the model takes its token ids: where its embedding runs."""
    return execution_device(model.get_input_embeddings())


def _mask_mover() -> Any:
    moved: dict[tuple[int, torch.device], Any] = {}

    def move(layer: nn.Module, args: tuple) -> tuple:
        x, rope, mask, *rest = args
        device = execution_device(layer)
        if mask.device == device:
            return args
        key = (id(mask), device)
        if key not in moved:
            moved.clear()  # masks of earlier forward passes are dead; keep only this one's copies
            documents = None if mask.document_ids is None else mask.document_ids.to(device)
            moved[key] = type(mask)(mask.num_queries, mask.num_keys, documents, device)
        return (x, rope, moved[key], *rest)

    return move


def forgather_device_map(directory: str, max_memory: dict | None, dtype: Any) -> dict | str:
    """accelerate's balanced map for the exported model, with the untied head pinned beside the embedding, and
    both on the device the model runs on (never offloaded)."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    device_map = infer_auto_device_map(empty, max_memory=max_memory, no_split_module_classes=empty._no_split_modules,
                                       dtype=None if dtype == "auto" else dtype)
    main = 0 if torch.cuda.is_available() else "cpu"  # where offloaded modules run
    if set(device_map) == {""} and device_map[""] not in (main, "cuda:0"):  # all offloaded: name the parts
        device_map = {f"model.{name}": device_map[""] for name, _ in empty.model.named_children()}
    if device_map.get("model.embed") in ("cpu", "disk") and device_map["model.embed"] != main:
        # The logits are a functional call on the embedding's (tied) or the head's weight, which no offload hook
        # puts in place (it would read the meta tensor left behind): both stay where the model runs.
        device_map["model.embed"] = main
    if "model.lm_head" in device_map and "model.embed" in device_map:
        device_map["model.lm_head"] = device_map["model.embed"]
    return device_map


def spans_devices(model: nn.Module) -> bool:
    device_map = getattr(model, "hf_device_map", None) or {}
    return len({str(device) for device in device_map.values()}) > 1


def align_forgather_devices(model: nn.Module) -> None:
    """Hooks that let a Forgather model (the exported wrapper, `model.model` the CausalLM) run spread over devices."""
    if not spans_devices(model):
        return
    inner = model.model
    move_mask = _mask_mover()
    for layer in inner.layers:
        layer.register_forward_pre_hook(move_mask)
    inner.norm.register_forward_hook(lambda module, args, output: output.to(inner.lm_head_weight.device))
