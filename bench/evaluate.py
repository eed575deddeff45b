"""Evaluate one trained model: reference and few-step likelihoods, samples, and wall-clock.

Numbers are computed per sample and reduced with a standard error; timings are medians of repeats
after a warm-up, synchronised on CUDA. Sampling uses one seed per sample, so the same latents reach
every method whatever the batch size (as in EDM's generate.py).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bench.config import EvalConfig
from f2d2.divergence import parse_estimator
from f2d2.likelihood import LogProb, Solver, few_step_log_prob, naive_log_prob, reference_log_prob, resolve_backward
from f2d2.model import FlowMap
from f2d2.sampling import sample


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], repeats: int, device: torch.device, warmup: bool = True) -> tuple[Any, float]:
    """(result of the last call, median wall-clock seconds over ``repeats`` calls)."""
    if warmup:
        fn()
    times, result = [], None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def per_sample_noise(num: int, shape: tuple[int, ...], seed: int, device: torch.device, first: int = 0) -> Tensor:
    """N(0, I) noise of shape (num, *shape) for sample indices first ... first + num - 1; sample i
    depends only on (seed, i)."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i)) for i in range(first, first + num)]
    return torch.stack(rows).to(device)


def in_chunks(fn: Callable[[Tensor], LogProb], x: Tensor, size: int) -> LogProb:
    """Apply a per-sample likelihood in chunks of ``size`` and concatenate; nfe is the mean per chunk."""
    parts = [fn(chunk) for chunk in x.split(size)]
    stderr = None if parts[0].stderr is None else torch.cat([p.stderr for p in parts])
    return LogProb(
        torch.cat([p.log_p for p in parts]),
        stderr,
        torch.cat([p.x0 for p in parts]),
        round(sum(p.nfe for p in parts) / len(parts)),
    )


@dataclass(frozen=True)
class Likelihood:
    """Per-sample NLL in nats with timing."""

    nll: Tensor  # (N,)
    mc_stderr: Tensor | None  # (N,) Hutchinson standard error per sample, if any
    nfe: int
    wall_s: float
    estimator: str


WARMUP_POINTS = 8  # the reference's warm-up solve (imports, first-call allocations) is untimed


def reference(model: FlowMap, x: Tensor, cfg: EvalConfig, device: torch.device, repeats: int = 1) -> Likelihood:
    """Exact-ODE NLL of the model's instantaneous field u(x, t, t) (METHOD.md Sec. 4).

    Timed after a warm-up solve on a few points (the full solve is too slow to repeat by default),
    so that its time compares with the warm medians of the few-step likelihood."""
    solver = Solver.parse(cfg.reference_solver, cfg.rtol, cfg.atol)
    estimator = parse_estimator(cfg.reference_estimator)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    def run(points: Tensor) -> LogProb:
        gen.manual_seed(cfg.seed)
        fn = lambda chunk: reference_log_prob(  # noqa: E731
            model.velocity, chunk, prior_log_prob=model.prior_log_prob, solver=solver, estimator=estimator, generator=gen
        )
        return in_chunks(fn, points, cfg.batch_size)

    run(x[:WARMUP_POINTS])
    result, wall = timed(lambda: run(x), repeats, device, warmup=False)
    name = f"{cfg.reference_solver}/{cfg.reference_estimator}"
    return Likelihood(-result.log_p, None if result.stderr is None else result.stderr, result.nfe, wall, name)


def few_step(
    model: FlowMap, x: Tensor, num_steps: int, cfg: EvalConfig, device: torch.device, backward: str | None = None
) -> Likelihood:
    """F2D2 few-step NLL for models with a divergence head (``backward`` overrides ``cfg.backward``);
    the naive NLL otherwise."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    if model.capabilities.divergence_head:
        mode = resolve_backward(model, backward or cfg.backward)
        fn = lambda chunk: few_step_log_prob(model, chunk, num_steps, backward=mode)  # noqa: E731
        name = f"f2d2-{mode}"
    else:
        estimator = parse_estimator(cfg.naive_estimator)
        fn = lambda chunk: naive_log_prob(model, chunk, num_steps, estimator=estimator, generator=gen)  # noqa: E731
        name = f"naive/{cfg.naive_estimator}"

    def run() -> LogProb:
        gen.manual_seed(cfg.seed)  # Hutchinson probes: the same whatever the number of repeats
        return in_chunks(fn, x, cfg.batch_size)

    result, wall = timed(run, cfg.num_repeats, device)
    return Likelihood(-result.log_p, None, result.nfe, wall, name)


@dataclass(frozen=True)
class Sampled:
    x: Tensor
    wall_s: float


def draw_samples(model: FlowMap, noise: Tensor, num_steps: int, cfg: EvalConfig, device: torch.device) -> Sampled:
    """K-step samples from fixed unit noise (scaled by the model's sigma_0), with timing."""
    x0 = model.sigma_0 * noise

    def run() -> Tensor:
        return torch.cat([sample(model, chunk, num_steps, track_log_p=False).x for chunk in x0.split(cfg.batch_size)])

    x, wall = timed(run, cfg.num_repeats, device)
    return Sampled(x, wall)


def mean_stderr(values: Tensor) -> tuple[float, float]:
    """Mean and its standard error; non-finite values make both non-finite (never averaged away)."""
    values = values.double()
    if not torch.isfinite(values).all():
        return math.nan, math.nan
    return values.mean().item(), (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else math.nan
