"""K-step joint sampling: x and, with a divergence head, log p, forward from noise to data.

Algorithm (arXiv:2512.02636, Sec. 3; METHOD.md Sec. 4): uniform grid 0 = t_0 < ... < t_K = 1,
x <- Phi(x, t_k, t_{k+1}) and log p <- log p - (t_{k+1} - t_k) kappa D(x, t_k, t_{k+1}).
For a model without a trained flow map this is K Euler steps of the instantaneous velocity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from f2d2.model import FlowMap, batch_view


@dataclass(frozen=True)
class Samples:
    """Result of :func:`sample`.

    Attributes:
        x: (B, *data_shape) samples at t = 1.
        log_p: (B,) the model's log-density of ``x`` (F2D2 joint sampling), None without a head.
        nfe: network evaluations used.
    """

    x: Tensor
    log_p: Tensor | None
    nfe: int


def time_grid(num_steps: int, *, like: Tensor, reverse: bool = False) -> Tensor:
    """Uniform grid of num_steps + 1 times on [0, 1] (descending from 1 if ``reverse``)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    grid = torch.linspace(0.0, 1.0, num_steps + 1, dtype=like.dtype, device=like.device)
    return grid.flip(0) if reverse else grid


@torch.no_grad()
def sample(model: FlowMap, x0: Tensor, num_steps: int, *, track_log_p: bool = True) -> Samples:
    """Push noise x0 (B, *data_shape) to data in ``num_steps`` flow-map steps."""
    grid = time_grid(num_steps, like=x0)
    joint = track_log_p and model.capabilities.divergence_head
    x = x0
    log_p = model.prior_log_prob(x0) if joint else None
    for t, s in zip(grid[:-1], grid[1:]):
        out = model(x, t, s)
        if joint:
            log_p = log_p - (s - t) * model.kappa * out.div
        x = x + batch_view((s - t).expand(x.shape[0]), x) * out.u
    return Samples(x, log_p, num_steps)
