"""Log-likelihood of data under a flow model: few-step F2D2, naive baseline, and exact ODE.

All three return log p_1(x_1) = log p_0(x_0) - int_0^1 div v(x_t, t) dt in nats, per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from f2d2.divergence import Estimator, Exact, Hutchinson, divergence
from f2d2.model import FlowMap, as_batch_time, batch_view
from f2d2.sampling import time_grid

Backward = Literal["auto", "trained", "first_order"]


@dataclass(frozen=True)
class LogProb:
    """Per-sample log-likelihood.

    Attributes:
        log_p: (B,) log p_1(x_1) in nats.
        stderr: (B,) Monte-Carlo standard error (Hutchinson over fixed probes), None if exact.
        x0: (B, *data_shape) the point reached at t = 0.
        nfe: network evaluations (function calls of the field, or of the flow map) used.
        per_probe: (P, B) the estimate of each Hutchinson probe (P > 1), whose mean is ``log_p``.
    """

    log_p: Tensor
    stderr: Tensor | None
    x0: Tensor
    nfe: int
    per_probe: Tensor | None = None


def resolve_backward(model: FlowMap, backward: Backward) -> Literal["trained", "first_order"]:
    """'auto' picks trained backward maps when the method trained them, else first order."""
    if backward == "auto":
        return "trained" if model.capabilities.backward else "first_order"
    if backward not in ("trained", "first_order"):
        raise ValueError(f"unknown backward mode {backward!r}")
    if backward == "trained" and not model.capabilities.backward:
        raise ValueError("backward='trained' needs a model trained on s < t rows (bidirectional)")
    return backward


@torch.no_grad()
def few_step_log_prob(
    model: FlowMap, x1: Tensor, num_steps: int, *, backward: Backward = "auto"
) -> LogProb:
    """F2D2 likelihood with ``num_steps`` network calls (arXiv:2512.02636, Alg. 2; METHOD.md Sec. 4).

    Grid 1 = tau_0 > ... > tau_K = 0. Per step, x <- Phi(x, tau_k, tau_{k+1}) and
    A <- A + (tau_k - tau_{k+1}) kappa D, with D evaluated at the point before the step; then
    log p_1(x_1) = log p_0(x_0) - A.

    ``backward='first_order'`` serves models trained only forward: Phi(x, t, t - h) is approximated
    by x - h u(x, t - h, t) and D by D(x, t - h, t) (the forward interval evaluated at the wrong
    endpoint, error O(h)). ``'trained'`` calls the backward map u(x, t, t - h), D(x, t, t - h).
    """
    if not model.capabilities.divergence_head:
        raise ValueError("few-step likelihood needs a divergence head; use naive_log_prob")
    mode = resolve_backward(model, backward)
    grid = time_grid(num_steps, like=x1, reverse=True)
    x = x1
    integral = torch.zeros(x1.shape[0], dtype=x1.dtype, device=x1.device)
    for t, s in zip(grid[:-1], grid[1:]):
        h = t - s
        out = model(x, t, s) if mode == "trained" else model(x, s, t)
        integral = integral + h * model.kappa * out.div
        x = x - batch_view(h.expand(x.shape[0]), x) * out.u
    return LogProb(model.prior_log_prob(x) - integral, None, x, num_steps)


def naive_log_prob(
    model: FlowMap,
    x1: Tensor,
    num_steps: int,
    *,
    estimator: Estimator = Exact(),
    generator: torch.Generator | None = None,
) -> LogProb:
    """The paper's naive few-step likelihood of a baseline (METHOD.md Sec. 4).

    ``num_steps`` backward Euler steps of the joint ODE with the instantaneous velocity
    u(x, t, t) and its divergence, both evaluated at the upper end of each step. Often invalid
    (far above the true log-density) for few steps, which is the point of comparing it.
    """
    grid = time_grid(num_steps, like=x1, reverse=True)
    x = x1
    integral = torch.zeros(x1.shape[0], dtype=x1.dtype, device=x1.device)
    for t, s in zip(grid[:-1], grid[1:]):
        field = _time_slice(model.velocity, t)
        with torch.no_grad():
            div = divergence(field, x, estimator, generator=generator)
        h = t - s
        integral = integral + h * div.value
        x = x - h * div.output
    return LogProb(model.prior_log_prob(x) - integral, None, x, num_steps)


def _time_slice(velocity: Callable[[Tensor, Tensor], Tensor], t: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda x: velocity(x, as_batch_time(t, x))


@dataclass(frozen=True)
class Solver:
    """Reference ODE solver: 'dopri5' (adaptive) or 'euler:N' (N fixed steps)."""

    name: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5

    @classmethod
    def parse(cls, spec: str, rtol: float = 1e-5, atol: float = 1e-5) -> Solver:
        solver = cls(spec, rtol, atol)
        solver.num_steps  # validates
        return solver

    @property
    def num_steps(self) -> int | None:
        if self.name == "dopri5":
            return None
        method, _, steps = self.name.partition(":")
        if method != "euler" or not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"unknown solver {self.name!r}; use 'dopri5' or 'euler:N' with N >= 1")
        return int(steps)


def reference_log_prob(
    velocity: Callable[[Tensor, Tensor], Tensor],
    x1: Tensor,
    *,
    prior_log_prob: Callable[[Tensor], Tensor],
    solver: Solver = Solver(),
    estimator: Estimator = Exact(),
    generator: torch.Generator | None = None,
) -> LogProb:
    """Exact-ODE likelihood: integrate dx/dt = v, dl/dt = div v from t = 1 to t = 0 (torchdiffeq).

    ``velocity(x, t)`` takes x (B, *shape) and t (B,). With ``dopri5`` and Hutchinson, the probes are
    drawn once and kept fixed along the solve (the adaptive solver needs a deterministic field);
    each probe's integral is a separate estimate, and their spread gives the standard error.
    With ``euler:N`` (the paper's protocol) a fresh set of probes is drawn at every step.
    """
    x0, integral, num_calls = _joint_ode(velocity, x1, 1.0, 0.0, solver, estimator, generator)
    # integral = int_1^0 div v dt = -int_0^1 div v dt, one row per probe
    return _per_probe_mean(prior_log_prob(x0)[None] + integral, x0, num_calls)


@dataclass(frozen=True)
class ExactSamples:
    """Result of :func:`exact_sample`.

    Attributes:
        x: (B, *data_shape) samples x_1 of the exact ODE.
        log_p: (B,) their log-density log p_1(x_1) under the model's flow, in nats.
        stderr: (B,) Monte-Carlo standard error of ``log_p`` (Hutchinson with P > 1 probes), else None.
        nfe: calls of the velocity field.
    """

    x: Tensor
    log_p: Tensor
    stderr: Tensor | None
    nfe: int


def exact_sample(
    velocity: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    *,
    prior_log_prob: Callable[[Tensor], Tensor],
    solver: Solver = Solver(),
    estimator: Estimator = Exact(),
    generator: torch.Generator | None = None,
) -> ExactSamples:
    """Samples of the exact ODE with their exact log-density: the joint ODE of
    :func:`reference_log_prob` integrated forward from noise x0 (B, *shape) at t = 0 to t = 1,
    log p_1(x_1) = log p_0(x_0) - int_0^1 div v(x_t, t) dt (METHOD.md Sec. 4; the proposal of the
    importance-sampled total mass of a few-step density)."""
    x1, integral, num_calls = _joint_ode(velocity, x0, 0.0, 1.0, solver, estimator, generator)
    result = _per_probe_mean(prior_log_prob(x0)[None] - integral, x1, num_calls)
    return ExactSamples(x1, result.log_p, result.stderr, num_calls)


def _per_probe_mean(log_p: Tensor, end: Tensor, num_calls: int) -> LogProb:
    """(P, B) per-probe log-densities -> their mean and (P > 1) standard error per sample."""
    num_probes = log_p.shape[0]
    if num_probes == 1:
        return LogProb(log_p[0], None, end, num_calls)
    return LogProb(log_p.mean(0), log_p.std(0) / num_probes**0.5, end, num_calls, log_p)


def _joint_ode(
    velocity: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    t_from: float,
    t_to: float,
    solver: Solver,
    estimator: Estimator,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, int]:
    """Integrate dx/dt = v(x, t), dl/dt = div v(x, t) from ``t_from`` to ``t_to``; returns the end
    point (B, *shape), l = int_{t_from}^{t_to} div v dt per probe (P, B) and the field calls used."""
    from torchdiffeq import odeint  # heavy import kept local

    num_probes = estimator.num_probes if isinstance(estimator, Hutchinson) else 1
    fixed = None
    if isinstance(estimator, Hutchinson) and solver.num_steps is None:
        fixed = estimator.probes(x, generator)
    num_calls = 0

    def rhs(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal num_calls
        num_calls += 1
        y, _ = state
        div = divergence(_time_slice(velocity, t), y, estimator, probes=fixed, generator=generator)
        rate = div.per_probe if div.per_probe is not None else div.value[None]
        return div.output.detach(), rate.detach()

    zeros = torch.zeros(num_probes, x.shape[0], dtype=x.dtype, device=x.device)
    times = torch.tensor([t_from, t_to], dtype=x.dtype, device=x.device)
    if solver.num_steps is None:
        kwargs = dict(method="dopri5", rtol=solver.rtol, atol=solver.atol)
    else:
        kwargs = dict(method="euler", options=dict(step_size=1.0 / solver.num_steps))
    with torch.no_grad():
        xs, ls = odeint(rhs, (x, zeros), times, **kwargs)
    return xs[-1], ls[-1], num_calls
