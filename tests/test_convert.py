"""Conversion between Hugging Face Llama/Mistral/Qwen3 directories and Forgather model directories: tiny random
models built from transformers' own config classes, converted both ways, give equal logits (fp32, 1e-5) and
equal greedy generations; the vocabulary grows on request; models a family cannot express are refused."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from forgather.cli import convert as convert_cli
from forgather.convert.hf import VocabOptions, forgather_to_hf, hf_to_forgather
from forgather.convert.spec import ConversionError
from forgather.data.tokenizer import build_bpe_tokenizer
from forgather.models.export import build_model, load_model, save_model
from helpers.tiny_lm import tiny_tree

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}
FAMILIES = {
    "llama": (transformers.LlamaConfig, {"rope_scaling": LLAMA3_SCALING, "tie_word_embeddings": True}),
    "mistral": (transformers.MistralConfig, {"sliding_window": 64}),
    "qwen3": (transformers.Qwen3Config, {"attention_bias": True, "tie_word_embeddings": True}),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer(["once upon a time there was a tiny model"] * 4, vocab_size=300)


def random_hf_model(family: str, vocab_size: int, **overrides) -> transformers.PreTrainedModel:
    """A tiny randomly initialized model, weights large enough that greedy decoding takes varied paths."""
    config_class, extra = FAMILIES[family]
    shape = dict(vocab_size=vocab_size, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    config = config_class(**{**shape, **extra, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(1.0 if parameter.dim() == 1 else 0.0, 0.3)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_dir(request, tmp_path_factory, tokenizer) -> Path:
    directory = tmp_path_factory.mktemp(request.param)
    random_hf_model(request.param, len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def forgather_dir(hf_dir, tmp_path_factory) -> Path:
    with warnings.catch_warnings():  # Mistral's sliding window: its own test below
        warnings.simplefilter("ignore")
        return hf_to_forgather(hf_dir, tmp_path_factory.mktemp("forgather"))


def token_ids(vocab_size: int, batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))


def hf_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def test_hf_to_forgather_gives_equal_logits(hf_dir, forgather_dir):
    ids = token_ids(load_model(forgather_dir).vocab_size)
    with torch.no_grad():
        ours = load_model(forgather_dir)(ids)
    torch.testing.assert_close(ours, hf_logits(hf_dir, ids), rtol=0, atol=1e-5)


def test_hf_to_forgather_gives_equal_greedy_generations(hf_dir, forgather_dir):
    ids = token_ids(load_model(forgather_dir).vocab_size, batch=1, seq=6)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    expected = theirs.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
    generated = load_model(forgather_dir).generate(ids, max_new_tokens=12)
    assert len(set(generated[0, 6:].tolist())) > 2, "the model repeats one token; the comparison would be weak"
    assert torch.equal(generated, expected)


def test_converted_directory_loads_through_transformers_remote_code(hf_dir, forgather_dir):
    ids = token_ids(load_model(forgather_dir).vocab_size)
    model = transformers.AutoModelForCausalLM.from_pretrained(forgather_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf_logits(hf_dir, ids), rtol=0, atol=1e-5)


def test_converted_directory_code_does_not_import_forgather(forgather_dir):
    modeling = next(forgather_dir.glob("modeling_*.py")).read_text()
    assert "import forgather" not in modeling and "from forgather" not in modeling


def test_forgather_to_hf_round_trip_loads_without_remote_code(hf_dir, forgather_dir, tmp_path):
    back = forgather_to_hf(forgather_dir, tmp_path / "hf")
    original = json.loads((hf_dir / "config.json").read_text())
    assert json.loads((back / "config.json").read_text())["model_type"] == original["model_type"]
    assert not list(back.glob("*.py"))
    ids = token_ids(original["vocab_size"])
    torch.testing.assert_close(hf_logits(back, ids), hf_logits(hf_dir, ids), rtol=0, atol=1e-5)


def native_tree(vocab_size: int, feedforward: str = "forgather.models.feedforward:SwiGLU") -> dict:
    """A model written in Forgather's vocabulary (untied head), as training configs build them."""
    return tiny_tree(vocab_size, feedforward, tie_embeddings=False, rope_theta=500000.0, norm_eps=1e-5)


