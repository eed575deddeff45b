r"""A nonlinear, anisotropic flow map with closed-form Phi, D and log-density (the "sinh flow").

Why it exists. The Gaussian flow map of :mod:`f2d2.analytic` has an isotropic Jacobian and a
divergence that does not depend on x, so a divergence read at the wrong point, a missing transport
term or a Hutchinson probe bias all pass its tests. This flow has an x-dependent divergence and a
non-diagonal, non-symmetric Jacobian, yet every quantity the harness needs is still exact.

Construction (data of shape ``data_shape`` flattened to d dimensions; rows are samples).
Fixed, invertible, non-orthogonal A in R^{d x d}; per dimension i a centre m_i, a length scale
a_i > 0 and a rate c_i != 0; a nonlinear time change beta(t) = t + gamma t^2 (gamma > -1/2, so
beta' = 1 + 2 gamma t > 0 on [0, 1]). With z = A^{-1} x and w_i = asinh((z_i - m_i) / a_i):

    psi_i(z, t, s) = m_i + a_i sinh(w_i + e_i),   e_i = c_i (beta(s) - beta(t)),
    Phi(x, t, s)   = A psi(A^{-1} x, t, s).

1. Flow-map laws. w_i(psi(z, t, r)) = w_i + c_i (beta(r) - beta(t)), so Phi(x, t, t) = x and
   Phi(Phi(x, t, r), r, s) = Phi(x, t, s) for any t, r, s in either order.
2. Velocity. v(x, t) = d_s Phi(x, t, s) at s = t = A [c_i beta'(t) a_i cosh w_i]_i, which depends
   on t through beta' (with gamma != 0) and on x through w.
3. Average velocity without a 0/0. With Delta = beta(s) - beta(t) = (s - t) rho, rho = 1 + gamma
   (t + s), and sinh(w + e) - sinh w = cosh w sinh e + 2 sinh w sinh^2(e / 2):
       u(x, t, s) = (Phi - x) / (s - t) = A [a_i c_i rho (cosh w_i shc(e_i) + sinh w_i sinh(e_i/2) shc(e_i/2))]_i,
   shc(y) = sinh(y) / y (shc(0) = 1). At s = t: rho = beta'(t), e = 0, so u(x, t, t) = v(x, t).
4. Jacobians. d psi_i / d z_i = cosh(w_i + e_i) / cosh w_i, hence
       d Phi / d x = A diag(cosh(w_i + e_i) / cosh w_i) A^{-1},
       J_v(x, t)   = A diag(c_i beta'(t) tanh w_i) A^{-1},   div v(x, t) = beta'(t) sum_i c_i tanh w_i.
   J_v is neither diagonal nor symmetric, so Rademacher probes are not exact: eps^T M eps has
   variance (1/2) sum_{i != j} (M_ij + M_ji)^2 (Gaussian probes: the same sum over all i, j).
5. Divergence head. Liouville: int_t^s div v(x_tau, tau) dtau = log det dPhi/dx
   = sum_i log(cosh(w_i + e_i) / cosh w_i) = sum_i log1p(q_i), with
   q_i = cosh e_i - 1 + tanh w_i sinh e_i = e_i p_i,  p_i = tanh w_i shc(e_i) + sinh(e_i/2) shc(e_i/2).
   Dividing by (s - t) kappa = Delta kappa / rho:
       D(x, t, s) = (rho / kappa) sum_i c_i p_i lg(e_i p_i),   lg(q) = log1p(q) / q (lg(0) = 1).
   At s = t: D = beta'(t) sum_i c_i tanh w_i / kappa = div v / kappa, the F2D2 diagonal.
   Both u and D are smooth through s = t (series branches near 0), so forward-mode JVPs in t, s
   and x (MeanFlow, LSD) are exact everywhere.
6. Density. The flow is *defined* so that the t = 0 marginal is the prior of :class:`FlowMap`,
   p_0 = N(0, sigma_0^2 I) in x. Then, by change of variables (or item 5 with s = 0),
       log p_t(x) = log p_0(Phi(x, t, 0)) + sum_i log(cosh(w_i + e_i) / cosh w_i),  e_i = c_i (beta(0) - beta(t)).
   Exact samples of p_t are Phi(x_0, 0, t) with x_0 ~ p_0.

Deliberate errors (negative controls): u scaled by (1 + velocity_error) and div_error * (1 + s - t)
added to D; with ``offdiag_only`` the errors become u (1 + velocity_error (s - t)) and
D + div_error (s - t), which vanish on the diagonal, so only the off-diagonal flow-map conditions
(semigroup, Eulerian, Lagrangian) can see them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from f2d2.model import Capabilities, FlowMap, FlowMapNet, FlowMapOutput, as_batch_time, batch_view

_SERIES_BELOW = 1e-3  # |argument| below which shc and lg use their Taylor series (error < 2e-16)
_MIXING = 0.8  # off-diagonal row sum of A - I: strictly diagonally dominant, hence invertible
DEFAULT_GAMMA = 0.5  # beta(t) = t + gamma t^2: beta' runs from 1 to 2, so v depends on t


def shc(y: Tensor) -> Tensor:
    """sinh(y) / y with shc(0) = 1; the series branch keeps every derivative finite at 0."""
    small = y.abs() < _SERIES_BELOW
    safe = torch.where(small, torch.ones_like(y), y)
    y2 = y * y
    return torch.where(small, 1 + y2 / 6 + y2 * y2 / 120, torch.sinh(safe) / safe)


def lg(q: Tensor) -> Tensor:
    """log1p(q) / q with lg(0) = 1 (q > -1)."""
    small = q.abs() < _SERIES_BELOW
    safe = torch.where(small, torch.ones_like(q), q)
    series = 1 - q / 2 + q**2 / 3 - q**3 / 4 + q**4 / 5
    return torch.where(small, series, torch.log1p(safe) / safe)


def log_cosh(y: Tensor) -> Tensor:
    """log cosh y without overflow."""
    y = y.abs()
    return y + torch.log1p(torch.exp(-2 * y)) - math.log(2.0)


def default_parameters(dim: int) -> dict[str, Tensor]:
    """Deterministic A (d, d), centres m, scales a, rates c (d,) in float64, distinct per dimension."""
    i = torch.arange(dim, dtype=torch.float64)
    frac = i / max(dim - 1, 1)
    pattern = torch.cos(1 + 2 * i[:, None] + 3 * i[None, :])  # entries in [-1, 1], no symmetry
    off = pattern * (1 - torch.eye(dim, dtype=torch.float64))
    mixing = torch.eye(dim, dtype=torch.float64) + _MIXING / max(dim - 1, 1) * off
    sign = torch.where(i % 2 == 0, 1.0, -1.0).to(torch.float64)
    return {
        "mixing": mixing,
        "centre": 0.4 - 0.7 * frac,
        "scale": 0.6 + 0.9 * frac,
        "rate": sign * (0.5 + 0.4 * frac),
    }


class SinhFlowMapNet(FlowMapNet):
    """Exact (u, D) of the sinh flow (module docstring), optionally with deliberate errors.

    Args:
        data_shape: shape of one sample; the flow acts on its flattening (d entries).
        sigma_0: prior scale, the t = 0 marginal N(0, sigma_0^2 I) (the FlowMap's prior).
        kappa: divergence scale of the head.
        gamma: time change beta(t) = t + gamma t^2.
        velocity_error, div_error, offdiag_only: deliberate errors (module docstring).
        parameters: optional overrides of :func:`default_parameters` ('mixing', 'centre',
            'scale', 'rate').
    """

    def __init__(
        self,
        data_shape: tuple[int, ...] = (3,),
        sigma_0: float = 1.0,
        kappa: float = 1.0,
        gamma: float = DEFAULT_GAMMA,
        *,
        velocity_error: float = 0.0,
        div_error: float = 0.0,
        offdiag_only: bool = False,
        parameters: dict[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.has_div_head = True
        dim = math.prod(self.data_shape)
        params = {**default_parameters(dim), **(parameters or {})}
        if gamma <= -0.5:
            raise ValueError(f"gamma must exceed -1/2 so that beta is increasing on [0, 1], got {gamma}")
        if (params["scale"] <= 0).any() or (params["rate"] == 0).any():
            raise ValueError("scales must be positive and rates non-zero")
        mixing = params["mixing"].to(torch.float64)
        self.register_buffer("mixing", mixing)
        self.register_buffer("mixing_inv", torch.linalg.inv(mixing))
        for name in ("centre", "scale", "rate"):
            self.register_buffer(name, params[name].to(torch.float64))
        self.sigma_0, self.kappa, self.gamma = float(sigma_0), float(kappa), float(gamma)
        self.velocity_error, self.div_error = float(velocity_error), float(div_error)
        self.offdiag_only = bool(offdiag_only)

    # time change -----------------------------------------------------------------------------

    def beta(self, t: Tensor) -> Tensor:
        return t + self.gamma * t * t

    def dbeta(self, t: Tensor) -> Tensor:
        return 1 + 2 * self.gamma * t

    # coordinates -----------------------------------------------------------------------------

    def _w(self, x: Tensor) -> Tensor:
        """w = asinh((A^{-1} x - m) / a), (B, d) from x (B, *data_shape)."""
        z = x.flatten(1) @ self.mixing_inv.to(x).T
        return torch.asinh((z - self.centre.to(x)) / self.scale.to(x))

    def _to_x(self, vec_z: Tensor, like: Tensor) -> Tensor:
        """A applied to a (B, d) vector in z coordinates, reshaped like ``like``."""
        return (vec_z @ self.mixing.to(vec_z).T).reshape(like.shape)

    def _times(self, x: Tensor, t: Tensor | float, s: Tensor | float) -> tuple[Tensor, Tensor]:
        return as_batch_time(t, x), as_batch_time(s, x)

    # closed forms (tests use these as the truth) ------------------------------------------------

    def flow(self, x: Tensor, t: Tensor | float, s: Tensor | float) -> Tensor:
        """Phi(x, t, s) = A (m + a sinh(w + c (beta(s) - beta(t)))), shape of x."""
        t, s = self._times(x, t, s)
        shift = self.rate.to(x) * (self.beta(s) - self.beta(t))[:, None]
        z = self.centre.to(x) + self.scale.to(x) * torch.sinh(self._w(x) + shift)
        return self._to_x(z, x)

    def log_det(self, x: Tensor, t: Tensor | float, s: Tensor | float) -> Tensor:
        """log det dPhi(x, t, s)/dx = int_t^s div v(x_tau, tau) dtau = sum_i log(cosh(w_i + e_i) / cosh w_i), (B,)."""
        t, s = self._times(x, t, s)
        w = self._w(x)
        shift = self.rate.to(x) * (self.beta(s) - self.beta(t))[:, None]
        return (log_cosh(w + shift) - log_cosh(w)).sum(1)

    def velocity(self, x: Tensor, t: Tensor | float) -> Tensor:
        """v(x, t) = A [c_i beta'(t) a_i cosh w_i], shape of x."""
        t = as_batch_time(t, x)
        speed = self.rate.to(x) * self.scale.to(x) * torch.cosh(self._w(x))
        return self._to_x(self.dbeta(t)[:, None] * speed, x)

    def velocity_jacobian(self, x: Tensor, t: Tensor | float) -> Tensor:
        """J_v(x, t) = A diag(c beta'(t) tanh w) A^{-1}, (B, d, d) on the flattened data."""
        t = as_batch_time(t, x)
        diag = self.dbeta(t)[:, None] * self.rate.to(x) * torch.tanh(self._w(x))
        return self.mixing.to(x) @ torch.diag_embed(diag) @ self.mixing_inv.to(x)

    def divergence(self, x: Tensor, t: Tensor | float) -> Tensor:
        """div v(x, t) = beta'(t) sum_i c_i tanh w_i, (B,)."""
        t = as_batch_time(t, x)
        return self.dbeta(t) * (self.rate.to(x) * torch.tanh(self._w(x))).sum(1)

    def log_prob(self, x: Tensor, t: Tensor | float) -> Tensor:
        """log p_t(x) = log N(Phi(x, t, 0); 0, sigma_0^2 I) + log det dPhi(x, t, 0)/dx, (B,)."""
        x0 = self.flow(x, t, 0.0).flatten(1)
        d = x0.shape[1]
        prior = -0.5 * x0.pow(2).sum(1) / self.sigma_0**2 - 0.5 * d * math.log(2 * math.pi * self.sigma_0**2)
        return prior + self.log_det(x, t, 0.0)

    # the network ----------------------------------------------------------------------------

    def forward(self, x: Tensor, t: Tensor, s: Tensor) -> FlowMapOutput:
        w = self._w(x)
        rate = self.rate.to(x)
        rho = (1 + self.gamma * (t + s))[:, None]  # (beta(s) - beta(t)) / (s - t)
        e = rate * (self.beta(s) - self.beta(t))[:, None]
        half = torch.sinh(e / 2) * shc(e / 2)  # 2 sinh^2(e/2) / e
        u_z = self.scale.to(x) * rate * rho * (torch.cosh(w) * shc(e) + torch.sinh(w) * half)
        p = torch.tanh(w) * shc(e) + half
        div = (rho * rate * p * lg(e * p)).sum(1) / self.kappa
        u = self._to_x(u_z, x)
        step = s - t
        if self.offdiag_only:
            u = u * (1 + self.velocity_error * batch_view(step, u))
            div = div + self.div_error * step
        else:
            u = u * (1 + self.velocity_error)
            div = div + self.div_error * (1 + step)
        return FlowMapOutput(u, div)


def sinh_flow_map(
    data_shape: tuple[int, ...] = (3,),
    sigma_0: float = 1.0,
    kappa: float = 1.0,
    *,
    gamma: float = DEFAULT_GAMMA,
    velocity_error: float = 0.0,
    div_error: float = 0.0,
    offdiag_only: bool = False,
    parameters: dict[str, Tensor] | None = None,
) -> FlowMap:
    """An analytic :class:`FlowMap` of the sinh flow, trained (exactly) in both time orders.

    Use float64 inputs where exactness matters; the buffers are cast to the input's dtype.
    """
    net = SinhFlowMapNet(
        data_shape,
        sigma_0,
        kappa,
        gamma,
        velocity_error=velocity_error,
        div_error=div_error,
        offdiag_only=offdiag_only,
        parameters=parameters,
    )
    caps = Capabilities(flow_map=True, divergence_head=True, backward=True)
    return FlowMap(net, caps, kappa=kappa, sigma_0=sigma_0, meta={"method": "analytic-sinh"})
