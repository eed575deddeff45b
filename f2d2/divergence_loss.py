"""The F2D2 divergence terms, written once and combined with any base flow-map method.

F2D2 adds a scalar head D(x, t, s) with (s - t) kappa D(x, t, s) = int_t^s div v(x_tau, tau) dtau,
trained by two terms that mirror the base method's two velocity terms (arXiv:2512.02636, Sec. 3):

- L_div (diagonal, s = t): (D(x_t, t, t) - sg[div w(x_t, t)] / kappa)^2, w the model's own
  instantaneous velocity or a frozen teacher's (:func:`diagonal_divergence_target`).
- L_D (off-diagonal): the base method's flow-map condition applied to the accumulated divergence
  A(x, t, s) = (s - t) kappa D(x, t, s) instead of the displacement (s - t) u(x, t, s):
  semigroup (:func:`semigroup_target`), Eulerian (:func:`eulerian_target`) and Lagrangian
  (:func:`lagrangian_residual`).

Every prediction and target here is a (B,) tensor; :func:`scalar_squared_error` refuses anything
else, because a (B,) prediction against a (B, 1) target silently broadcasts to (B, B) (a bug
present in the authors' PyTorch code).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from f2d2.divergence import Estimator, Exact, divergence
from f2d2.model import FlowMap, as_batch_time
from f2d2.precision import full_precision


@dataclass(frozen=True)
class DivergenceLoss:
    """Configuration of the F2D2 divergence terms.

    Attributes:
        target: field w whose divergence D(x, t, t) learns: 'self' (the model's own u(x, t, t)
            under stop-gradient) or 'teacher' (a frozen flow-matching model).
        estimator: exact trace (small data) or Hutchinson (images).
        weight_diag: weight of L_div. weight_offdiag: weight of L_D.
    """

    target: Literal["self", "teacher"] = "self"
    estimator: Estimator = field(default_factory=Exact)
    weight_diag: float = 1.0
    weight_offdiag: float = 1.0

    def __post_init__(self) -> None:
        if self.target not in ("self", "teacher"):
            raise ValueError(f"divergence target must be 'self' or 'teacher', got {self.target!r}")


def scalar_squared_error(pred: Tensor, target: Tensor) -> Tensor:
    """(pred - target)^2 for two (B,) tensors; any other shape pair is an error, not a broadcast."""
    if pred.ndim != 1 or pred.shape != target.shape:
        raise ValueError(
            f"divergence prediction {tuple(pred.shape)} and target {tuple(target.shape)} must both be (B,)"
        )
    return (pred - target).pow(2)


def diagonal_divergence_target(
    field_model: FlowMap,
    x_t: Tensor,
    t: Tensor,
    kappa: float,
    estimator: Estimator = Exact(),
    generator: torch.Generator | None = None,
) -> Tensor:
    """sg[div w(x_t, t)] / kappa with w = field_model's instantaneous velocity; shape (B,).

    Always in float32, also inside a reduced-precision autocast (f2d2/precision.py)."""
    t = as_batch_time(t, x_t)
    with torch.no_grad(), full_precision(x_t):
        div = divergence(lambda x: field_model.velocity(x, t), x_t, estimator, generator=generator)
    return div.value.detach() / kappa


def semigroup_target(d_first: Tensor, d_second: Tensor) -> Tensor:
    """D* over [t, t + d] from its halves: (D(x, t, r) + D(x', r, t + d)) / 2, r = t + d / 2.

    Additivity of the accumulated divergence, (d/2) kappa D_1 + (d/2) kappa D_2 = d kappa D*,
    mirrors Shortcut's u* = (u_1 + u_2) / 2 (Frans et al., arXiv:2410.12557).
    """
    return 0.5 * (d_first + d_second)


def eulerian_target(div_diag: Tensor, d_div_dt: Tensor, step: Tensor) -> Tensor:
    """D* = div w(x_t, t) / kappa + (s - t) dD/dt, the MeanFlow identity for the divergence head.

    ``d_div_dt`` is the total derivative of D(x_t, t, s) along (v, 1, 0), computed in the same JVP as
    MeanFlow's du/dt (Geng et al., arXiv:2505.13447); all inputs (B,), result stop-gradient.
    """
    return (div_diag + step * d_div_dt).detach()


def lagrangian_residual(div_pred: Tensor, d_div_ds: Tensor, step: Tensor, div_end: Tensor) -> Tensor:
    """D + (s - t) sg[d_s D] - sg[div v(X, s) / kappa]: d_s of (s - t) D must equal div v at the endpoint.

    Mirrors LSD's d_s Phi(x, t, s) = v(Phi(x, t, s), s) (Boffi et al., arXiv:2505.18825); all (B,).
    """
    if not (div_pred.shape == d_div_ds.shape == step.shape == div_end.shape) or div_pred.ndim != 1:
        raise ValueError("Lagrangian divergence residual needs (B,) tensors")
    return div_pred + step * d_div_ds.detach() - div_end.detach()
