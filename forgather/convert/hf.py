"""Converting whole model directories: Hugging Face Llama/Mistral/Qwen3 <-> Forgather model directory.

`hf_to_forgather(src, dst)` reads a transformers checkpoint (config.json + safetensors), builds the matching
Forgather model and writes it with `forgather.models.export.save_model`, plus the tokenizer.
`forgather_to_hf(src, dst, family=None)` loads a Forgather model directory, checks that a Llama-family
model can express it, and writes config.json + model.safetensors (+ tokenizer, generation_config.json)
that transformers and vLLM load without remote code. The family defaults to the one a model was converted
from (recorded in its config.json as `forgather_convert.family`), else qwen3 for q/k-norm models, else llama.
Both take `vocab` (vocab.VocabOptions: tokens and roles to add, with the embedding rows to hold them, a chat
template), `dtype` ("float32", "bfloat16" ...; default: the dtype the weights were saved in) and
`max_position_embeddings` (the context length written). Both carry what generation needs: the config's
bos/eos/pad ids (the tokenizer's for a role `vocab` sets or the config lacks) and generation_config.json;
and the tokenizer's files, warning when the source has no tokenizer.
Both refuse a destination that exists unless `overwrite`, and write it through a staging directory renamed
into place at the end (`output.staged`), so a failed or killed conversion leaves no half-written model.

Mistral's sliding-window attention is not reproduced: the Forgather model attends to the whole context,
which equals Mistral for sequences up to `sliding_window` tokens (and Mistral models that have none).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from .output import staged
from .spec import (COMPONENTS_FILE, FAMILIES, ConversionError, DecoderSpec, forgather_tree, hf_config,
                   spec_from_hf_config, spec_from_model)
from .vocab import (VocabOptions, apply_vocab, copy_tokenizer, grow_vocabulary, has_tokenizer, initialize_rows,
                    load_tokenizer)
from .weights import read_safetensors, to_forgather_names, to_hf_names, write_safetensors

DEFAULT_CONTEXT = 2048  # max_position_embeddings for a model that never recorded one
TOKEN_ROLES = ("bos", "eos", "pad")


def _torch_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {name!r}; use float32, bfloat16 or float16")
    return dtype


def _tokenizer(src: Path, vocab: VocabOptions, vocab_size: int) -> tuple[Any | None, dict[int, str]]:
    """The source tokenizer with `vocab`'s changes made, and the new tokens' {id: init}; None when there is
    none (and nothing to change). A tokenizer with more tokens than the model's `vocab_size` rows is warned
    about: the embedding grows to hold them, which changes every next-token distribution."""
    if not has_tokenizer(src):
        if vocab.changes_tokenizer():
            raise ValueError(f"cannot add tokens or set a chat template: {src} has no tokenizer (tokenizer.json or "
                             "tokenizer.model)")
        return None, {}
    tokenizer = load_tokenizer(src)
    if len(tokenizer) > vocab_size:
        warnings.warn(f"{src}: its tokenizer has {len(tokenizer)} tokens and its model only {vocab_size} embedding "
                      f"rows; the converted model's embedding grows to hold them (new rows at the mean row), so its "
                      f"output distribution covers tokens the model never learned: if that tokenizer is not the "
                      f"model's, put the model's own tokenizer in {src}", stacklevel=4)
    return tokenizer, apply_vocab(tokenizer, vocab)


def _write_tokenizer(tokenizer: Any | None, src: Path, dst: Path, vocab: VocabOptions) -> None:
    if tokenizer is not None and vocab.changes_tokenizer():
        tokenizer.save_pretrained(str(dst))
        return
    copy_tokenizer(src, dst)  # also the files of a tokenizer that load_tokenizer cannot read (vocab.json ...)


def _warn_without_tokenizer(src: Path, dst: Path) -> None:
    if not has_tokenizer(src) and not (src / "vocab.json").is_file():
        warnings.warn(f"{src} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json), so {dst} has none; "
                      f"copy the model's tokenizer files into {dst} before serving or training it", stacklevel=3)


def _token_ids(recorded: dict, tokenizer: Any | None, vocab: VocabOptions) -> dict[str, Any]:
    """bos/eos/pad ids for the converted config: the source config's (eos may be a list), else the tokenizer's;
    the tokenizer's for a role that `vocab` sets."""
    ids = {}
    for role in TOKEN_ROLES:
        from_tokenizer = getattr(tokenizer, f"{role}_token_id", None)
        from_config = recorded.get(f"{role}_token_id")
        ids[role] = from_tokenizer if f"{role}_token" in vocab.roles or from_config is None else from_config
    return ids


