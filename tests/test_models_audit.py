"""Model components under adversarial use: packed rows through every attention function (outputs, gradients,
isolation of documents), grouped-query shapes, fused projections, position ids of one row, and the checks
that refuse a bad size, rate or option when the model is built, naming the module and the value."""

from __future__ import annotations

import functools

import pytest
import torch

from forgather.models.attention import Attention
from forgather.models.causal_lm import CausalLM
from forgather.models.feedforward import GELUMLP, SwiGLU
from forgather.models.layers import PostLNLayer, PreLNLayer
from forgather.models.norm import LayerNorm, RMSNorm
from forgather.models.rope import RotaryEmbedding

VOCAB, HIDDEN, HEADS = 97, 64, 4
ATTENTION_FUNCTIONS = ["sdpa", "flex", "packed", "eager"]
# Four documents in row 0 (the first begins before the row: its positions start at 3), three in row 1 (one of
# a single token).
POSITIONS = torch.tensor([[3, 4, 5, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2],
                          [0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 1, 2, 3, 4, 5, 6]])

pytestmark = pytest.mark.usefixtures("one_thread")


def model(attention_fn: str = "sdpa", kv_heads: int = 2, fused_projections: bool | str = False) -> CausalLM:
    torch.manual_seed(0)
    layer_factory = functools.partial(
        PreLNLayer,
        attention_factory=functools.partial(Attention, num_heads=HEADS, num_kv_heads=kv_heads,
                                            attention_fn=attention_fn, fused_projections=fused_projections),
        feedforward_factory=functools.partial(SwiGLU, intermediate_size=64, fused_projections=fused_projections),
        norm_factory=RMSNorm,
    )
    return CausalLM(VOCAB, HIDDEN, 2, layer_factory, RMSNorm, rope=RotaryEmbedding(HIDDEN // HEADS))


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, tuple(POSITIONS.shape), generator=torch.Generator().manual_seed(seed))


def logits_and_grads(net: CausalLM, tokens: torch.Tensor, positions: torch.Tensor | None):
    logits = net.train()(tokens, positions)
    logits.logsumexp(-1).mean().backward()
    return logits.detach(), {name: p.grad for name, p in net.named_parameters()}


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_attention_functions_agree_with_eager_in_outputs_and_gradients_on_packed_rows(kv_heads):
    reference, reference_grads = logits_and_grads(model("eager", kv_heads), ids(), POSITIONS)
    for attention_fn in ["sdpa", "flex", "packed"]:
        logits, grads = logits_and_grads(model(attention_fn, kv_heads), ids(), POSITIONS)
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5, msg=attention_fn)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-6, msg=f"{attention_fn} {name}")


@pytest.mark.parametrize("attention_fn", ATTENTION_FUNCTIONS)
def test_changing_one_documents_tokens_changes_nothing_outside_it(attention_fn):
    net, tokens = model(attention_fn).eval(), ids()
    changed = tokens.clone()
    changed[0, 6:13] = (changed[0, 6:13] + 1) % VOCAB  # row 0's third document
    changed[1, 0:8] = (changed[1, 0:8] + 1) % VOCAB  # row 1's first
    with torch.no_grad():
        before, after = net(tokens, POSITIONS), net(changed, POSITIONS)
    inside = torch.zeros(POSITIONS.shape, dtype=torch.bool)
    inside[0, 6:13] = inside[1, 0:8] = True
    assert torch.equal(before[~inside], after[~inside])
    assert (before[inside] - after[inside]).abs().amax(-1).min() > 0


