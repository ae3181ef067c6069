"""`DecoderSpec`: the hyperparameters of a Llama-family decoder, the meeting point of both conversion directions.

Llama, Mistral and Qwen3 are one shape (pre-LN RMSNorm layers, RoPE, grouped-query attention, SwiGLU);
they differ in a few switches recorded here. `spec_from_hf_config` reads a transformers config,
`hf_config` writes one, `forgather_tree` builds the Forgather model config tree, and `spec_from_model`
reads a built Forgather model (the plain nn.Module of a model directory) back.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from forgather.models.rope import LLAMA3_SCALING_KEYS

FAMILIES = ("llama", "mistral", "qwen3")
COMPONENTS_FILE = Path(__file__).resolve().parent / "components.py"


class ConversionError(ValueError):
    """A model that the target format cannot express; the message says which part and why."""


@dataclasses.dataclass
class DecoderSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    llama3_scaling: dict | None = None
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 2048


# --- Hugging Face configs --------------------------------------------------------------------------------


def _rope(config: Any) -> tuple[float, dict | None]:
    """(theta, llama3 scaling or None) from a transformers 5 `rope_parameters` or a 4.x `rope_theta`/`rope_scaling`."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type == "llama3":
        return float(theta), {key: params[key] for key in LLAMA3_SCALING_KEYS}
    raise ConversionError(f"rope type {rope_type!r} is not supported; Forgather's RotaryEmbedding has default and llama3")


def spec_from_hf_config(config: Any) -> DecoderSpec:
    """The spec of a transformers LlamaConfig, MistralConfig or Qwen3Config."""
    if config.model_type not in FAMILIES:
        raise ConversionError(f"model_type {config.model_type!r} is not convertible; supported: {', '.join(FAMILIES)}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act={config.hidden_act!r}; Forgather's SwiGLU uses silu")
    theta, llama3_scaling = _rope(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return DecoderSpec(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=theta,
        llama3_scaling=llama3_scaling,
        tie_embeddings=bool(config.tie_word_embeddings),
        attention_bias=bool(getattr(config, "attention_bias", False)),
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        qk_norm=config.model_type == "qwen3",
        max_position_embeddings=config.max_position_embeddings,
    )


def _check_expressible(spec: DecoderSpec, family: str) -> None:
    if family not in FAMILIES:
        raise ConversionError(f"family {family!r}; choose one of {', '.join(FAMILIES)}")
    if spec.qk_norm and family != "qwen3":
        raise ConversionError(f"the model norms each query and key head (q/k norm), which {family} cannot express; "
                              f"convert it to qwen3 (--family qwen3)")
    if family == "qwen3" and not spec.qk_norm:
        raise ConversionError("qwen3 norms each query and key head (q/k norm) and this model has no such norm; "
                              "convert it to llama or mistral (--family llama)")
    if family == "mistral" and (spec.attention_bias or spec.mlp_bias):
        raise ConversionError("Mistral has no projection biases; convert this model to llama")
    if family == "qwen3" and spec.mlp_bias:
        raise ConversionError("Qwen3 has no feed-forward biases; this model has them")


def hf_config(spec: DecoderSpec, family: str, dtype: str, token_ids: dict[str, int | None]) -> Any:
    """A transformers config of `family` for the spec; `token_ids` holds bos/eos/pad ids from the tokenizer."""
    import transformers

    _check_expressible(spec, family)
    rope_scaling = {"rope_type": "llama3", **spec.llama3_scaling} if spec.llama3_scaling else None
    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        hidden_act="silu",
        rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,  # the 4.x spelling; transformers 5 folds it into rope_parameters
        rope_scaling=rope_scaling,
        tie_word_embeddings=spec.tie_embeddings,
        dtype=dtype,
        **{f"{role}_token_id": token_id for role, token_id in token_ids.items()},
    )
    if family == "llama":
        config = transformers.LlamaConfig(attention_bias=spec.attention_bias, mlp_bias=spec.mlp_bias, **common)
    elif family == "mistral":
        # Forgather attention is full causal attention; Mistral without a window computes the same.
        config = transformers.MistralConfig(sliding_window=None, **common)
    else:
        config = transformers.Qwen3Config(attention_bias=spec.attention_bias, use_sliding_window=False, **common)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    return config


# --- Forgather config trees and models -------------------------------------------------------------------


def _rms_norm(eps: float) -> dict:
    # A fresh dict for each use: the exporter rewrites targets in place, node by node.
    return {"_target_": "forgather.models.norm:RMSNorm", "_partial_": True, "eps": eps}