def _write_generation_config(src: Path, dst: Path, token_ids: dict[str, Any], vocab: VocabOptions,
                             config: Any | None = None) -> None:
    """The source's generation_config.json (sampling defaults, eos ids) with the roles `vocab` sets; without
    one, the defaults of `config` when given (else none is written)."""
    from transformers import GenerationConfig

    if (src / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(str(src))
        for role in TOKEN_ROLES:
            if f"{role}_token" in vocab.roles:
                setattr(generation, f"{role}_token_id", token_ids[role])
    elif config is not None:
        generation = GenerationConfig.from_model_config(config)
    else:
        return
    generation.save_pretrained(str(dst))


def _read_config(src: Path) -> dict:
    """`src`'s config.json, checked to be a family this converter reads before transformers parses it."""
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{src} has no config.json; give a Hugging Face model directory")
    try:
        recorded = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{config_file}:{error.lineno}: not valid JSON ({error.msg}); copy it again from where "
                              f"the model came from") from None
    model_type = recorded.get("model_type") if isinstance(recorded, dict) else None
    if model_type not in FAMILIES:
        what = f"model_type {model_type!r} is" if model_type is not None else "no model_type: the model is"
        raise ConversionError(f"{config_file}: {what} not convertible; supported: {', '.join(FAMILIES)}")
    return recorded


def _convert_state(
    state: dict[str, torch.Tensor], spec: DecoderSpec, tokenizer: Any | None, vocab: VocabOptions, dtype: str | None,
    new_tokens: dict[int, str],
) -> tuple[dict[str, torch.Tensor], DecoderSpec]:
    state, vocab_size = grow_vocabulary(state, spec.vocab_size, tokenizer, vocab.pad_to_multiple_of)
    state = initialize_rows(state, new_tokens)
    target = _torch_dtype(dtype)
    if target is not None:
        state = {name: tensor.to(target) for name, tensor in state.items()}
    return state, dataclasses.replace(spec, vocab_size=vocab_size)


def _unfit_weights(error: RuntimeError, directory: Path) -> ConversionError | None:
    """torch's "Error(s) in loading state_dict" as one line naming the model directory and the first mismatch
    (a config.json edited, or copied from another model); None for any other error."""
    if not str(error).startswith("Error(s) in loading state_dict"):
        return None
    mismatch = next((line.strip().rstrip(".") for line in str(error).splitlines()[1:] if line.strip()), "")
    return ConversionError(f"{directory}: its weights do not fit its config.json ({mismatch}); the two come from "
                           f"different models: copy the model directory again")


def _dtype_name(state: dict[str, torch.Tensor]) -> str:
    return str(next(iter(state.values())).dtype).removeprefix("torch.")


def hf_to_forgather(
    src: str | Path,
    dst: str | Path,
    name: str | None = None,
    dtype: str | None = None,
    vocab: VocabOptions = VocabOptions(),
    overwrite: bool = False,
    max_position_embeddings: int | None = None,
) -> Path:
    """Write the Hugging Face model in `src` as a Forgather model directory `dst`; returns `dst`.
    `max_position_embeddings` replaces the source's context length."""
    src, dst = Path(src), Path(dst)
    with staged(dst, overwrite, source=src) as out:
        _hf_to_forgather(src, out, name, dtype, vocab, max_position_embeddings)
    _warn_without_tokenizer(src, dst)
    return dst