def test_fused_projection_variants_give_the_same_logits_and_one_state_dict():
    variants = {fused: model(fused_projections=fused).eval() for fused in ("auto", True, "qkv", "kv", False)}
    with torch.no_grad():
        reference = variants[False](ids(), POSITIONS)
        for fused, net in variants.items():
            torch.testing.assert_close(net(ids(), POSITIONS), reference, rtol=1e-6, atol=1e-6, msg=str(fused))
    loaded = model(fused_projections="kv", kv_heads=2)
    torch.manual_seed(3)
    for parameter in variants[True].parameters():
        parameter.data.normal_()
    loaded.load_state_dict(variants[True].state_dict())  # strict: the same names and shapes
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids()), variants[True](ids()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("attention_fn", ATTENTION_FUNCTIONS)
def test_position_ids_of_one_row_serve_every_row(attention_fn):
    """[1, T] positions (as transformers takes them) equal the same row given for each row of the batch; with
    flex attention the document mask used to index past its one row (IndexError)."""
    net, tokens = model(attention_fn).eval(), ids()
    one_row = POSITIONS[:1]
    with torch.no_grad():
        torch.testing.assert_close(net(tokens, one_row), net(tokens, one_row.expand(2, -1)), rtol=0, atol=0)
        torch.testing.assert_close(net(tokens, one_row[0]), net(tokens, one_row.expand(2, -1)), rtol=0, atol=0)


@pytest.mark.parametrize("tokens, positions, message", [
    (torch.zeros(2, 12, dtype=torch.long), torch.zeros(2, 10, dtype=torch.long),
     r"^CausalLM: position_ids of shape \(2, 10\) do not fit input_ids of shape \(2, 12\); give one position per "
     r"token"),
    (torch.zeros(2, 12, dtype=torch.long), torch.zeros(3, 12, dtype=torch.long), r"position_ids of shape \(3, 12\)"),
    (torch.zeros(12, dtype=torch.long), None, r"^CausalLM: input_ids must be \[batch, seq\]; got shape \(12,\)"),
])
def test_tokens_and_positions_of_the_wrong_shape_are_refused_naming_both(tokens, positions, message):
    with pytest.raises(ValueError, match=message):
        model()(tokens, positions)


def _layer(**kwargs):
    return PreLNLayer(HIDDEN, functools.partial(Attention, num_heads=HEADS), functools.partial(SwiGLU, intermediate_size=8),
                      RMSNorm, **kwargs)


def _causal_lm(**kwargs):
    layer_factory = functools.partial(PreLNLayer, attention_factory=functools.partial(Attention, num_heads=HEADS),
                                      feedforward_factory=functools.partial(SwiGLU, intermediate_size=8),
                                      norm_factory=RMSNorm)
    return CausalLM(VOCAB, HIDDEN, 1, layer_factory, RMSNorm, **kwargs)


@pytest.mark.parametrize("build, message", [
    (lambda: RMSNorm(0), r"RMSNorm: hidden_size=0 must be a positive integer"),
    (lambda: RMSNorm(2.5), r"RMSNorm: hidden_size=2.5 must be a positive integer"),
    (lambda: LayerNorm(-1), r"LayerNorm: hidden_size=-1 must be a positive integer"),
    (lambda: SwiGLU(HIDDEN, 8, chunk_tokens=2.5), r"SwiGLU: chunk_tokens=2.5 must be a positive integer"),
    (lambda: SwiGLU(HIDDEN, 8, chunk_tokens=0), r"SwiGLU: chunk_tokens=0 must be a positive integer"),
    (lambda: GELUMLP(HIDDEN, 8, approximate="tahn"), r"GELUMLP: approximate='tahn'; choose one of \['none', 'tanh'\]"),
    (lambda: Attention(HIDDEN, HEADS, dropout=1.5), r"Attention: dropout=1.5 must be a probability between 0 and 1"),
    (lambda: _layer(residual_dropout=-0.1), r"PreLNLayer: residual_dropout=-0.1 must be a probability"),
    (lambda: _causal_lm(embedding_dropout=2), r"CausalLM: embedding_dropout=2 must be a probability"),
    (lambda: _causal_lm(init_std=-1), r"CausalLM: init_std=-1 must be a number >= 0"),
    (lambda: _causal_lm(rope=RotaryEmbedding(8)), r"CausalLM: rope head_dim=8 does not match attention head_dim=16; "
                                                   r"build the RotaryEmbedding with the attention's head_dim"),
    (lambda: RotaryEmbedding(16, theta=0), r"RotaryEmbedding: theta=0 must be a positive number"),
    (lambda: RotaryEmbedding(7), r"RotaryEmbedding: head_dim=7 must be even"),
    (lambda: RotaryEmbedding(16, llama3_scaling={"factr": 8.0}), r"RotaryEmbedding: llama3_scaling takes factor, "
                                                                 r"low_freq_factor.*unknown: 'factr'; missing: factor"),
    (lambda: RotaryEmbedding(16, llama3_scaling={"rope_type": "yarn"}), r"llama3_scaling has rope_type='yarn'"),
], ids=["rms-norm-zero", "rms-norm-float", "layer-norm-negative", "chunk-float", "chunk-zero", "gelu-approximate",
        "attention-dropout", "residual-dropout", "embedding-dropout", "init-std", "rope-head-dim", "rope-theta",
        "rope-odd", "llama3-keys", "llama3-type"])
def test_a_bad_size_rate_or_option_fails_at_build_in_one_line_naming_module_and_value(build, message):
    with pytest.raises(ValueError, match=message) as error:
        build()
    assert "\n" not in str(error.value)


def test_a_transformers_llama3_rope_scaling_with_its_rope_type_gives_the_same_tables():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    positions = torch.arange(200)[None]
    with_type = RotaryEmbedding(16, 500000.0, {"rope_type": "llama3", **scaling})
    assert with_type.llama3_scaling == scaling
    for got, want in zip(with_type(positions), RotaryEmbedding(16, 500000.0, scaling)(positions)):
        assert torch.equal(got, want)


def test_post_ln_layers_recompute_to_the_same_gradients_under_checkpointing_with_dropout():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        layer_factory = functools.partial(
            PostLNLayer, attention_factory=functools.partial(Attention, num_heads=HEADS, dropout=0.1),
            feedforward_factory=functools.partial(SwiGLU, intermediate_size=64), norm_factory=RMSNorm, dropout=0.1)
        net = CausalLM(VOCAB, HIDDEN, 2, layer_factory, RMSNorm, rope=RotaryEmbedding(HIDDEN // HEADS),
                       activation_checkpointing=checkpointing, embedding_dropout=0.1)
        torch.manual_seed(5)
        grads.append(logits_and_grads(net, ids(), POSITIONS)[1])
    for name, grad in grads[0].items():
        assert torch.equal(grads[1][name], grad), name


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=-1.0), r"sampling: temperature=-1.0 must be a number >= 0"),
    (dict(temperature=1.0, top_k=0), r"sampling: top_k=0 must be a positive integer"),
    (dict(temperature=1.0, top_p=0.0), r"sampling: top_p=0.0 must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=1.5), r"sampling: top_p=1.5 must be in \(0, 1\]"),
], ids=["negative-temperature", "top-k-zero", "top-p-zero", "top-p-above-one"])
def test_generate_refuses_sampling_settings_that_sample_nonsense_or_fail_in_torch(settings, message):
    with pytest.raises(ValueError, match=message):
        model().eval().generate(ids()[:, :4], max_new_tokens=2, **settings)


