"""The flow-map model interface shared by every method.

A method's network maps (x, t, s) to the average velocity u(x, t, s) over [t, s] and, for F2D2
variants, to a scalar divergence head D(x, t, s). :class:`FlowMap` wraps such a network with the
metadata needed to turn its outputs into densities: the divergence scale kappa and the prior scale
sigma_0 (arXiv:2512.02636, Sec. 3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class FlowMapOutput:
    """One network call.

    Attributes:
        u: (B, *data_shape) average velocity over [t, s]; u(x, t, t) = v(x, t).
        div: (B,) divergence head D(x, t, s) in units of kappa, or None for models without it.
    """

    u: Tensor
    div: Tensor | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a trained model can do; a missing capability is shown as a dash, never faked.

    Attributes:
        flow_map: u(x, t, s) is trained off the diagonal. Without it the model is an
            instantaneous field and Phi(x, t, s) is one Euler step x + (s - t) v(x, t).
        divergence_head: the network predicts D(x, t, s), so one call updates log p.
        backward: the flow map is trained for s < t too, so likelihood steps need no
            first-order backward approximation.
    """

    flow_map: bool
    divergence_head: bool
    backward: bool = False


class FlowMapNet(nn.Module):
    """A network (x, t, s) -> :class:`FlowMapOutput`.

    Samples of a batch must not interact (no batch statistics), so that the Jacobian of the
    output with respect to the input is block diagonal and per-sample divergences are well defined.

    Attributes:
        data_shape: shape of one sample, e.g. (2,) or (1, 8, 8).
        has_div_head: whether ``forward`` returns a divergence head.
    """

    data_shape: tuple[int, ...]
    has_div_head: bool

    def forward(self, x: Tensor, t: Tensor, s: Tensor) -> FlowMapOutput:  # pragma: no cover
        raise NotImplementedError


def as_batch_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a scalar or (B,) time to a (B,) tensor on x's device and dtype."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def batch_view(t: Tensor, x: Tensor) -> Tensor:
    """Reshape (B,) to (B, 1, ..., 1) so that it broadcasts against x of shape (B, *data_shape)."""
    return t.reshape(t.shape + (1,) * (x.ndim - 1))


class FlowMap(nn.Module):
    """A trained (or analytic) flow map with its density metadata.

    Args:
        net: the network.
        capabilities: what the method trained; ``flow_map=False`` makes every call use s = t.
        kappa: divergence scale; (s - t) kappa D(x, t, s) = int_t^s div v(x_tau, tau) dtau.
        sigma_0: prior scale, p_0 = N(0, sigma_0^2 I).
        meta: free-form metadata (method, dataset, config) carried along, not used in math.
    """

    def __init__(
        self,
        net: FlowMapNet,
        capabilities: Capabilities,
        *,
        kappa: float = 1.0,
        sigma_0: float = 1.0,
        meta: Mapping | None = None,
    ) -> None:
        super().__init__()
        if capabilities.divergence_head and not net.has_div_head:
            raise ValueError("capabilities declare a divergence head that the network lacks")
        if kappa <= 0 or sigma_0 <= 0:
            raise ValueError(f"kappa and sigma_0 must be positive, got {kappa}, {sigma_0}")
        self.net = net
        self.capabilities = capabilities
        self.kappa = float(kappa)
        self.sigma_0 = float(sigma_0)
        self.meta: dict = dict(meta or {})

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.net.data_shape)

    @property
    def num_dims(self) -> int:
        return math.prod(self.data_shape)

    def forward(self, x: Tensor, t: Tensor | float, s: Tensor | float) -> FlowMapOutput:
        """(u, D) at (x, t, s); x: (B, *data_shape), t and s: scalars or (B,)."""
        t = as_batch_time(t, x)
        s = as_batch_time(s, x)
        if not self.capabilities.flow_map:
            s = t
        out = self.net(x, t, s)
        if not self.capabilities.divergence_head and out.div is not None:
            return FlowMapOutput(out.u)
        if out.div is not None and out.div.shape != (x.shape[0],):
            # a (B, 1) head would silently broadcast to (B, B) in every likelihood update
            raise ValueError(f"divergence head must have shape (B,) = ({x.shape[0]},), got {tuple(out.div.shape)}")
        return out

    def velocity(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Instantaneous velocity v(x, t) = u(x, t, t), shape (B, *data_shape)."""
        return self(x, t, t).u

    def phi(self, x: Tensor, t: Tensor | float, s: Tensor | float) -> Tensor:
        """Phi(x, t, s) = x + (s - t) u(x, t, s)."""
        t = as_batch_time(t, x)
        s = as_batch_time(s, x)
        return x + batch_view(s - t, x) * self(x, t, s).u

    def prior_log_prob(self, x0: Tensor) -> Tensor:
        """log N(x0; 0, sigma_0^2 I), shape (B,)."""
        d = self.num_dims
        sq = x0.flatten(1).pow(2).sum(1)
        return -0.5 * sq / self.sigma_0**2 - 0.5 * d * math.log(2 * math.pi * self.sigma_0**2)

    def sample_prior(self, num: int, generator: torch.Generator | None = None, **kwargs) -> Tensor:
        """x_0 ~ N(0, sigma_0^2 I), shape (num, *data_shape)."""
        x = torch.randn((num, *self.data_shape), generator=generator, **kwargs)
        return self.sigma_0 * x

