"""Parameter names and files: Hugging Face Llama-family state dicts <-> Forgather CausalLM state dicts.

One table maps module paths both ways (`self_attn.q_proj` <-> `attention.q_proj`, Qwen3's `self_attn.q_norm`
<-> `attention.q_proj.norm`, ...); the parameter suffix (`.weight`, `.bias`) passes through. Checkpoints are
read from `model.safetensors` or a sharded `model.safetensors.index.json`; PyTorch `.bin` files are not read.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .spec import ConversionError

# Hugging Face module path inside `model.layers.<i>.` -> Forgather module path inside `layers.<i>.`
LAYER_MODULES = {
    "self_attn.q_proj": "attention.q_proj",
    "self_attn.k_proj": "attention.k_proj",
    "self_attn.v_proj": "attention.v_proj",
    "self_attn.o_proj": "attention.o_proj",
    "self_attn.q_norm": "attention.q_proj.norm",
    "self_attn.k_norm": "attention.k_proj.norm",
    "mlp.gate_proj": "feedforward.gate_proj",
    "mlp.up_proj": "feedforward.up_proj",
    "mlp.down_proj": "feedforward.down_proj",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "feedforward_norm",
}
TOP_MODULES = {"model.embed_tokens": "embed", "model.norm": "norm", "lm_head": "lm_head"}
HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
FORGATHER_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
# Buffers some older checkpoints store; they are recomputed from the config.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _rename(name: str, layer_pattern: re.Pattern, layer_prefix: str, layers: dict, top: dict) -> str:
    module, _, parameter = name.rpartition(".")
    match = layer_pattern.fullmatch(module)
    if match and match.group(2) in layers:
        return f"{layer_prefix}{match.group(1)}.{layers[match.group(2)]}.{parameter}"
    if module in top:
        return f"{top[module]}.{parameter}"
    raise ConversionError(f"parameter {name!r} has no counterpart in the other format")


def to_forgather_names(state: dict[str, torch.Tensor], tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """A Hugging Face state dict under Forgather names (a tied checkpoint's copy of the head dropped)."""
    renamed = {}
    for name, tensor in state.items():
        if name.endswith(IGNORED_SUFFIXES) or (tie_embeddings and name == "lm_head.weight"):
            continue
        renamed[_rename(name, HF_LAYER, "layers.", LAYER_MODULES, TOP_MODULES)] = tensor
    return renamed


def to_hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Forgather CausalLM state dict under Hugging Face names."""
    layers = {ours: theirs for theirs, ours in LAYER_MODULES.items()}
    top = {ours: theirs for theirs, ours in TOP_MODULES.items()}
    return {_rename(name, FORGATHER_LAYER, "model.layers.", layers, top): tensor for name, tensor in state.items()}


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face checkpoint directory (single file or shards)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = _shards(index)
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConversionError(f"{directory} has no model.safetensors (PyTorch .bin checkpoints are not read)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not (directory / file).is_file():
            raise ConversionError(f"{directory / file}: missing; {index.name} lists it among the checkpoint's "
                                  f"{len(files)} files: copy the whole checkpoint again")
        try:
            state.update(load_file(str(directory / file)))
        except SafetensorError as error:  # a copy cut short, a file written over
            raise ConversionError(f"{directory / file}: not a readable safetensors file ({error}); copy it again "
                                  f"from where the model came from") from error
    return state


def _shards(index: Path) -> list[str]:
    """The files a sharded checkpoint's index names, checked to be an index."""
    try:
        content = json.loads(index.read_text())
    except json.JSONDecodeError:
        content = None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(file, str) for file in weight_map.values()):
        raise ConversionError(f"{index}: not a safetensors index (a JSON object whose weight_map maps each tensor "
                              f"to its file); copy it again from where the model came from")
    return sorted(set(weight_map.values()))


def write_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write `state` to `path` with the mode any new file of the user gets (safetensors itself writes 0600)."""
    from safetensors.torch import save_file

    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
