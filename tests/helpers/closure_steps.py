"""Optimizer steps as Lightning takes them (the gradients made inside the closure), on seeded random
parameters and gradients: the drive of tests/test_optim_compiled.py and tests/test_optim_triton_adamw.py."""

import torch

SHAPES = ((16, 24), (24,), (7, 3))


def make_params(seed=0, dtype=torch.float32, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen) * 0.02).to(dtype).requires_grad_() for shape in shapes]


def run_steps(params, optimizer, steps=5, seed=1, scheduler=None, skip=None):
    """`steps` steps of `optimizer.step(closure)`, the closure setting seeded gradients (as Lightning's forward
    and backward would), then `scheduler.step()`. `skip(step, index)`: whether parameter `index` has no
    gradient at `step` (its step count lags)."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]

        def closure():
            for index, (p, g) in enumerate(zip(params, grads)):
                p.grad = None if skip and skip(step, index) else g.clone()
            return torch.tensor(1.0)

        assert optimizer.step(closure) is not None
        if scheduler is not None:
            scheduler.step()
    return params
