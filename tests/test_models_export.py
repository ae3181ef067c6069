"""Standalone export: the generated package imports without forgather, loads through transformers with the
same logits, generates, round-trips through safetensors, and carries project-local layer classes."""

from __future__ import annotations

import ast
import copy
import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from forgather.models.builder import instantiate
from forgather.models.export import ExportError, build_model, load_model, save_model

VOCAB, HIDDEN = 97, 32


def _partial(target: str, **kwargs) -> dict:
    return {"_target_": target, "_partial_": True, **kwargs}


def model_tree(tie_embeddings: bool = True, layer: str = "forgather.models.layers:PreLNLayer") -> dict:
    """A tiny Llama-style model in Forgather's config vocabulary, initialized large enough that greedy and
    beam search take varied paths instead of repeating one token."""
    return {
        "_target_": "forgather.models.causal_lm:CausalLM",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_layers": 2,
        "init_std": 0.3,
        "embedding_factory": _partial("forgather.models.embedding:TokenEmbedding", init_std=1.0),
        "layer_factory": _partial(
            layer,
            attention_factory=_partial("forgather.models.attention:Attention", num_heads=4, num_kv_heads=2),
            feedforward_factory=_partial("forgather.models.feedforward:SwiGLU", intermediate_size=64),
            norm_factory=_partial("forgather.models.norm:RMSNorm"),
            dropout=0.1,
        ),
        "norm_factory": _partial("forgather.models.norm:RMSNorm"),
        "rope": {"_target_": "forgather.models.rope:RotaryEmbedding", "head_dim": 8, "theta": 500000.0},
        "tie_embeddings": tie_embeddings,
    }


pytestmark = pytest.mark.usefixtures("one_thread")


def ids(batch: int = 2, seq: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def export(tmp_path: Path, tree: dict, name: str = "tiny", base_dir: str | None = None):
    torch.manual_seed(0)
    model = build_model(tree, base_dir).eval()
    return model, save_model(model, tree, tmp_path / "output_models" / name, name, base_dir)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One tied export shared by the read-only tests below."""
    return export(tmp_path_factory.mktemp("export"), model_tree())


def load_hf(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=True).eval()


def test_save_writes_the_hugging_face_package_files(exported):
    _, out = exported
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "configuration_tiny.py", "model.safetensors", "modeling_tiny.py"
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_tiny.TinyForCausalLM"
    assert config["model_tree"]["_target_"] == "CausalLM"


def test_generated_code_has_no_forgather_import(exported):
    _, out = exported
    for file in ("modeling_tiny.py", "configuration_tiny.py"):
        for node in ast.walk(ast.parse((out / file).read_text())):
            if isinstance(node, ast.Import):
                assert not any(alias.name.startswith("forgather") for alias in node.names)
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("forgather")


def test_tied_weights_are_saved_once(exported):
    from safetensors.torch import load_file

    _, out = exported
    state = load_file(str(out / "model.safetensors"))
    assert [key for key, value in state.items() if value.shape == (VOCAB, HIDDEN)] == ["model.embed.weight"]


def test_load_model_round_trip_gives_identical_logits(exported):
    model, out = exported
    loaded = load_model(out)
    assert type(loaded).__name__ == "CausalLM" and type(loaded) is not type(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids()), model(ids()), rtol=0, atol=0)


@pytest.mark.parametrize("tie_embeddings", [True, False], ids=["tied", "untied"])
def test_transformers_auto_model_gives_the_same_logits(tmp_path, tie_embeddings):
    model, out = export(tmp_path, model_tree(tie_embeddings), name=f"tie_{tie_embeddings}")
    with torch.no_grad():
        torch.testing.assert_close(load_hf(out)(ids()).logits, model(ids()), rtol=1e-5, atol=1e-5)


def test_transformers_generate_equals_in_framework_greedy_generate(exported):
    model, out = exported
    prompt = ids(seq=4)
    ours = model.generate(prompt, max_new_tokens=8)
    theirs = load_hf(out).generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(theirs, ours)


def test_transformers_beam_search_with_cache_equals_beam_search_without(exported):
    _, out = exported
    hf, prompt = load_hf(out), ids(seq=4)
    settings = dict(max_new_tokens=8, num_beams=4, do_sample=False, pad_token_id=0)
    assert torch.equal(hf.generate(prompt, **settings), hf.generate(prompt, use_cache=False, **settings))


def test_transformers_save_pretrained_keeps_the_standalone_code(exported, tmp_path):
    model, out = exported
    load_hf(out).save_pretrained(tmp_path / "resaved")
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path / "resaved")(ids()).logits, model(ids()), rtol=1e-5, atol=1e-5)


def test_transformers_generate_handles_left_padded_batches(exported):
    model, out = exported
    short, long = ids(1, 3, seed=2), ids(1, 6, seed=3)
    padded = torch.cat((torch.cat((torch.zeros(1, 3, dtype=torch.long), short), 1), long))
    attention_mask = (torch.arange(6) >= torch.tensor([[3], [0]])).long()
    generated = load_hf(out).generate(
        padded, attention_mask=attention_mask, max_new_tokens=5, do_sample=False, pad_token_id=0
    )
    assert torch.equal(generated[0, 3:], model.generate(short, 5)[0])
    assert torch.equal(generated[1], model.generate(long, 5)[0])


def test_transformers_forward_computes_the_shifted_loss(exported):
    model, out = exported
    tokens = ids()
    with torch.no_grad():
        loss = load_hf(out)(tokens, labels=tokens).loss
        logits = model(tokens)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


# Blocks the named top-level packages for everything the subprocess imports afterwards.
BLOCKER = textwrap.dedent(
    """
    import sys
    BLOCKED = {blocked!r}
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"{{name}} is hidden in this test", name=name)
    sys.meta_path.insert(0, Blocker())
    """
)


def run_isolated(code: str, blocked: tuple[str, ...], cwd: Path) -> None:
    """Run `code` in `python -I` (no cwd, PYTHONPATH or user site on sys.path) with `blocked` unimportable."""
    script = BLOCKER.format(blocked=list(blocked)) + textwrap.dedent(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-I", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_generated_package_loads_through_transformers_without_forgather(exported, tmp_path):
    model, out = exported
    torch.save({"ids": ids(), "logits": model(ids()).detach()}, tmp_path / "expected.pt")
    run_isolated(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], rtol=1e-5, atol=1e-5)
        assert not any(name.startswith("forgather") for name in sys.modules)
        """,
        blocked=("forgather",),
        cwd=tmp_path,
    )


