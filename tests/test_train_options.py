"""Options of the training step that change how it is computed, never what: fused projections (q/k/v and
gate/up as one matmul each) and the compile scope ("model": embedding to final norm as one graph). Each gives
the default's loss and gradients in fp32, and leaves the parameters, the state dict and checkpoints as they
were, on tiny CPU models."""

from __future__ import annotations

import functools
import io
import types

import pytest
import torch
from torch import nn

from forgather.errors import UserError
from forgather.convert.components import QKNormAttention
from forgather.lightning.module import CausalLMModule
from forgather.models.attention import Attention
from forgather.models.causal_lm import CausalLM
from forgather.models.feedforward import SwiGLU
from forgather.models.fused import fusable, fused_attention_projections, fused_linear
from forgather.models.layers import PreLNLayer
from forgather.models.norm import RMSNorm
from forgather.models.rope import RotaryEmbedding

VOCAB, HIDDEN, HEADS, KV_HEADS = 61, 32, 4, 2
PACKED_POSITIONS = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(fused: bool = False, bias: bool = False, attention_fn: str = "sdpa") -> CausalLM:
    torch.manual_seed(0)
    layer = functools.partial(
        PreLNLayer,
        attention_factory=functools.partial(Attention, num_heads=HEADS, num_kv_heads=KV_HEADS, bias=bias,
                                            attention_fn=attention_fn, fused_projections=fused),
        feedforward_factory=functools.partial(SwiGLU, intermediate_size=48, bias=bias, fused_projections=fused),
        norm_factory=RMSNorm,
    )
    return CausalLM(VOCAB, HIDDEN, 2, layer, RMSNorm, rope=RotaryEmbedding(HIDDEN // HEADS, theta=10000.0))


def ids(batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def loss_and_grads(model: nn.Module, forward=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokens = ids()
    logits = (forward or model)(tokens, position_ids=PACKED_POSITIONS)
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def assert_same_step(got, expected) -> None:
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)
    assert got[1].keys() == expected[1].keys()
    for name in expected[1]:
        torch.testing.assert_close(got[1][name], expected[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_fused_linear_equals_the_separate_layers_and_their_gradients():
    torch.manual_seed(0)
    layers = (nn.Linear(8, 6), nn.Linear(8, 3), nn.Linear(8, 3))
    x = torch.randn(2, 5, 8, requires_grad=True)
    fused = fused_linear(x, layers)
    separate = [layer(x) for layer in layers]
    for got, expected in zip(fused, separate):
        torch.testing.assert_close(got, expected)
    sum(out.square().sum() for out in fused).backward()
    fused_grads = [layer.weight.grad.clone() for layer in layers] + [x.grad.clone()]
    for tensor in [*(layer.weight for layer in layers), x]:
        tensor.grad = None
    sum(out.square().sum() for out in separate).backward()
    for got, expected in zip(fused_grads, [layer.weight.grad for layer in layers] + [x.grad]):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("fusion", [True, "qkv", "kv", "auto"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("attention_fn", ["sdpa", "eager"])
def test_fused_projections_give_the_default_loss_and_gradients(bias, attention_fn, fusion):
    """true: q/k/v and gate/up each one product; "qkv": q/k/v one product, gate and up their own; "kv": k and v
    one product, q, gate and up their own; "auto" on the CPU: every projection its own."""
    expected = loss_and_grads(tiny_model(bias=bias, attention_fn=attention_fn))
    fused = tiny_model(fused=fusion, bias=bias, attention_fn=attention_fn)
    calls = []
    for layer in fused.layers:  # the fused path reads the weights; the layers' own forward never runs
        for projection in (layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj,
                           layer.feedforward.up_proj):
            projection.register_forward_hook(lambda module, *args: calls.append(module))
    assert_same_step(loss_and_grads(fused), expected)
    own = {True: [], "qkv": [layer.feedforward.up_proj for layer in fused.layers],
           "auto": [projection for layer in fused.layers for projection in (
               layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj, layer.feedforward.up_proj)],
           "kv": [layer.attention.q_proj for layer in fused.layers]
           + [layer.feedforward.up_proj for layer in fused.layers]}[fusion]
    assert sorted(map(id, calls)) == sorted(map(id, own))


@pytest.mark.parametrize("value", ["qk", 1, "true", "QKV"])
def test_an_unknown_fusion_is_a_one_line_error(value):
    for make in (lambda: Attention(HIDDEN, HEADS, fused_projections=value),
                 lambda: SwiGLU(HIDDEN, 48, fused_projections=value)):
        with pytest.raises(ValueError, match=r"fused_projections=.*; choose false, true .*'qkv'.*'kv'.* or 'auto'"):
            make()


def test_auto_fusion_is_qkv_on_a_gpu_and_separate_elsewhere():
    """What "auto" resolves to follows the input's device (a stand-in for a CUDA tensor here; the GPU tests run
    the layers with it); every other choice is itself on any device."""
    cuda_input, cpu_input = types.SimpleNamespace(is_cuda=True), torch.zeros(1)
    assert fused_attention_projections("auto", cuda_input) == "qkv"
    assert fused_attention_projections("auto", cpu_input) is False
    for choice in (False, True, "kv", "qkv"):
        assert fused_attention_projections(choice, cuda_input) is choice


def test_fused_swiglu_in_token_chunks_equals_the_whole():
    torch.manual_seed(0)
    plain = SwiGLU(16, 24)
    fused = SwiGLU(16, 24, chunk_tokens=5, fused_projections=True)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 7, 16, requires_grad=True)
    torch.testing.assert_close(fused(x), plain(x))


def test_a_checkpoint_saved_with_fused_projections_loads_without_them():
    fused = tiny_model(fused=True)
    with torch.no_grad():  # weights of its own, so the load below is what makes the outputs equal
        for parameter in fused.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    buffer.seek(0)
    plain = tiny_model()
    assert plain.state_dict().keys() == fused.state_dict().keys()
    plain.load_state_dict(torch.load(buffer), strict=True)
    tokens = ids()
    torch.testing.assert_close(plain(tokens), fused(tokens))


def test_projections_that_are_not_plain_linear_layers_run_separately():
    # QK-norm attention replaces q_proj and k_proj by normed projections: fusing them would skip the norms.
    torch.manual_seed(0)
    plain = QKNormAttention(HIDDEN, HEADS)
    fused = QKNormAttention(HIDDEN, HEADS, fused_projections=True)
    fused.load_state_dict(plain.state_dict())
    assert not fusable(fused.q_proj, fused.k_proj, fused.v_proj)
    model = tiny_model()
    x = torch.randn(2, 12, HIDDEN)
    rope, mask = model.layer_inputs(ids())
    torch.testing.assert_close(fused(x, rope, mask), plain(x, rope, mask))


@pytest.fixture
def graphs(monkeypatch):
    """torch.compile with a backend that records each captured graph and runs it as it is (seconds, not
    minutes, on a CPU): the capture is what the scope changes; inductor's numerics are the GPU tests' part."""
    compile_, captured = torch.compile, []

    def record(graph, example_inputs):
        captured.append(graph)
        return graph.forward

    monkeypatch.setattr(torch, "compile", lambda fn=None, **kwargs: compile_(fn, backend=record, **kwargs))
    return captured


def test_compile_scope_model_compiles_the_whole_forward_and_changes_nothing_else(graphs):
    module = CausalLMModule(tiny_model(), compile=True, compile_scope="model")
    module.configure_model()
    module.configure_model()  # Lightning calls it per stage: compiled once
    assert all(layer._compiled_call_impl is None for layer in module.model.layers)
    batch = {"input_ids": ids(), "position_ids": PACKED_POSITIONS}
    compiled = module._loss(batch)
    compiled.backward()
    # One graph from the embedding to the final norm: every layer's projections are in it.
    linears = [node for graph in graphs for node in graph.graph.nodes if node.target is torch._C._nn.linear]
    assert len(linears) == 2 * 7
    reference = CausalLMModule(tiny_model())
    expected = reference._loss(batch)
    expected.backward()
    torch.testing.assert_close(compiled, expected, rtol=1e-6, atol=1e-6)
    for (name, got), (_, want) in zip(module.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert module.state_dict().keys() == reference.state_dict().keys()


def test_compile_scope_layers_is_what_compile_true_means():
    module = CausalLMModule(tiny_model(), compile=True)
    module.configure_model()
    assert module._hidden_states is None
    assert all(layer._compiled_call_impl is not None for layer in module.model.layers)


@pytest.mark.parametrize("scope", ["layers", "model"])
def test_compile_mode_is_torch_compiles_mode_in_either_scope(scope, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: seen.append(options) or fn)
    module = CausalLMModule(tiny_model(), compile=True, compile_scope=scope, compile_mode="max-autotune-no-cudagraphs")
    module.configure_model()
    assert seen and all(options == {"mode": "max-autotune-no-cudagraphs"} for options in seen)
    with pytest.raises(ValueError, match=r"compile_mode='fastest'.*max-autotune-no-cudagraphs"):
        CausalLMModule(tiny_model(), compile=True, compile_mode="fastest")


def test_compile_options_reach_inductor_alone_or_over_the_modes_settings(monkeypatch):
    from torch._inductor import list_mode_options

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: seen.append(options) or fn)
    CausalLMModule(tiny_model(), compile=True, compile_options={"coordinate_descent_tuning": True}).configure_model()
    assert seen[-1] == {"options": {"coordinate_descent_tuning": True}}
    # torch.compile refuses a mode and options together: the mode's own settings are the base, ours override
    CausalLMModule(tiny_model(), compile=True, compile_scope="model", compile_mode="max-autotune-no-cudagraphs",
                   compile_options={"coordinate_descent_tuning": False, "epilogue_fusion": False}).configure_model()
    expected = {**list_mode_options("max-autotune-no-cudagraphs"), "coordinate_descent_tuning": False,
                "epilogue_fusion": False}
    assert seen[-1] == {"options": expected} and expected.get("max_autotune") is True


def test_a_misspelled_compile_option_is_named_with_its_close_matches():
    with pytest.raises(UserError, match=r"'coordinate_decent_tuning' is not a setting.*'coordinate_descent_tuning'"):
        CausalLMModule(tiny_model(), compile=True, compile_options={"coordinate_decent_tuning": True})
    with pytest.raises(TypeError, match=r"compile_options must be a mapping.*got str"):
        CausalLMModule(tiny_model(), compile=True, compile_options="coordinate_descent_tuning")
    with pytest.raises(UserError, match=r"coordinate_descent_tuning takes true or false .*; got str 'yes'"):
        CausalLMModule(tiny_model(), compile=True, compile_options={"coordinate_descent_tuning": "yes"})
    with pytest.raises(UserError, match=r"coordinate_descent_search_radius takes an integer .*; got bool True"):
        CausalLMModule(tiny_model(), compile=True, compile_options={"coordinate_descent_search_radius": True})
    module = CausalLMModule(tiny_model(), compile=True, compile_options={"coordinate_descent_search_radius": 2})
    assert module.compile_options == {"coordinate_descent_search_radius": 2}


def test_compile_settings_without_compile_warn_that_they_do_nothing(recwarn):
    with pytest.warns(UserWarning, match=r"compile_mode='max-autotune-no-cudagraphs', compile_options=.*only take "
                                         r"effect with compile=true"):
        CausalLMModule(tiny_model(), compile_mode="max-autotune-no-cudagraphs",
                       compile_options={"coordinate_descent_tuning": True})
    with pytest.warns(UserWarning, match=r"^compile_scope='model' only takes effect"):
        CausalLMModule(tiny_model(), compile_scope="model")
    CausalLMModule(tiny_model())  # the defaults, uncompiled: nothing to say
    CausalLMModule(tiny_model(), compile=True, compile_mode="max-autotune-no-cudagraphs")
    assert not [w for w in recwarn if "effect with compile=true" in str(w.message)]


def test_an_unknown_compile_scope_names_the_choices():
    with pytest.raises(ValueError, match=r"compile_scope='graph'.*'layers'.*'model'"):
        CausalLMModule(tiny_model(), compile=True, compile_scope="graph")


def test_the_options_are_config_values_of_the_llama_template(capsys):
    import yaml

    from forgather.run import main

    assert main(["+experiment=tiny_llama", "fused_projections=true", "fused_norm=true", "compile=true", "compile_scope=model",
                 "compile_mode=max-autotune-no-cudagraphs", "compile_options={coordinate_descent_tuning:true}",
                 "--cfg", "job", "--resolve"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["module"]["compile_scope"] == "model"
    assert config["module"]["compile_mode"] == "max-autotune-no-cudagraphs"
    assert config["module"]["compile_options"] == {"coordinate_descent_tuning": True}
    layer = config["model"]["layer_factory"]
    assert layer["attention_factory"]["fused_projections"] is True
    assert layer["feedforward_factory"]["fused_projections"] is True
    assert layer["norm_factory"]["fused"] is True and config["model"]["norm_factory"]["fused"] is True


def test_an_export_of_a_fused_model_loads_and_keeps_the_weight_names(tmp_path):
    from forgather.models.export import build_model, load_model, save_model
    from helpers.tiny_lm import tiny_tree

    tree = tiny_tree(VOCAB)
    layer = tree["layer_factory"]
    layer["attention_factory"]["fused_projections"] = True
    layer["feedforward_factory"]["fused_projections"] = True
    torch.manual_seed(0)
    model = build_model(tree).eval()
    loaded = load_model(save_model(model, tree, tmp_path / "fused", "fused"))
    assert loaded.state_dict().keys() == model.state_dict().keys()
    torch.testing.assert_close(loaded(ids()), model(ids()), rtol=0, atol=0)