def forgather_tree(spec: DecoderSpec) -> dict:
    """The Forgather model config tree (forgather.models targets, Forgather vocabulary) for the spec."""
    attention = {
        "_target_": "forgather.models.attention:Attention",
        "_partial_": True,
        "num_heads": spec.num_heads,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "bias": spec.attention_bias,
    }
    if spec.qk_norm:
        attention.update(_target_="forgather.convert.components:QKNormAttention", qk_norm_eps=spec.rms_norm_eps)
    rope = {"_target_": "forgather.models.rope:RotaryEmbedding", "head_dim": spec.head_dim, "theta": spec.rope_theta}
    if spec.llama3_scaling:
        rope["llama3_scaling"] = dict(spec.llama3_scaling)
    return {
        "_target_": "forgather.models.causal_lm:CausalLM",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "num_layers": spec.num_layers,
        "layer_factory": {
            "_target_": "forgather.models.layers:PreLNLayer",
            "_partial_": True,
            "attention_factory": attention,
            "feedforward_factory": {
                "_target_": "forgather.models.feedforward:SwiGLU",
                "_partial_": True,
                "intermediate_size": spec.intermediate_size,
                "bias": spec.mlp_bias,
            },
            "norm_factory": _rms_norm(spec.rms_norm_eps),
        },
        "norm_factory": _rms_norm(spec.rms_norm_eps),
        "rope": rope,
        "tie_embeddings": spec.tie_embeddings,
    }


def _class_is(module: nn.Module, name: str, where: str) -> None:
    # Exported code may rename a class on a name clash (`RMSNorm_norm`), so compare the stem.
    found = type(module).__name__
    if found.split("_")[0] != name:
        raise ConversionError(f"{where} is a {found}; Llama-family Hugging Face models need {name} there")


def _layer_values(layer: nn.Module, index: int) -> dict:
    where = f"layers.{index}"
    _class_is(layer, "PreLNLayer", where)
    attention, feedforward = layer.attention, layer.feedforward
    _class_is(feedforward, "SwiGLU", f"{where}.feedforward")
    for norm_name in ("attention_norm", "feedforward_norm"):
        _class_is(getattr(layer, norm_name), "RMSNorm", f"{where}.{norm_name}")
    if layer.attention_norm.eps != layer.feedforward_norm.eps:
        raise ConversionError(f"{where}: the two norms have different eps; Hugging Face has one rms_norm_eps")
    qk_norm = hasattr(attention.q_proj, "norm")
    if qk_norm and attention.q_proj.norm.eps != layer.attention_norm.eps:
        raise ConversionError(f"{where}: q/k norm eps differs from the layer norms' eps")
    return dict(
        intermediate_size=feedforward.gate_proj.out_features,
        num_heads=attention.num_heads,
        num_kv_heads=attention.num_kv_heads,
        head_dim=attention.head_dim,
        rms_norm_eps=layer.attention_norm.eps,
        attention_bias=attention.q_proj.bias is not None,
        mlp_bias=feedforward.gate_proj.bias is not None,
        qk_norm=qk_norm,
    )


def spec_from_model(model: nn.Module, max_position_embeddings: int) -> DecoderSpec:
    """The spec of a built Forgather CausalLM, refusing what Hugging Face Llama-family models cannot express."""
    if getattr(model.embed, "scale", 1.0) != 1.0:
        raise ConversionError("the embedding is scaled; Llama-family models use unscaled embeddings")
    if model.rope is None:
        raise ConversionError("the model has no RoPE; Llama-family models need it")
    _class_is(model.norm, "RMSNorm", "norm")
    layers = [_layer_values(layer, index) for index, layer in enumerate(model.layers)]
    for index, values in enumerate(layers):
        if values != layers[0]:
            raise ConversionError(f"layers.{index} differs from layers.0; Hugging Face layers are all alike")
    if model.norm.eps != layers[0]["rms_norm_eps"]:
        raise ConversionError("the final norm's eps differs from the layers'; Hugging Face has one rms_norm_eps")
    vocab_size, hidden_size = model.embed.weight.shape
    return DecoderSpec(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=len(model.layers),
        rope_theta=float(model.rope.theta),
        llama3_scaling=model.rope.llama3_scaling,
        tie_embeddings=model.lm_head is None,
        max_position_embeddings=max_position_embeddings,
        **layers[0],
    )