def check_standalone_logits(out: Path, name: str, expected: dict, tmp_path: Path, tolerance: float = 0.0) -> None:
    """In a process where forgather and transformers cannot be imported, the plain model of the package at `out`
    (modeling_<name>.py) gives `expected["logits"]` for `expected["ids"]` (and `expected["positions"]`, if any)."""
    torch.save(expected, tmp_path / "expected.pt")
    run_isolated(
        f"""
        import importlib, types, torch
        package = types.ModuleType("exported")
        package.__path__ = [{str(out)!r}]
        sys.modules["exported"] = package
        modeling = importlib.import_module("exported.modeling_{name}")
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = modeling.load_pretrained({str(out)!r})(expected["ids"], expected.get("positions"))
        torch.testing.assert_close(logits, expected["logits"], rtol={tolerance}, atol={tolerance})
        assert not any(n.startswith(("forgather", "transformers")) for n in sys.modules)
        """,
        blocked=("forgather", "transformers"),
        cwd=tmp_path,
    )


def test_generated_plain_model_needs_neither_forgather_nor_transformers(exported, tmp_path):
    model, out = exported
    check_standalone_logits(out, "tiny", {"ids": ids(), "logits": model(ids()).detach()}, tmp_path)


PROJECT_LAYER = '''
"""A project-local layer: post-LN with a scaled residual (DeepNet-style alpha)."""

from forgather.models.layers import TransformerLayer


class PostLNLayer(TransformerLayer):
    def __init__(self, hidden_size, alpha=2.0, **kwargs):
        super().__init__(hidden_size, **kwargs)
        self.alpha = alpha

    def forward(self, x, rope, mask, kv_cache=None):
        x = self.attention_norm(self.alpha * x + self.attention(x, rope, mask, kv_cache))
        return self.feedforward_norm(self.alpha * x + self.feedforward(x))
'''