def save_native(tree: dict, directory: Path, tokenizer=None) -> Path:
    torch.manual_seed(0)
    save_model(build_model(tree).eval(), tree, directory, "native")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def test_native_forgather_model_converts_to_llama_with_equal_logits_and_generations(tmp_path, tokenizer):
    source = save_native(native_tree(len(tokenizer)), tmp_path / "native", tokenizer)
    back = forgather_to_hf(source, tmp_path / "hf")
    assert json.loads((back / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    ids = token_ids(len(tokenizer))
    ours = load_model(source)
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(back, ids), ours(ids), rtol=0, atol=1e-5)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    prompt = ids[:1, :6]
    expected = theirs.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(ours.generate(prompt, max_new_tokens=12), expected)


def test_mistral_sliding_window_is_reported_as_full_attention(tmp_path):
    random_hf_model("mistral", 64).save_pretrained(tmp_path / "mistral")
    with pytest.warns(UserWarning, match="up to 64 tokens"):
        hf_to_forgather(tmp_path / "mistral", tmp_path / "out")


def test_adding_tokens_grows_the_vocabulary_and_keeps_old_logits(hf_dir, tmp_path):
    vocab = VocabOptions(tokens=["<|tool|>", "<|user|>"], special=True, pad_to_multiple_of=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grown = hf_to_forgather(hf_dir, tmp_path / "grown", vocab=vocab)
    old_size = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    model = load_model(grown)
    assert model.vocab_size % 64 == 0 and model.vocab_size >= old_size + 2
    new_tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(grown)
    assert len(new_tokenizer("<|tool|>")["input_ids"]) == 1
    ids = token_ids(old_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[..., :old_size], hf_logits(hf_dir, ids), rtol=0, atol=1e-5)


def test_adding_tokens_to_hf_output_keeps_config_and_tokenizer_consistent(forgather_dir, tmp_path):
    back = forgather_to_hf(forgather_dir, tmp_path / "hf", vocab=VocabOptions(tokens=["<|extra|>"]))
    config = json.loads((back / "config.json").read_text())
    assert config["vocab_size"] == len(transformers.AutoTokenizer.from_pretrained(back))


def test_feedforward_other_than_swiglu_is_refused(tmp_path):
    source = save_native(native_tree(64, "forgather.models.feedforward:GELUMLP"), tmp_path / "gelu")
    with pytest.raises(ConversionError, match="SwiGLU"):
        forgather_to_hf(source, tmp_path / "hf")


def test_unsupported_rope_scaling_is_refused(tmp_path):
    linear = {"rope_type": "linear", "factor": 2.0}
    random_hf_model("llama", 64, rope_scaling=linear).save_pretrained(tmp_path / "linear")
    with pytest.raises(ConversionError, match="linear"):
        hf_to_forgather(tmp_path / "linear", tmp_path / "out")


def test_model_without_qk_norm_is_refused_as_qwen3(tmp_path):
    source = save_native(native_tree(64), tmp_path / "native")
    with pytest.raises(ConversionError, match="qwen3"):
        forgather_to_hf(source, tmp_path / "hf", family="qwen3")


def test_cli_converts_in_the_direction_of_the_source(tmp_path, capsys):
    source = save_native(native_tree(64), tmp_path / "native")
    assert convert_cli.main([str(source), str(tmp_path / "hf"), "--family", "mistral", "--dtype", "bfloat16"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["dtype"] == "bfloat16"
    assert convert_cli.main([str(tmp_path / "hf"), str(tmp_path / "again")]) == 0
    assert "model_tree" in json.loads((tmp_path / "again" / "config.json").read_text())
    assert "Forgather model" in capsys.readouterr().out


def test_llama_projection_biases_convert_with_equal_logits(tmp_path):
    random_hf_model("llama", 64, attention_bias=True, mlp_bias=True).save_pretrained(tmp_path / "biased")
    converted = hf_to_forgather(tmp_path / "biased", tmp_path / "out")
    ids = token_ids(64)
    with torch.no_grad():
        torch.testing.assert_close(load_model(converted)(ids), hf_logits(tmp_path / "biased", ids), rtol=0, atol=1e-5)


def test_sharded_checkpoint_converts_with_equal_logits(tmp_path):
    random_hf_model("llama", 64).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    converted = hf_to_forgather(tmp_path / "sharded", tmp_path / "out")
    ids = token_ids(64)
    with torch.no_grad():
        torch.testing.assert_close(load_model(converted)(ids), hf_logits(tmp_path / "sharded", ids), rtol=0, atol=1e-5)


# --- errors and the destination ------------------------------------------------------------------------------


def test_qwen3_for_a_model_without_qk_norm_is_one_line_naming_what_fits(tmp_path, capsys):
    source = save_native(native_tree(64), tmp_path / "native")
    assert convert_cli.main([str(source), str(tmp_path / "hf"), "--family", "qwen3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such norm" in err and "--family llama" in err
    assert not (tmp_path / "hf").exists()


def test_a_qk_norm_model_is_pointed_to_qwen3(tmp_path):
    random_hf_model("qwen3", 64).save_pretrained(tmp_path / "qwen3")
    converted = hf_to_forgather(tmp_path / "qwen3", tmp_path / "forgather")
    with pytest.raises(ConversionError, match=r"llama cannot express; convert it to qwen3"):
        forgather_to_hf(converted, tmp_path / "hf", family="llama")


@pytest.fixture
def native_dir(tmp_path, tokenizer) -> Path:
    return save_native(native_tree(len(tokenizer)), tmp_path / "native", tokenizer)


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.startswith("."))


def test_an_existing_destination_is_refused_in_one_line(native_dir, tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    assert convert_cli.main([str(native_dir), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--overwrite" in err
    assert [path.name for path in (tmp_path / "hf").iterdir()] == ["notes.txt"]


def test_overwrite_replaces_the_destination_whole(native_dir, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    assert convert_cli.main([str(native_dir), str(tmp_path / "hf"), "--overwrite"]) == 0
    assert not (tmp_path / "hf" / "notes.txt").exists() and (tmp_path / "hf" / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_an_empty_destination_directory_is_used(native_dir, tmp_path):
    (tmp_path / "hf").mkdir()
    assert forgather_to_hf(native_dir, tmp_path / "hf") == tmp_path / "hf"
    assert (tmp_path / "hf" / "config.json").is_file()


def test_a_failed_conversion_leaves_no_destination_and_no_staging(native_dir, tmp_path, monkeypatch):
    import forgather.convert.hf as hf

    def disk_full(state, path):
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf, "write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space"):
        forgather_to_hf(native_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and leftovers(tmp_path) == []
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "config.json").write_text("{}")
    with pytest.raises(OSError, match="No space"):
        forgather_to_hf(native_dir, tmp_path / "kept", overwrite=True)
    assert [path.name for path in (tmp_path / "kept").iterdir()] == ["config.json"]


def test_staging_left_by_a_killed_conversion_is_removed(native_dir, tmp_path):
    import subprocess
    import sys

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    abandoned = tmp_path / f".hf.converting-{finished.pid}"
    abandoned.mkdir()
    (abandoned / "model.safetensors").write_bytes(b"partial")
    forgather_to_hf(native_dir, tmp_path / "hf")
    assert leftovers(tmp_path) == []


def test_written_weights_respect_the_umask(native_dir, tmp_path):
    import os

    previous = os.umask(0o027)
    try:
        forgather_to_hf(native_dir, tmp_path / "hf")
    finally:
        os.umask(previous)
    assert (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o750


def test_a_malformed_config_json_is_one_line_naming_the_file(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{\n  "model_type": "llama",\n  oops\n}\n')
    assert convert_cli.main([str(tmp_path / "bad"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'bad' / 'config.json'}:3: not valid JSON" in err


def test_a_full_disk_is_one_line_and_leaves_nothing(native_dir, tmp_path, monkeypatch, capsys):
    import forgather.convert.hf as hf

    def disk_full(state, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf, "write_safetensors", disk_full)
    assert convert_cli.main([str(native_dir), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
    assert not (tmp_path / "hf").exists() and leftovers(tmp_path) == []


def test_a_file_in_the_way_is_refused_then_replaced_with_overwrite(native_dir, tmp_path):
    (tmp_path / "hf").write_text("a file")
    with pytest.raises(FileExistsError, match="already exists"):
        forgather_to_hf(native_dir, tmp_path / "hf")
    forgather_to_hf(native_dir, tmp_path / "hf", overwrite=True)
    assert (tmp_path / "hf" / "config.json").is_file() and leftovers(tmp_path) == []



@pytest.mark.parametrize("parent", [False, True], ids=["the_source", "its_parent"])
def test_overwrite_refuses_a_destination_that_is_or_holds_the_source(native_dir, tmp_path, capsys, parent):
    """`convert models/a models --overwrite` would have replaced models/: the source and every model beside it."""
    (tmp_path / "other_model").mkdir()
    before = sorted(tmp_path.rglob("*"))
    destination = tmp_path if parent else native_dir
    assert convert_cli.main([str(native_dir), str(destination), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {destination}: the destination {f'holds the source {native_dir}' if parent else 'is the source'}; "
                   "replacing it would delete the model being converted, --overwrite or not; choose a new destination\n")
    assert sorted(tmp_path.rglob("*")) == before


def test_truncated_weights_are_one_line_naming_the_file(hf_dir, tmp_path, capsys):
    import shutil

    source = tmp_path / "hf"
    shutil.copytree(hf_dir, source)
    (source / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes()[:500])
    assert convert_cli.main([str(source), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {source / 'model.safetensors'}: not a readable safetensors file (")
    assert not (tmp_path / "out").exists()


# -- the reference Forgather's command lines: a token file, a chat template, its option names -----------------

CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture
def llama_dir(tmp_path, tokenizer) -> Path:
    """A Hugging Face Llama whose embedding has 8 padding rows past its tokenizer (as checkpoints often do)."""
    directory = tmp_path / "llama"
    random_hf_model("llama", len(tokenizer) + 8, tie_word_embeddings=False).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_the_references_convert_command_line_runs(llama_dir, tmp_path, tokenizer, capsys):
    """examples/finetune/samantha's: `forgather convert -t chatml.jinja SRC DST --add-tokens tokens.yaml`,
    with the reference's example token file (pad only if missing, eos replaced, one special token)."""
    (tmp_path / "chatml.jinja").write_text(CHATML)
    (tmp_path / "tokens.yaml").write_text(
        "pad_token:\n  token: \"<|newpad|>\"\n  init: zero\n  if_missing: true\n"  # the tokenizer has one: kept
        "eos_token: \"<|im_end|>\"\n"
        "special_tokens:\n  - \"<|im_start|>\"\n"
        "regular_tokens: [\"custom_token\"]\n")
    out = tmp_path / "fg"
    assert convert_cli.main(["-t", str(tmp_path / "chatml.jinja"), str(llama_dir), str(out),
                             "--add-tokens", str(tmp_path / "tokens.yaml"), "--max-length", "96"]) == 0
    converted = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    assert converted.chat_template == CHATML
    assert converted.eos_token == "<|im_end|>" and converted.pad_token == tokenizer.pad_token == "<|pad|>"
    special = {added.content: added.special for added in converted.added_tokens_decoder.values()}
    assert special["<|im_start|>"] and not special["custom_token"]
    assert "<|newpad|>" not in converted.get_vocab()
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 96
    # the three new tokens took padding rows (the vocabulary kept its size), each set to the mean of the
    # rows of the tokens the tokenizer had; the old tokens' logits are unchanged
    known = len(tokenizer)
    source = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    model = load_model(out)
    assert model.vocab_size == known + 8
    for name, weight in (("embed", source.model.embed_tokens.weight), ("lm_head", source.lm_head.weight)):
        rows = dict(model.named_parameters())[f"{name}.weight"].detach()
        mean = weight[:known].mean(dim=0)
        for token in ("<|im_end|>", "<|im_start|>", "custom_token"):
            torch.testing.assert_close(rows[converted.convert_tokens_to_ids(token)], mean)
        torch.testing.assert_close(rows[known + 3:], weight[known + 3:].detach())  # padding rows untouched
    ids = token_ids(known)
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[..., :known], hf_logits(llama_dir, ids)[..., :known], rtol=0, atol=1e-5)


def test_a_new_pad_token_starts_at_zero_and_a_role_is_replaced(tmp_path, llama_dir, tokenizer):
    from forgather.convert.vocab import read_token_file

    (tmp_path / "tokens.yaml").write_text("pad_token: \"<|padding|>\"\nbos_token: {token: \"<|begin|>\", init: mean}\n")
    out = hf_to_forgather(llama_dir, tmp_path / "fg", vocab=read_token_file(tmp_path / "tokens.yaml"))
    converted = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    assert (converted.pad_token, converted.bos_token) == ("<|padding|>", "<|begin|>")
    embed = load_model(out).embed.weight.detach()
    assert not embed[converted.pad_token_id].any() and embed[converted.bos_token_id].any()
    # to Hugging Face, the config's token ids follow the tokenizer's roles
    back = forgather_to_hf(out, tmp_path / "hf")
    config = json.loads((back / "config.json").read_text())
    assert (config["pad_token_id"], config["bos_token_id"]) == (converted.pad_token_id, converted.bos_token_id)


@pytest.mark.parametrize("content, message", [
    ("bos_token: x\neos_tokn: x\n", ":2: unknown key 'eos_tokn'; did you mean 'eos_token'"),
    ("pad_token: {token: x, init: random}\n", ":1: pad_token: init 'random'; use one of mean, zero"),
    ("special_tokens: x\n", ":1: special_tokens: a list of token strings expected"),
    ("- x\n", ": a YAML file of tokens to add (bos_token"),
    ("bos_token: x\neos_token: [a\n", ":3: not valid YAML (expected ',' or ']'"),
])
def test_a_wrong_token_file_is_one_line_naming_the_file_and_the_key(tmp_path, llama_dir, capsys, content, message):
    (tmp_path / "tokens.yaml").write_text(content)
    assert convert_cli.main([str(llama_dir), str(tmp_path / "fg"), "--add-tokens", str(tmp_path / "tokens.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'tokens.yaml'}{message}" in err
    assert not (tmp_path / "fg").exists()


def test_a_missing_chat_template_and_a_reverse_from_hugging_face_are_one_line(tmp_path, llama_dir, capsys):
    assert convert_cli.main(["-t", str(tmp_path / "chatml.jinja"), str(llama_dir), str(tmp_path / "fg")]) == 2
    assert f"-t {tmp_path / 'chatml.jinja'}: no such file" in capsys.readouterr().err
    assert convert_cli.main(["--reverse", str(llama_dir), str(tmp_path / "fg")]) == 2
    assert "--reverse: " in capsys.readouterr().err and not (tmp_path / "fg").exists()


def test_model_type_is_the_family(tmp_path):
    source = save_native(native_tree(64), tmp_path / "native")
    assert convert_cli.main(["--reverse", "--model-type", "mistral", str(source), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mistral"
