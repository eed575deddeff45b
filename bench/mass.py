"""Total mass of a few-step density: is it a normalised density at all? (METHOD.md Sec. 4)

A few-step likelihood p_hat(x) = exp(log p_0(x_0) - A(x)) composes K learned jumps; nothing forces
it to integrate to one (a backward map that under-expands raises log p_0 of its endpoint). Its total
mass is measured two ways:

- 2D data: quadrature on a G x G grid of cell centres over [-E, E]^2,
  mass ~ sum_cells p_hat(c) (2E / G)^2. Mass outside the square is not counted (the checkerboard
  and 8gaussians live well inside [-4.5, 4.5]^2), so the value is a lower bound up to
  discretisation error.
- Images: importance sampling with the model's own exact density q (its instantaneous field
  through the exact ODE) as proposal. With x_i ~ q (forward exact ODE from prior noise) and
  w_i = p_hat(x_i) / q(x_i),
      mass = E_q[w] ~ (1/N) sum_i w_i,   standard error = std(w) / sqrt(N),
  unbiased when q > 0 wherever p_hat > 0 (both are positive everywhere here). Its variance can be
  huge: log w is a sum over thousands of pixels, so a per-image log-ratio spread of a few nats
  puts most of the weight on a few samples. The effective sample size (sum w)^2 / sum w^2 is
  reported beside it; a value far below N means the estimate and its standard error are
  unreliable (the standard error is then itself an underestimate). The proposal's log q comes from
  the exact trace by default (``eval.mass_estimator``), not from the reference's estimator: with
  Hutchinson probes log q carries Monte-Carlo noise e_i, and E[exp(-e)] = exp(sigma^2 / 2) for
  Gaussian noise, so the weights and the mass are biased upwards (measured on digits with 2
  probes: a mass of about 1e4 where the truth is 1). A Hutchinson proposal is allowed for data too
  large for the exact trace, and its rows say BIASED.
Weights are combined in log space (log-sum-exp) so that large log-ratios do not overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

GRID_EXTENT = 4.5  # half-width of the 2D grid: covers checkerboard ([-4, 4]^2) and 8gaussians
GRID_SIZE = 200  # cells per side
GRID_CHUNK = 8192  # grid points per likelihood call


@dataclass(frozen=True)
class MassEstimate:
    """Total mass of a density with its standard error (NaN for quadrature) and how it was made."""

    value: float
    stderr: float
    estimator: str


def grid_points(extent: float = GRID_EXTENT, size: int = GRID_SIZE) -> Tensor:
    """(size^2, 2) float64 cell centres of a size x size grid over [-extent, extent]^2, row-major
    with y on rows (reshape(size, size) gives an image with origin='lower')."""
    edges = torch.linspace(-extent, extent, size + 1, dtype=torch.float64)
    centres = (edges[1:] + edges[:-1]) / 2
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


def grid_mass(log_p: Tensor, extent: float = GRID_EXTENT) -> MassEstimate:
    """Quadrature of exp(log_p) over the grid cells whose centres :func:`grid_points` gives, with
    ``log_p`` (G^2,) the log-density at those centres."""
    size = math.isqrt(len(log_p))
    mass = float(log_p.detach().double().cpu().exp().sum() * (2 * extent / size) ** 2)
    return MassEstimate(mass, math.nan, f"grid quadrature, {size}^2 cells on [-{extent:g}, {extent:g}]^2")


def importance_mass(log_p_hat: Tensor, log_q: Tensor) -> MassEstimate:
    """mean(w) and std(w) / sqrt(N) for w = exp(log_p_hat - log_q), both (N,) at samples x ~ q."""
    if log_p_hat.shape != log_q.shape or log_p_hat.ndim != 1 or len(log_p_hat) < 2:
        raise ValueError(f"need two (N,) log-densities with N >= 2, got {tuple(log_p_hat.shape)}, {tuple(log_q.shape)}")
    log_w = (log_p_hat.double() - log_q.double()).cpu()
    if not torch.isfinite(log_w).all():
        return MassEstimate(math.nan, math.nan, "importance sampling: non-finite weights")
    n = len(log_w)
    top = log_w.max()
    w = (log_w - top).exp()  # weights / max weight, in (0, 1]
    scale = math.exp(top.item()) if top.item() < 700 else math.inf
    mass = scale * w.mean().item()
    stderr = scale * w.std().item() / math.sqrt(n)
    ess = (w.sum() ** 2 / (w**2).sum()).item()
    return MassEstimate(mass, stderr, f"importance sampling from the exact ODE density, N={n}, ESS={ess:.1f}")


MASS_NOISE_START = 1 << 30  # per-sample seed indices of the proposal's noise, disjoint from the samples'


def mass_rows(rows, model, nfe: tuple[int, ...]) -> None:
    """One 'mass' row per NFE in ``rows`` (a :class:`bench.cells.RowSink`): the total mass of the
    model's few-step density (or naive density, for models without a head), by grid quadrature
    for 2D data and importance sampling from the exact ODE for images."""
    from bench.measure import few_step_estimator

    ctx = rows.ctx
    cfg, device = ctx.cfg, ctx.device
    dtype = ctx.x_test.dtype
    if tuple(ctx.dataset.data_shape) == (2,):
        points = grid_points().to(device, dtype)
        for k in nfe:
            estimator = few_step_estimator(model, k, cfg, device)
            mass = grid_mass(estimator(points, GRID_CHUNK).log_p)  # batches sharded across ranks
            rows.add(k, "mass", mass.value, mass.stderr, estimator=f"{estimator.name}; {mass.estimator}", points=len(points))
        return
    proposal = exact_proposal(model, cfg, device, ctx.dataset.data_shape, dtype)
    for k in nfe:
        estimator = few_step_estimator(model, k, cfg, device)
        log_p_hat = estimator(proposal.x, cfg.batch_size).log_p
        mass = importance_mass(log_p_hat, proposal.log_p)
        rows.add(k, "mass", mass.value, mass.stderr, estimator=f"{estimator.name}; {mass.estimator}, q: {proposal.name}",
                 points=len(proposal.x))


@dataclass(frozen=True)
class Proposal:
    """Exact-ODE samples x (N, *shape) of a model with their log-density log_p (N,) in nats."""

    x: Tensor
    log_p: Tensor
    name: str


def exact_proposal(model, cfg, device: torch.device, data_shape: tuple[int, ...], dtype: torch.dtype) -> Proposal:
    """``cfg.num_mass`` samples of the model's instantaneous field through the exact ODE (the
    reference's solver and divergence estimator) from per-sample seeded prior noise."""
    from bench.measure import in_chunks_map, per_sample_noise
    from bench.shards import chunk_seed
    from f2d2.divergence import parse_estimator
    from f2d2.likelihood import Solver, exact_sample

    solver = Solver.parse(cfg.reference_solver, cfg.rtol, cfg.atol)
    div = parse_estimator(cfg.mass_estimator)
    gen = torch.Generator(device=device)
    x0 = model.sigma_0 * per_sample_noise(cfg.num_mass, data_shape, cfg.seed, device, first=MASS_NOISE_START).to(dtype)

    def solve(chunk: Tensor, c: int) -> tuple[Tensor, Tensor]:
        gen.manual_seed(chunk_seed(cfg.seed, c))
        out = exact_sample(model.velocity, chunk, prior_log_prob=model.prior_log_prob, solver=solver, estimator=div, generator=gen)
        return out.x, out.log_p

    x, log_p = in_chunks_map(solve, x0, cfg.batch_size)
    name = f"{cfg.reference_solver}/{cfg.mass_estimator}"
    if cfg.mass_estimator != "exact":
        name += " (BIASED upwards: the Monte-Carlo noise of log q inflates the weights; use mass_estimator exact)"
    return Proposal(x, log_p, name)