def test_project_local_layer_is_inlined_beside_the_library_one(tmp_path):
    model_src = tmp_path / "project" / "model_src"
    model_src.mkdir(parents=True)
    (model_src / "post_ln_layer.py").write_text(PROJECT_LAYER)
    tree = model_tree(layer=".post_ln_layer:PostLNLayer")
    tree["layer_factory"]["alpha"] = 1.5
    model, out = export(tmp_path, tree, name="local", base_dir=str(model_src))
    modeling = (out / "modeling_local.py").read_text()
    assert "self.alpha * x" in modeling
    assert "forgather/models/layers.py" in modeling  # its base class came along
    loaded = load_hf(out)
    assert all("alpha" in vars(layer) for layer in loaded.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids()).logits, model(ids()), rtol=1e-5, atol=1e-5)


def test_omegaconf_config_with_interpolations_exports(tmp_path):
    from omegaconf import OmegaConf

    tree = model_tree()
    tree["hidden_size"] = "${width}"
    config = OmegaConf.create({"width": HIDDEN, "model": tree})
    model, out = export(tmp_path, config.model)
    assert json.loads((out / "config.json").read_text())["model_tree"]["hidden_size"] == HIDDEN
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids()), model(ids()), rtol=0, atol=0)


def test_external_targets_stay_imports(tmp_path):
    tree = model_tree()
    tree["layer_factory"]["norm_factory"] = _partial("torch.nn.LayerNorm")
    model, out = export(tmp_path, tree)
    config = json.loads((out / "config.json").read_text())
    assert config["model_tree"]["layer_factory"]["norm_factory"]["_target_"] == "torch.nn.modules.normalization:LayerNorm"
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids()), model(ids()), rtol=0, atol=0)


def test_forgather_code_outside_models_cannot_be_exported(tmp_path):
    tree = model_tree()
    tree["rope"] = {"_target_": "forgather.graph.imports:split_spec", "_args_": ["a:b"]}
    with pytest.raises(ExportError, match="outside forgather.models"):
        save_model(torch.nn.Linear(1, 1), tree, tmp_path / "bad", "bad")


def test_builder_shares_nodes_with_the_same_id():
    tree = {"a": {"_target_": "builtins:list", "_id_": "shared"}, "b": {"_target_": "builtins:list", "_id_": "shared"}}
    built = instantiate(tree, lambda spec: list)
    assert built["a"] is built["b"]


def test_builder_builds_partials_with_positional_args():
    node = {"_target_": "f", "_partial_": True, "_args_": [2], "c": 5}
    built = instantiate(node, lambda spec: lambda a, b, c: (a, b, c))
    assert isinstance(built, functools.partial) and built(3) == (2, 3, 5)


def test_builder_builds_a_fresh_factory_object_at_every_reference():
    node = {"_target_": "builtins:list", "_factory_": True}
    built = instantiate([node, copy.deepcopy(node)], lambda spec: list)
    assert built[0] is not built[1]


def test_builder_merges_latent_kwargs_over_the_keywords():
    node = {"_target_": "f", "a": 1, "b": 2, "_kwargs_": {"b": 3}}
    assert instantiate(node, lambda spec: lambda **kw: kw) == {"a": 1, "b": 3}


def test_builder_refuses_a_meta_node():
    with pytest.raises(ValueError, match="_meta_ is not supported"):
        instantiate({"_target_": "f", "_meta_": True}, lambda spec: dict)


YAML_MODEL = """
.define: &hidden_size !var { name: hidden_size, default: 32 }
.define: &norm_factory !partial:forgather.models.norm:RMSNorm@norm_factory {}
.define: &rope !singleton:forgather.models.rope:RotaryEmbedding@rope
    head_dim: !call:operator:floordiv [ *hidden_size, 4 ]
model: !partial:forgather.models.causal_lm:CausalLM@model
    vocab_size: 97
    hidden_size: *hidden_size
    num_layers: 2
    layer_factory: !partial:.post_ln_layer:PostLNLayer@layer_factory
        attention_factory: !partial:forgather.models.attention:Attention { num_heads: 4, num_kv_heads: 2 }
        feedforward_factory: !partial:forgather.models.feedforward:SwiGLU { intermediate_size: 64 }
        norm_factory: *norm_factory
        alpha: 1.5
    norm_factory: *norm_factory
    rope: *rope
"""


