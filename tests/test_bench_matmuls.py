"""scripts/bench_matmuls.py on a CPU: the step its `--energy` loop runs is a training step's products, one for one."""

from helpers.scripts import load_script

bench_matmuls = load_script("bench_matmuls")


def test_energy_step_makes_the_training_steps_products_in_its_order():
    """6 FLOPs per matmul weight per token: every layer's q/k/v, o, gate/up and down and the head's (tied) weight
    in forward, input gradient and weight gradient, the head over the loss's chunks; forwards first, the head's
    chunks at the turn, then the layers' gradients in reverse."""
    b = bench_matmuls
    order = b.step_order(b.STEPS["fused qkv, gate_up"])
    flops = sum(2 * m * n * k for name, _ in order for n, k, m, _ in [b.PRODUCTS[name]])
    hidden, layers, vocab, tokens = b.HIDDEN, b.LAYERS, b.VOCAB, b.TOKENS
    layer_weights = hidden * (hidden + 2 * 512) + hidden * hidden + 2 * hidden * 8192 + 8192 * hidden
    assert flops == 6 * tokens * (layers * layer_weights + vocab * hidden)
    first_head = order.index(("head", "forward"))
    assert {layout for _, layout in order[:first_head]} == {"forward"}
    assert {name for name, _ in order[first_head:first_head + 3 * b.CHUNKS]} == {"head"}
    assert order[first_head + 3 * b.CHUNKS:][:2] == [("down", "dgrad"), ("down", "wgrad")]
    assert order[-1] == ("qkv", "wgrad")
