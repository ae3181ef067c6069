"""scripts/bench_energy.py on a CPU: a step's worth of each piece is what the 1.24B model makes in one step, and
the three scripts that describe that shape agree on it."""

import sys

import torch

from helpers.plain_lightning_train import build_model
from helpers.scripts import SCRIPTS, load_script

sys.path.insert(0, str(SCRIPTS))  # bench_energy imports its neighbours by name, as it does when run
bench_energy = load_script("bench_energy")
bench_matmuls = load_script("bench_matmuls")
bench_train = load_script("bench_train")


def test_the_scripts_describe_one_shape():
    s, train = bench_energy.SHAPE, bench_train.SHAPES["1b"]
    assert {key: s[key] for key in train if key in s} == {key: train[key] for key in train if key in s}
    assert (bench_matmuls.HIDDEN, bench_matmuls.LAYERS, bench_matmuls.VOCAB) == (s["hidden"], s["layers"], s["vocab"])
    assert bench_matmuls.TOKENS == bench_energy.TOKENS == s["batch"] * s["seq"]
    kv_width = s["kv_heads"] * s["head_dim"]
    assert bench_matmuls.PRODUCTS["qkv"][:2] == (s["heads"] * s["head_dim"] + 2 * kv_width, s["hidden"])
    assert bench_matmuls.PRODUCTS["gate_up"][:2] == (2 * s["intermediate"], s["hidden"])


def test_a_steps_worth_of_each_piece_is_the_models_count():
    """Norms: every RMSNorm module of the model runs once a step (two a layer and the final one); attention,
    rotary and SwiGLU once a layer; the products: every linear weight and the tied head (6 FLOPs a weight a
    token, tests/test_bench_matmuls.py)."""
    s = bench_energy.SHAPE
    with torch.device("meta"):
        model = build_model(vocab_size=s["vocab"], hidden_size=s["hidden"], num_layers=s["layers"],
                            num_heads=s["heads"])
    kinds = [type(m).__name__ for m in model.modules()]
    assert bench_energy.COUNTS["norms"] == kinds.count("RMSNorm")
    assert bench_energy.COUNTS["attention"] == bench_energy.COUNTS["rotary"] == kinds.count("Attention")
    assert all(bench_energy.COUNTS[name] == kinds.count("SwiGLU") for name in bench_energy.PIECES if "swiglu" in name)
    assert set(bench_energy.PIECES) == set(bench_energy.COUNTS) >= set(bench_energy.DEFAULT_PIECES)


def test_measure_reports_the_counters_joules_a_token(monkeypatch):
    """The energy a step comes from the counter's difference around the loop, not from the clock samples."""
    monkeypatch.setattr(bench_energy.torch.cuda, "synchronize", lambda: None)

    class Event:
        def __init__(self, **_):
            self.t = None

        def record(self):
            self.t = bench_energy.time.perf_counter()

        def elapsed_time(self, other):
            return 1e3 * (other.t - self.t)

    monkeypatch.setattr(bench_energy.torch.cuda, "Event", Event)
    joules = iter([100.0, 130.0])
    calls = []
    result = bench_energy.measure(lambda: calls.append(1), 0.05, lambda: next(joules))
    steps = result["steps"]
    assert steps == len(calls) - 2  # two warm-up calls before the counter's first reading
    assert abs(result["joules_per_step"] - 30.0 / steps) < 1e-9
    assert abs(result["mj_per_token"] - 1e3 * 30.0 / steps / bench_energy.TOKENS) < 1e-9


class WritesItsInputs(torch.autograd.Function):
    """silu(gate) * up whose backward writes the gradients over gate and up, as Liger's kernels do."""

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    @staticmethod
    def forward(ctx, gate, up):
        WritesItsInputs.seen.append((gate.detach().clone(), up.detach().clone()))
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        s = torch.sigmoid(gate)
        dgate, dup = dh * up * (s + gate * s * (1 - s)), dh * gate * s
        gate.copy_(dgate)
        up.copy_(dup)
        return gate, up


def test_an_op_that_writes_its_inputs_gets_the_first_inputs_at_every_call():
    """Without the copies the op's own gradients come back as its inputs (what made Liger's gate look cheap)."""
    WritesItsInputs.seen = []
    step = bench_energy.gate_call(WritesItsInputs.apply, "cpu", writes_inputs=True, shape=(4, 64))
    for _ in range(3):
        step()
    first = WritesItsInputs.seen[0]
    assert all(torch.equal(g, first[0]) and torch.equal(u, first[1]) for g, u in WritesItsInputs.seen)

    WritesItsInputs.seen = []
    step = bench_energy.gate_call(WritesItsInputs.apply, "cpu", shape=(4, 64))
    step()
    step()
    assert not torch.equal(WritesItsInputs.seen[0][0], WritesItsInputs.seen[1][0])


def test_the_sweep_starts_each_kernel_at_the_default_tiling():
    """sweep_table's ratios are against each kernel's first tiling, which must be packed_attention.TILING's."""
    from forgather.models.packed_attention import KERNELS, TILING

    assert set(bench_energy.PACKED_SWEEP) == set(KERNELS)
    assert all(bench_energy.PACKED_SWEEP[k][0] == list(TILING[k]) for k in KERNELS)


def test_the_sweep_table_names_each_kernels_least_energy_as_the_override():
    def result(ms, mj):
        return {"ms_per_step": ms, "mean_power_w": 600.0, "mj_per_token": mj}

    sweep = {"forward": {"16,64,4,3": result(1.0, 0.10), "32,64,8,3": result(1.2, 0.08)},
             "dq": {"16,32,4,3": result(1.0, 0.05), "8,64,4,3": {"error": "OutOfResources"}},
             "dkdv": {"16,64,4,3": result(2.0, 0.20), "8,64,4,3": result(1.8, 0.25)}}
    text = bench_energy.sweep_table(sweep)
    lines = text.splitlines()
    assert lines[-1] == "least energy: attention_kernel_options={forward:[32,64,8,3],dq:[16,32,4,3],dkdv:[16,64,4,3]}"
    forward = [line for line in lines if line.startswith("| forward")]
    assert forward[0].startswith("| forward | 32,64,8,3 |") and forward[0].endswith("| 0.800 |")
    assert any("OutOfResources" in line for line in lines)
