"""What the loss tests compare: a loss and its gradients with respect to the hidden states and the head weight."""

import torch


def loss_and_grads(loss_fn, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor):
    """(loss, d loss / d h, d loss / d w) of `loss_fn(h, w, labels)` on fresh leaf copies of h and w."""
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = loss_fn(h, w, labels)
    loss.backward()
    return loss.detach(), h.grad, w.grad
