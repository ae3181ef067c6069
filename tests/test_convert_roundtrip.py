"""Hugging Face -> Forgather -> Hugging Face gives back the checkpoint the user started from: the same logits
(fp32: 1e-5 absolute; the weights are copied, not recomputed), the same config.json field for field, the same
dtype and generation_config.json; for every family, tied or untied, GQA/MQA, rope_theta, biases, and a
vocabulary that is no multiple of 8. A run's checkpoint exported and converted loads in transformers without
remote code and gives the logits of the model it was trained as."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from forgather.cli.main import main as forgather_main
from forgather.convert.hf import forgather_to_hf, hf_to_forgather
from forgather.models.export import load_model
from test_convert import random_hf_model, token_ids, tokenizer  # noqa: F401 (a fixture)
from test_run import run, run_dirs

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 301  # no multiple of 8: nothing may pad or round it
VARIANTS = {
    "llama_untied_gqa_theta": ("llama", dict(tie_word_embeddings=False, rope_scaling=None, rope_theta=12345.0)),
    "llama_tied_mha_biases": ("llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "mistral_mqa": ("mistral", dict(num_key_value_heads=1, sliding_window=None, rope_theta=1e6)),
    "qwen3_untied_bias": ("qwen3", dict(tie_word_embeddings=False, rope_theta=1e6)),
}
GENERATION = {"eos_token_id": [2, 7], "bos_token_id": 1, "temperature": 0.6, "top_p": 0.9, "do_sample": True}


def hf_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def dtypes(directory: Path) -> set[torch.dtype]:
    with safe_open(str(directory / "model.safetensors"), "pt") as weights:
        return {weights.get_tensor(name).dtype for name in weights.keys()}


def config(directory: Path) -> dict:
    values = json.loads((directory / "config.json").read_text())
    values.pop("transformers_version", None)
    return values


def round_trip(src: Path, root: Path) -> tuple[Path, Path]:
    with warnings.catch_warnings():  # no tokenizer in these checkpoints: its warning has a test of its own
        warnings.simplefilter("ignore")
        forgather = hf_to_forgather(src, root / "forgather")
        return forgather, forgather_to_hf(forgather, root / "back")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_round_trip_gives_back_the_same_config_and_logits(tmp_path, variant):
    """The config's bos_token_id/eos_token_id were dropped on the way (generation then never stops)."""
    family, overrides = VARIANTS[variant]
    random_hf_model(family, VOCAB, **overrides).save_pretrained(tmp_path / "hf")
    forgather, back = round_trip(tmp_path / "hf", tmp_path)
    assert config(back) == config(tmp_path / "hf")
    ids = token_ids(VOCAB)
    expected = hf_logits(tmp_path / "hf", ids)
    torch.testing.assert_close(hf_logits(back, ids), expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(load_model(forgather)(ids), expected, rtol=0, atol=1e-5)


def test_a_bfloat16_checkpoint_stays_bfloat16_both_ways(tmp_path):
    """Forgather -> Hugging Face wrote a bf16 model as float32: twice the size, and a config saying float32."""
    random_hf_model("llama", VOCAB).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    forgather, back = round_trip(tmp_path / "hf", tmp_path)
    assert dtypes(forgather) == dtypes(back) == {torch.bfloat16}
    assert config(forgather)["dtype"] == config(back)["dtype"] == "bfloat16"
    ids = token_ids(VOCAB)
    torch.testing.assert_close(hf_logits(back, ids), hf_logits(tmp_path / "hf", ids), rtol=0, atol=1e-5)
    with warnings.catch_warnings():  # --dtype still casts
        warnings.simplefilter("ignore")
        assert dtypes(forgather_to_hf(forgather, tmp_path / "fp32", dtype="float32")) == {torch.float32}


def test_the_generation_config_survives_both_ways(tmp_path):
    """The source's generation_config.json (eos ids, sampling defaults) was replaced by one made from the config."""
    model = random_hf_model("llama", VOCAB)
    model.generation_config = transformers.GenerationConfig(**GENERATION)
    model.save_pretrained(tmp_path / "hf")
    forgather, back = round_trip(tmp_path / "hf", tmp_path)
    for directory in (forgather, back):
        generation = json.loads((directory / "generation_config.json").read_text())
        assert {key: generation.get(key) for key in GENERATION} == GENERATION, directory
    # transformers' generate() on the Forgather directory reads it too
    loaded = transformers.AutoModelForCausalLM.from_pretrained(forgather, trust_remote_code=True)
    assert loaded.generation_config.eos_token_id == [2, 7]


def test_a_model_without_a_tokenizer_converts_with_a_warning_naming_both_directories(tmp_path):
    random_hf_model("llama", VOCAB).save_pretrained(tmp_path / "hf")
    dst = tmp_path / "forgather"
    with pytest.warns(UserWarning, match=rf"{tmp_path / 'hf'} has no tokenizer .* so {dst} has none; copy the "
                                         rf"model's tokenizer files into {dst}"):
        hf_to_forgather(tmp_path / "hf", dst)


def test_tokenizer_files_the_converter_cannot_load_are_still_copied(tmp_path):
    """A byte-level BPE tokenizer saved as vocab.json + merges.txt only (no tokenizer.json) was silently dropped."""
    random_hf_model("qwen3", VOCAB).save_pretrained(tmp_path / "hf")
    files = {"vocab.json": '{"a": 0, "b": 1, "ab": 2}', "merges.txt": "#version: 0.2\na b\n",
             "tokenizer_config.json": '{"tokenizer_class": "Qwen2Tokenizer"}'}
    for name, text in files.items():
        (tmp_path / "hf" / name).write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tokenizer there: no warning that there is none
        forgather = hf_to_forgather(tmp_path / "hf", tmp_path / "forgather")
    assert {name: (forgather / name).read_text() for name in files} == files


def test_a_tokenizer_with_more_tokens_than_the_embedding_is_warned_about(tmp_path, tokenizer):
    """The embedding silently grew to the tokenizer's size: the model's next-token distributions changed."""
    random_hf_model("llama", len(tokenizer) - 5).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match=rf"hf: its tokenizer has {len(tokenizer)} tokens and its model only "
                                         rf"{len(tokenizer) - 5} embedding rows; the converted model's embedding grows"):
        forgather = hf_to_forgather(tmp_path / "hf", tmp_path / "forgather")
    assert load_model(forgather).vocab_size == len(tokenizer)


def test_a_trained_checkpoint_exported_and_converted_gives_its_logits_in_transformers(tmp_path, capsys):
    assert run(tmp_path, "+experiment=micro", "scheduler=constant", "max_steps=2") == 0
    (run_dir,) = run_dirs(tmp_path / "outputs")
    exported, back = tmp_path / "exported", tmp_path / "hf"
    assert forgather_main(["export", str(run_dir), "--out", str(exported)]) == 0
    assert forgather_main(["convert", str(exported), str(back)]) == 0
    assert not list(back.glob("*.py"))  # no remote code
    trained = load_model(exported)
    ids = token_ids(trained.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(back, ids), trained.float()(ids), rtol=0, atol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(back)
    assert config(back)["eos_token_id"] == tokenizer.eos_token_id is not None
