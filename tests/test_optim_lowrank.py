"""GaLoreAdamW and ApolloAdamW on CPU: low-rank state, the paper's update rules, checkpoint-safe state."""

import io

import pytest
import torch

from forgather.optim import ApolloAdamW, GaLoreAdamW

torch.set_num_threads(1)


def param(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def step_with(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def test_galore_moments_live_in_the_projected_space():
    w = param((24, 10))
    opt = GaLoreAdamW([w], rank=3)
    step_with(opt, [w], [torch.randn(24, 10)])
    assert opt.state[w]["exp_avg"].shape == (24, 3) and opt.state[w]["projection"].shape == (3, 10)


def test_galore_first_update_has_at_most_the_projection_rank():
    w = param((12, 30))
    before = w.detach().clone()
    step_with(GaLoreAdamW([w], rank=2, lr=0.1), [w], [torch.randn(12, 30)])
    assert torch.linalg.matrix_rank(w.detach() - before).item() == 2


def test_parameters_outside_low_rank_get_plain_adamw():
    vec, mat = param((7,)), param((6, 5), seed=1)
    ref_vec, ref_mat = vec.detach().clone().requires_grad_(), mat.detach().clone().requires_grad_()
    opt = GaLoreAdamW([{"params": [vec]}, {"params": [mat], "rank": None}], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([ref_vec, ref_mat], lr=1e-2, weight_decay=0.1)
    for seed in range(3):
        grads = [torch.randn(7, generator=torch.Generator().manual_seed(seed)), torch.randn(6, 5)]
        step_with(opt, [vec, mat], grads)
        step_with(ref, [ref_vec, ref_mat], grads)
    torch.testing.assert_close(vec, ref_vec)
    torch.testing.assert_close(mat, ref_mat)


def test_galore_recomputes_the_projection_every_gap_steps():
    w = param((16, 8))
    opt = GaLoreAdamW([w], rank=2, update_proj_gap=2)
    projections = []
    for _ in range(3):
        step_with(opt, [w], [torch.randn(16, 8)])
        projections.append(opt.state[w]["projection"].clone())
    assert torch.equal(projections[0], projections[1]) and not torch.equal(projections[1], projections[2])


@pytest.mark.parametrize("shape", [(20, 6), (6, 20)])
def test_apollo_channel_scaling_moves_each_channel_along_its_gradient(shape):
    w = param(shape)
    before = w.detach().clone()
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    step_with(ApolloAdamW([w], rank=2, lr=0.1), [w], [grad])
    delta = before - w.detach()
    axis = 1 if shape[0] >= shape[1] else 0  # the kept channels: rows (right projection) or columns (left)
    factor = (delta * grad).sum(dim=axis, keepdim=True) / grad.square().sum(dim=axis, keepdim=True)
    assert (delta - factor * grad).norm().item() < 1e-5 * delta.norm().item()
    assert factor.min().item() > 0 and factor.std().item() > 0


def test_apollo_norm_growth_limiter_caps_a_gradient_spike():
    w = param((20, 6))
    betas = (0.9, 0.999)
    opt = ApolloAdamW([w], rank=2, lr=1.0, betas=betas, scale_type="tensor")
    norms = []
    for scale in (1.0, 1000.0):
        before = w.detach().clone()
        step_with(opt, [w], [torch.randn(20, 6) * scale])
        norms.append((before - w.detach()).norm().item())
    bias = [(1 - betas[1] ** t) ** 0.5 / (1 - betas[0] ** t) for t in (1, 2)]
    assert norms[1] / bias[1] <= 1.01 * norms[0] / bias[0] * (1 + 1e-5)


@pytest.mark.parametrize("cls", [GaLoreAdamW, ApolloAdamW])
def test_state_dict_loads_with_weights_only(cls):
    w = param((16, 8))
    opt = cls([w], rank=2)
    step_with(opt, [w], [torch.randn(16, 8)])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert torch.equal(loaded["state"][0]["projection"], opt.state[w]["projection"])


@pytest.mark.parametrize("cls", [GaLoreAdamW, ApolloAdamW])
def test_low_rank_optimizers_reduce_a_least_squares_loss(cls):
    gen = torch.Generator().manual_seed(0)
    x, target = torch.randn(64, 16, generator=gen), torch.randn(64, 12, generator=gen)
    w = torch.zeros(16, 12, requires_grad=True)
    opt = cls([w], rank=4, lr=0.05, update_proj_gap=10)
    losses = []
    for _ in range(60):
        loss = (x @ w - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_invalid_rank_is_rejected():
    with pytest.raises(ValueError, match="rank"):
        GaLoreAdamW([param((4, 4))], rank=0)


def test_loaded_state_of_bf16_parameters_stays_fp32():
    w = param((16, 8)).detach().bfloat16().requires_grad_()
    opt = GaLoreAdamW([w], rank=2)
    step_with(opt, [w], [torch.randn(16, 8).bfloat16()])
    other = GaLoreAdamW([w], rank=2)
    other.load_state_dict(opt.state_dict())
    assert {other.state[w][k].dtype for k in ("exp_avg", "exp_avg_sq", "projection")} == {torch.float32}