def _hf_to_forgather(src: Path, dst: Path, name: str | None, dtype: str | None, vocab: VocabOptions,
                     max_position_embeddings: int | None) -> None:
    from transformers import AutoConfig

    from forgather.models.export import build_model, save_model

    recorded = _read_config(src)
    config = AutoConfig.from_pretrained(str(src))
    try:
        spec = spec_from_hf_config(config)
    except ConversionError as error:
        raise ConversionError(f"{src / 'config.json'}: {error}") from None
    if max_position_embeddings:
        spec = dataclasses.replace(spec, max_position_embeddings=max_position_embeddings)
    sliding_window = getattr(config, "sliding_window", None)
    if sliding_window and (config.model_type == "mistral" or getattr(config, "use_sliding_window", False)):
        warnings.warn(f"sliding-window attention becomes full attention: outputs equal the original's for "
                      f"sequences up to {sliding_window} tokens", stacklevel=2)
    tokenizer, new_tokens = _tokenizer(src, vocab, spec.vocab_size)
    state = to_forgather_names(read_safetensors(src), spec.tie_embeddings)
    state, spec = _convert_state(state, spec, tokenizer, vocab, dtype, new_tokens)
    tree = forgather_tree(spec)
    with torch.device("meta"):  # no time spent initializing weights that are replaced at once
        model = build_model(tree)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise _unfit_weights(error, src) or error from None
    token_ids = _token_ids(recorded, tokenizer, vocab)
    save_model(model.eval(), tree, dst, name or config.model_type, base_dir=str(COMPONENTS_FILE.parent))
    _record(dst / "config.json", max_position_embeddings=spec.max_position_embeddings,
            **{f"{role}_token_id": token_id for role, token_id in token_ids.items() if token_id is not None},
            forgather_convert={"family": config.model_type, "source": str(src.resolve())})
    _write_generation_config(src, dst, token_ids, vocab)
    _write_tokenizer(tokenizer, src, dst, vocab)


def _record(config_file: Path, **values: Any) -> None:
    """Add keys to an exported config.json (its configuration class keeps unknown keys as attributes)."""
    config = json.loads(config_file.read_text())
    config.update(values)
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def forgather_to_hf(
    src: str | Path,
    dst: str | Path,
    family: str | None = None,
    dtype: str | None = None,
    vocab: VocabOptions = VocabOptions(),
    max_position_embeddings: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the Forgather model directory `src` as a Hugging Face `family` checkpoint in `dst`; returns `dst`."""
    src, dst = Path(src), Path(dst)
    with staged(dst, overwrite, source=src) as out:
        _forgather_to_hf(src, out, family, dtype, vocab, max_position_embeddings)
    _warn_without_tokenizer(src, dst)
    return dst


def _forgather_to_hf(src: Path, dst: Path, family: str | None, dtype: str | None, vocab: VocabOptions,
                     max_position_embeddings: int | None) -> None:
    from safetensors import SafetensorError

    from forgather.models.export import load_model

    recorded = json.loads((src / "config.json").read_text())
    try:
        model = load_model(src)
    except SafetensorError as error:  # a copy cut short, a file written over
        raise ConversionError(f"{src / 'model.safetensors'}: not a readable safetensors file ({error}); copy the "
                              f"model directory again") from None
    except RuntimeError as error:
        raise _unfit_weights(error, src) or error from None
    context = max_position_embeddings or recorded.get("max_position_embeddings") or DEFAULT_CONTEXT
    spec = spec_from_model(model, context)
    family = family or recorded.get("forgather_convert", {}).get("family") or ("qwen3" if spec.qk_norm else "llama")
    tokenizer, new_tokens = _tokenizer(src, vocab, spec.vocab_size)
    # load_model builds the model in float32: without --dtype, the weights go back to the dtype they were saved in
    state, spec = _convert_state(model.state_dict(), spec, tokenizer, vocab, dtype or recorded.get("dtype"), new_tokens)
    token_ids = _token_ids(recorded, tokenizer, vocab)
    config = hf_config(spec, family, _dtype_name(state), token_ids)
    config.save_pretrained(str(dst))
    _write_generation_config(src, dst, token_ids, vocab, config)
    write_safetensors(to_hf_names(state), dst / "model.safetensors")
    _write_tokenizer(tokenizer, src, dst, vocab)
