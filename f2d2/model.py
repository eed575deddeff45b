"""The flow-map model interface shared by every method, and the protocol a network must follow.

A method's network maps (x, t, s) to the average velocity u(x, t, s) over [t, s] and, for F2D2
variants, to a scalar divergence head D(x, t, s). :class:`FlowMap` wraps such a network with the
metadata needed to turn its outputs into densities: the divergence scale kappa and the prior scale
sigma_0 (arXiv:2512.02636, Sec. 3).

The network protocol (what a user-defined network must satisfy; :func:`check_flow_map_net` checks
it on a probe batch, and the harness runs that check whenever it builds or loads a user network,
``model.arch: "package.module:factory"``, see bench/models.py):

- It is a ``torch.nn.Module`` (subclassing :class:`FlowMapNet` is recommended, not required) with
  ``data_shape: tuple[int, ...]``, the shape of one sample, equal to the dataset's (e.g. (2,) or
  (3, 32, 32)), and ``has_div_head: bool``, True exactly when a divergence head was asked for.
- ``forward(x, t, s)`` takes x of shape (B, *data_shape) and times t, s of shape (B,), in x's dtype
  and on its device, and returns ``FlowMapOutput(u, div)``: u of shape (B, *data_shape) and x's
  dtype, the average velocity over [t, s], so that Phi(x, t, s) = x + (s - t) u and u(x, t, t) is
  the instantaneous velocity v(x, t); div of shape (B,) (never (B, 1)) is D(x, t, s) in units of
  kappa, (s - t) kappa D(x, t, s) = int_t^s div v(x_tau, tau) dtau, or None without a head.
  s may be below t (backward maps) or equal to it.
- Samples never interact: output b depends on x[b], t[b], s[b] only (no BatchNorm or other batch
  statistics, no mixing across the batch), so per-sample Jacobians and divergences are defined.
- It is differentiable in x, t and s under ``torch.func`` (vjp, jvp, vmap): divergences use
  vmap-of-vjp, MeanFlow and LSD a jvp (no in-place writes to inputs, no ``.item()`` branching).
- Optional ``uses_step: bool`` (default True): False declares an instantaneous field v(x, t) that
  ignores s; only methods without a flow map (flow matching) can use such a network.
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
        uses_step: False for an instantaneous field v(x, t) that ignores s (see the module docstring).
    """

    data_shape: tuple[int, ...]
    has_div_head: bool
    uses_step: bool = True

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



class ProtocolError(ValueError):
    """A network does not follow the flow-map network protocol (see the module docstring)."""


PROBE_BATCH = 3  # samples in the probe batch of :func:`check_flow_map_net`
PROBE_RTOL = 1e-4  # a sample alone vs in a batch: float32 kernels differ by ~1e-6 relative with
PROBE_ATOL = 1e-5  # the batch size (different blocking), batch-mixing bugs by O(1)
BATCH_STATISTICS = (nn.modules.batchnorm._BatchNorm,)  # normalise over the batch in training


def check_flow_map_net(net: object, data_shape: tuple[int, ...], div_head: bool) -> None:
    """Check ``net`` against the protocol on a seeded probe batch; raise :class:`ProtocolError`
    naming the first violation. The probe runs in eval mode without gradients and leaves the
    network's mode and the global random state as they were."""
    data_shape = tuple(int(n) for n in data_shape)
    if not isinstance(net, nn.Module):
        raise ProtocolError(f"the factory returned {type(net).__name__}, not a torch.nn.Module")
    if not hasattr(net, "data_shape") or not hasattr(net, "has_div_head"):
        raise ProtocolError("the network needs attributes data_shape (one sample's shape) and has_div_head (bool)")
    if tuple(net.data_shape) != data_shape:
        raise ProtocolError(f"network data_shape {tuple(net.data_shape)} does not match the data's {data_shape}")
    if not isinstance(net.has_div_head, bool):
        raise ProtocolError(f"has_div_head must be a bool, got {net.has_div_head!r}")
    if net.has_div_head is not div_head:
        reason = "the method needs one" if div_head else "the method trains none (its parameters would never learn)"
        raise ProtocolError(f"has_div_head is {net.has_div_head!r} but div_head={div_head} was asked: {reason}")
    for module in net.modules():
        if isinstance(module, BATCH_STATISTICS):
            raise ProtocolError(f"{type(module).__name__} normalises over the batch: samples must not interact (use GroupNorm)")
    _probe(net, data_shape, div_head)


def _probe(net: nn.Module, data_shape: tuple[int, ...], div_head: bool) -> None:
    """One batched call against one call per sample, with shape, dtype and finiteness checks."""
    param = next(iter(net.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.get_default_dtype()
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((PROBE_BATCH, *data_shape), generator=gen, dtype=dtype).to(device)
    t, s = torch.rand(2, PROBE_BATCH, generator=gen, dtype=dtype).to(device)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = _call(net, x, t, s, div_head)
            for b in range(PROBE_BATCH):
                alone = _call(net, x[b : b + 1], t[b : b + 1], s[b : b + 1], div_head)
                pairs = [(alone.u[0], out.u[b])] + ([(alone.div[0], out.div[b])] if div_head else [])
                scale = float(out.u.abs().max().clamp_min(1.0))
                if not all(torch.allclose(a, c, rtol=PROBE_RTOL, atol=PROBE_ATOL * scale) for a, c in pairs):
                    raise ProtocolError(
                        f"samples interact: sample {b} alone gives another output than in a batch of {PROBE_BATCH}"
                    )
    finally:
        net.train(was_training)


def _call(net: nn.Module, x: Tensor, t: Tensor, s: Tensor, div_head: bool) -> FlowMapOutput:
    batch = x.shape[0]
    try:
        out = net(x, t, s)
    except Exception as err:  # noqa: BLE001 - any failure of user code is reported as the violation
        raise ProtocolError(f"forward(x, t, s) with x {tuple(x.shape)}, t and s ({batch},) raised {type(err).__name__}: {err}") from None
    if not isinstance(out, FlowMapOutput):
        raise ProtocolError(f"forward must return f2d2.model.FlowMapOutput(u, div), got {type(out).__name__}")
    if not isinstance(out.u, Tensor) or out.u.shape != x.shape or out.u.dtype != x.dtype:
        got = f"{tuple(out.u.shape)} {out.u.dtype}" if isinstance(out.u, Tensor) else type(out.u).__name__
        raise ProtocolError(f"u must have x's shape {tuple(x.shape)} and dtype {x.dtype}, got {got}")
    if div_head:
        if not isinstance(out.div, Tensor) or out.div.shape != (batch,):
            got = tuple(out.div.shape) if isinstance(out.div, Tensor) else out.div
            raise ProtocolError(f"div must have shape (B,) = ({batch},), got {got}")
    elif out.div is not None:
        raise ProtocolError("div must be None for a network without a divergence head (has_div_head False)")
    if not torch.isfinite(out.u).all() or (div_head and not torch.isfinite(out.div).all()):
        raise ProtocolError("forward returned non-finite values on a standard-normal probe batch")
    return out
