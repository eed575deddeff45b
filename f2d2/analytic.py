"""Closed-form flow map for Gaussian data under the linear interpolant.

With p_0 = N(0, sigma_0^2 I), data x_1 ~ N(m, s^2 I) and x_t = (1 - t) x_0 + t x_1, the marginal
x_t ~ N(t m, sigma_t^2 I) with sigma_t^2 = (1 - t)^2 sigma_0^2 + t^2 s^2, and
    v(x, t)       = m + (sigma_t' / sigma_t) (x - t m),
    Phi(x, t, r)  = r m + (sigma_r / sigma_t) (x - t m),
    int_t^r div v = d log(sigma_r / sigma_t).
Everything is exact, so tests can demand zero losses and the analytic log-density. Used as the
ground truth of the test suite (and a "wrong" perturbation of it as a negative control). Its
Jacobian is isotropic and its divergence does not depend on x; f2d2.analytic_sinh is the nonlinear,
anisotropic fixture that sees wrong-point and transport bugs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from f2d2.model import Capabilities, FlowMap, FlowMapNet, FlowMapOutput, batch_view

_DIAGONAL_EPS = 1e-6  # |s - t| below which the s -> t limit formulas are used


class GaussianFlowMapNet(FlowMapNet):
    """Exact (u, D) for Gaussian data, optionally with deliberate errors: u scaled by
    (1 + velocity_error), and div_error * (1 + s - t) added to D (an error that is not a constant, so
    that every flow-map condition, the semigroup one included, can see it)."""

    def __init__(
        self,
        mean: Tensor,
        std: float,
        sigma_0: float,
        kappa: float = 1.0,
        velocity_error: float = 0.0,
        div_error: float = 0.0,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.data_shape = tuple(mean.shape)
        self.has_div_head = True
        self.std, self.sigma_0, self.kappa = float(std), float(sigma_0), float(kappa)
        self.velocity_error, self.div_error = float(velocity_error), float(div_error)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt((1 - t) ** 2 * self.sigma_0**2 + t**2 * self.std**2)

    def dsigma(self, t: Tensor) -> Tensor:
        return (-(1 - t) * self.sigma_0**2 + t * self.std**2) / self.sigma(t)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        m = self.mean.to(x)
        tb = batch_view(t, x)
        return m + (self.dsigma(tb) / self.sigma(tb)) * (x - tb * m)

    def log_prob(self, x: Tensor, t: Tensor) -> Tensor:
        """log p_t(x), shape (B,)."""
        m = self.mean.to(x)
        d = math.prod(self.data_shape)
        var = self.sigma(t) ** 2
        sq = (x - batch_view(t, x) * m).flatten(1).pow(2).sum(1)
        return -0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)

    def forward(self, x: Tensor, t: Tensor, s: Tensor) -> FlowMapOutput:
        m = self.mean.to(x)
        d = math.prod(self.data_shape)
        diag = (s - t).abs() < _DIAGONAL_EPS
        step = torch.where(diag, torch.ones_like(t), s - t)
        ratio = self.sigma(s) / self.sigma(t)
        phi = batch_view(s, x) * m + batch_view(ratio, x) * (x - batch_view(t, x) * m)
        u_off = (phi - x) / batch_view(step, x)
        u = torch.where(batch_view(diag, x), self.velocity(x, t), u_off)
        div_off = d * torch.log(ratio) / step
        div_diag = d * self.dsigma(t) / self.sigma(t)
        div = torch.where(diag, div_diag, div_off) / self.kappa
        u = u * (1 + self.velocity_error)
        div = div + self.div_error * (1 + s - t)
        return FlowMapOutput(u, div)


def gaussian_flow_map(
    mean: Tensor,
    std: float,
    sigma_0: float,
    kappa: float = 1.0,
    *,
    velocity_error: float = 0.0,
    div_error: float = 0.0,
) -> FlowMap:
    """An analytic :class:`FlowMap` trained (exactly) in both time orders."""
    net = GaussianFlowMapNet(mean, std, sigma_0, kappa, velocity_error, div_error)
    caps = Capabilities(flow_map=True, divergence_head=True, backward=True)
    return FlowMap(net, caps, kappa=kappa, sigma_0=sigma_0, meta={"method": "analytic-gaussian"})
