"""Divergence of a batched vector field: exact (Jacobian trace) and Hutchinson estimates.

The field ``fn`` maps x of shape (B, *shape) to an output of the same shape, with samples that do
not interact, so div f(x)_b = sum_i d f_b,i / d x_b,i. Both estimators use reverse-mode
vector-Jacobian products from ``torch.func``, which ignore an enclosing ``torch.no_grad``: callers
can evaluate divergences of targets without recording a graph through the network's parameters.

References:
    M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
    smoothing splines", 1989. W. Grathwohl et al., "FFJORD", ICLR 2019, arXiv:1810.01367.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Field = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Exact:
    """Exact divergence: one VJP per data dimension, ``chunk_size`` of them vectorised at once."""

    chunk_size: int = 64

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


@dataclass(frozen=True)
class Hutchinson:
    """Hutchinson's estimator eps^T J eps averaged over ``num_probes`` probes per sample."""

    num_probes: int = 1
    distribution: Literal["rademacher", "gaussian"] = "rademacher"

    def __post_init__(self) -> None:
        if self.num_probes < 1:
            raise ValueError(f"num_probes must be >= 1, got {self.num_probes}")
        if self.distribution not in ("rademacher", "gaussian"):
            raise ValueError(f"unknown probe distribution {self.distribution!r}")

    def probes(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw probes of shape (num_probes, B, *shape) with identity covariance."""
        shape = (self.num_probes, *x.shape)
        eps = torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)
        return eps.sign() if self.distribution == "rademacher" else eps


Estimator = Exact | Hutchinson


@dataclass(frozen=True)
class Divergence:
    """Result of :func:`divergence`.

    Attributes:
        output: (B, *shape) the field f(x).
        value: (B,) the divergence (exact) or its probe average (Hutchinson).
        per_probe: (P, B) Hutchinson's per-probe estimates, None for the exact trace.
    """

    output: Tensor
    value: Tensor
    per_probe: Tensor | None = None

    @property
    def stderr(self) -> Tensor | None:
        """(B,) standard error of ``value`` over probes; None if exact or a single probe."""
        if self.per_probe is None or self.per_probe.shape[0] < 2:
            return None
        return self.per_probe.std(0) / math.sqrt(self.per_probe.shape[0])


def exact_trace(fn: Field, x: Tensor, chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """(f(x), tr J_f(x)) with J the per-sample Jacobian; cost: one VJP per data dimension."""
    out, vjp_fn = torch.func.vjp(fn, x)
    flat = out.flatten(1)
    num_dims = flat.shape[1]
    if x[0].numel() != num_dims:
        raise ValueError(f"divergence needs f: R^d -> R^d, got {tuple(x.shape)} -> {tuple(out.shape)}")
    batched_vjp = torch.func.vmap(vjp_fn)
    trace = torch.zeros(x.shape[0], dtype=out.dtype, device=out.device)
    for start in range(0, num_dims, chunk_size):
        idx = torch.arange(start, min(start + chunk_size, num_dims), device=x.device)
        basis = torch.zeros(len(idx), *flat.shape, dtype=out.dtype, device=out.device)
        basis[torch.arange(len(idx)), :, idx] = 1.0
        (rows,) = batched_vjp(basis.reshape(len(idx), *out.shape))
        # rows[k, b] = e_idx[k]^T J_b, whose idx[k]-th entry is a diagonal element of J_b
        trace = trace + rows.flatten(2)[torch.arange(len(idx)), :, idx].sum(0)
    return out, trace


def hutchinson_trace(fn: Field, x: Tensor, probes: Tensor) -> tuple[Tensor, Tensor]:
    """(f(x), eps^T J eps for each probe) with probes (P, B, *shape); returns (B, *shape), (P, B).

    One VJP per probe in a loop: with few probes this beat vmap over the VJP for convolutional
    networks on CPU (2.0 s against 3.2 s for 4 probes, a UNet on 297 digits).
    """
    out, vjp_fn = torch.func.vjp(fn, x)
    estimates = [(vjp_fn(eps)[0] * eps).flatten(1).sum(-1) for eps in probes]
    return out, torch.stack(estimates)


def divergence(
    fn: Field,
    x: Tensor,
    estimator: Estimator = Exact(),
    *,
    probes: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Divergence:
    """Divergence of ``fn`` at ``x`` (B, *shape).

    For Hutchinson, fixed ``probes`` (P, B, *shape) may be given (e.g. the same probes along a whole
    ODE solve); otherwise fresh ones are drawn from ``generator``.
    """
    if isinstance(estimator, Exact):
        out, value = exact_trace(fn, x, estimator.chunk_size)
        return Divergence(out, value)
    if probes is None:
        probes = estimator.probes(x, generator)
    out, per_probe = hutchinson_trace(fn, x, probes)
    return Divergence(out, per_probe.mean(0), per_probe)


def parse_estimator(spec: str) -> Estimator:
    """'exact', 'hutchinson' or 'hutchinson:P' (Rademacher), 'gaussian:P' (Gaussian probes)."""
    name, _, count = spec.partition(":")
    if name == "exact" and not count:
        return Exact()
    if name in ("hutchinson", "gaussian") and (not count or count.isdigit()):
        dist = "rademacher" if name == "hutchinson" else "gaussian"
        return Hutchinson(int(count) if count else 1, dist)
    raise ValueError(f"unknown divergence estimator {spec!r}; use 'exact', 'hutchinson:P' or 'gaussian:P'")


def estimator_spec(estimator: Estimator) -> str:
    """Inverse of :func:`parse_estimator`."""
    if isinstance(estimator, Exact):
        return "exact"
    name = "hutchinson" if estimator.distribution == "rademacher" else "gaussian"
    return f"{name}:{estimator.num_probes}"