@pytest.mark.parametrize("project, config", [("examples/tutorials/tiny_llama", "tiny_llama.yaml"),
                                             ("examples/dynamic_lm", "sandwich.yaml")], ids=["tiny_llama", "sandwich"])
def test_generated_model_code_builds_the_same_model_as_construct(project, config, tmp_path, monkeypatch):
    """`forgather code --target model`: the module, run from elsewhere, builds a model with the same parameter names,
    shapes and (same seed) values and logits as constructing the config (the sandwich's layer is a project file)."""
    import importlib.util
    from pathlib import Path

    from forgather.project import Project

    loaded = Project.load(str(Path(__file__).parent.parent / project)).load_config(config)
    source = tmp_path / "generated_model.py"
    source.write_text(loaded.code("model"))
    torch.manual_seed(0)
    constructed = loaded.construct("model")()
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("generated_model", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    generated = module.construct()()
    assert type(generated.layers[0]).__name__ == type(constructed.layers[0]).__name__
    want, got = constructed.state_dict(), generated.state_dict()
    assert [(name, t.shape) for name, t in got.items()] == [(name, t.shape) for name, t in want.items()]
    assert all(torch.equal(got[name], want[name]) for name in want)
    tokens = torch.randint(0, constructed.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(generated.eval()(tokens, POSITIONS), constructed.eval()(tokens, POSITIONS))