def test_yaml_model_factory_with_a_project_local_layer_constructs_and_exports(tmp_path):
    from forgather.graph import construct, load_graph, to_config

    model_src = tmp_path / "model_src"
    model_src.mkdir()
    (model_src / "post_ln_layer.py").write_text(PROJECT_LAYER)
    config = to_config(load_graph(YAML_MODEL)).config
    torch.manual_seed(0)
    model = construct(config, "model", base_dir=str(model_src))().eval()
    assert type(model.layers[0]).__name__ == "PostLNLayer" and model.layers[0].alpha == 1.5
    out = save_model(model, config.model, tmp_path / "yaml_model", "yaml_model", base_dir=str(model_src))
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids()), model(ids()), rtol=0, atol=0)


def test_project_code_importing_forgather_inside_a_function_is_refused(tmp_path):
    model_src = tmp_path / "model_src"
    model_src.mkdir()
    (model_src / "lazy_layer.py").write_text(
        "def LazyLayer(hidden_size, **kwargs):\n"
        "    from forgather.models.layers import PreLNLayer\n"
        "    return PreLNLayer(hidden_size, **kwargs)\n"
    )
    tree = model_tree(layer=".lazy_layer:LazyLayer")
    model = build_model(tree, str(model_src))
    with pytest.raises(ExportError, match=r"lazy_layer.py:2: move the forgather import to the top level"):
        save_model(model, tree, tmp_path / "out", "lazy", base_dir=str(model_src))


def test_transformers_generate_stops_at_the_eos_token_from_extra_config(tmp_path):
    torch.manual_seed(0)
    model = build_model(model_tree()).eval()
    prompt = ids(1, 4)
    eos = int(model.generate(prompt, max_new_tokens=8)[0, 6])  # the third greedy token
    out = save_model(model, model_tree(), tmp_path / "eos", "eos", extra_config={"eos_token_id": eos, "pad_token_id": 0})
    generated = load_hf(out).generate(prompt, max_new_tokens=8, do_sample=False)
    assert int(generated[0, -1]) == eos and not (generated[0, 4:-1] == eos).any()  # stopped at the first eos
    assert torch.equal(generated, model.generate(prompt, max_new_tokens=8, eos_token_id=eos))


def test_project_local_sibling_modules_are_inlined_too(tmp_path):
    model_src = tmp_path / "model_src"
    model_src.mkdir()
    (model_src / "residual.py").write_text("def scaled(x, alpha):\n    return alpha * x\n")
    (model_src / "sibling_layer.py").write_text(
        "from forgather.models.layers import TransformerLayer\n"
        "from residual import scaled\n\n\n"
        "class SiblingLayer(TransformerLayer):\n"
        "    def forward(self, x, rope, mask, kv_cache=None):\n"
        "        x = scaled(x, 0.5) + self.attention(self.attention_norm(x), rope, mask, kv_cache)\n"
        "        return x + self.feedforward(self.feedforward_norm(x))\n"
    )
    model, out = export(tmp_path, model_tree(layer=".sibling_layer:SiblingLayer"), "sib", str(model_src))
    assert "# ---- residual.py ----" in (out / "modeling_sib.py").read_text()
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids()), model(ids()), rtol=0, atol=0)


def test_packed_attention_model_exports_and_runs_sdpa_without_forgather(tmp_path):
    """attention_fn='packed' reaches our kernels through an import by name: standalone code, with forgather
    absent, still loads and computes the same logits on packed documents (SDPA with the same mask)."""
    tree = model_tree()
    tree["hidden_size"] = 64
    tree["rope"]["head_dim"] = 16
    tree["layer_factory"]["attention_factory"]["attention_fn"] = "packed"
    model, out = export(tmp_path, tree, name="packed")
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        expected = {"ids": ids(), "positions": positions, "logits": model(ids(), positions)}
    check_standalone_logits(out, "packed", expected, tmp_path, tolerance=1e-6)
