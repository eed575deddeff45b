"""Self-guidance: move the noise so that the model's own likelihood of where it lands goes up.

Objective (arXiv:2512.02636, Sec. 5; METHOD.md Sec. 4), one jump from noise to data:
    J(x_0) = -log p_1(Phi(x_0, 0, 1)) = -log p_0(x_0) + kappa D(x_0, 0, 1),
or, without the prior term, kappa D(x_0, 0, 1) alone. A few Adam steps (the paper: one) of size eta
on x_0 precede the usual K-step sampler. Each step costs one forward and one backward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from f2d2.model import FlowMap


def guidance_objective(model: FlowMap, x0: Tensor, prior_term: bool = True) -> Tensor:
    """J(x_0) per sample, shape (B,)."""
    out = model(x0, 0.0, 1.0)
    objective = model.kappa * out.div
    return objective - model.prior_log_prob(x0) if prior_term else objective


def guide_noise(model: FlowMap, x0: Tensor, eta: float, *, num_steps: int = 1, prior_term: bool = True) -> Tensor:
    """x_0 after ``num_steps`` Adam steps of size ``eta`` on J (samples stay independent: Adam
    acts elementwise and J is a sum of per-sample terms). The model's parameters get no gradient."""
    if not model.capabilities.divergence_head:
        raise ValueError("self-guidance needs a divergence head")
    if eta < 0 or num_steps < 0:
        raise ValueError(f"need eta >= 0 and num_steps >= 0, got {eta}, {num_steps}")
    x = x0.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=eta)
    for _ in range(num_steps):
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(guidance_objective(model, x, prior_term).sum(), x)
        x.grad = grad
        optimizer.step()
    return x.detach()
