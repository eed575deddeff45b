"""Measurements of one model: exact-ODE reference and few-step likelihoods, samples, wall-clock.

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

from bench import dist
from bench.config import EvalConfig
from bench.shards import chunk_seed, map_chunks
from f2d2.divergence import parse_estimator
from f2d2.likelihood import LogProb, Solver, few_step_log_prob, naive_log_prob, reference_log_prob, resolve_backward
from f2d2.model import FlowMap
from f2d2.sampling import sample


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], repeats: int, device: torch.device, warmup: bool = True) -> tuple[Any, float]:
    """(result of the last call, median wall-clock seconds over ``repeats`` calls). Under torchrun
    every rank starts together and the clock stops when the slowest rank is done (barriers), so a
    time is that of the whole sharded computation: comparable between 1 and N devices."""
    if warmup:
        fn()
    times, result = [], None
    for _ in range(repeats):
        synchronize(device)
        dist.barrier()
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        dist.barrier()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def per_sample_noise(num: int, shape: tuple[int, ...], seed: int, device: torch.device, first: int = 0) -> Tensor:
    """N(0, I) noise of shape (num, *shape) for sample indices first ... first + num - 1; sample i
    depends only on (seed, i), so disjoint index ranges give independent draws whatever the batch size."""
    gen = torch.Generator()
    rows = [torch.randn(shape, generator=gen.manual_seed(seed * 1_000_003 + i)) for i in range(first, first + num)]
    return torch.stack(rows).to(device)


def in_chunks_map(fn: Callable[[Tensor, int], tuple[Tensor, ...]], x: Tensor, size: int) -> tuple[Tensor, ...]:
    """``fn(batch, batch_index)`` (a batch -> a tuple of per-row tensors) over the batches of x,
    sharded across ranks and gathered in row order (:func:`bench.shards.map_chunks`)."""
    return map_chunks(fn, x, size)


def in_chunks(fn: Callable[[Tensor, int], LogProb], x: Tensor, size: int) -> LogProb:
    """A per-row likelihood ``fn(batch, batch_index)`` over the batches of x (sharded across ranks,
    gathered in row order); nfe is the mean over batches of their solver calls."""

    def columns(chunk: Tensor, c: int) -> tuple:
        out = fn(chunk, c)
        nfe = torch.full((len(chunk),), float(out.nfe), dtype=torch.float64, device=chunk.device)
        probes = None if out.per_probe is None else out.per_probe.T  # (rows, P): rows first for gathering
        return out.log_p, out.stderr, out.x0, nfe, probes

    log_p, stderr, x0, nfe, probes = map_chunks(columns, x, size)
    per_batch = nfe[::size]  # every row of a batch holds its batch's count
    return LogProb(log_p, stderr, x0, round(per_batch.mean().item()), None if probes is None else probes.T)


@dataclass(frozen=True)
class Likelihood:
    """Per-sample NLL in nats with timing."""

    nll: Tensor  # (N,)
    mc_stderr: Tensor | None  # (N,) Hutchinson standard error per sample, if any
    nfe: int
    wall_s: float
    estimator: str
    x0: Tensor | None = None  # (N, *shape) where the backward integration ended (t = 0)
    mc_noise: Tensor | None = None  # (N,) one draw distributed as the Monte-Carlo error of ``nll`` (P > 1 probes)


REFERENCE_STREAM = "reference"  # the reference's Hutchinson probes (bench/shards.py chunk_seed)
WARMUP_POINTS = 8  # the reference's warm-up solve (imports, first-call allocations) is untimed


def reference(model: FlowMap, x: Tensor, cfg: EvalConfig, device: torch.device, repeats: int = 1) -> Likelihood:
    """Exact-ODE NLL of the model's instantaneous field u(x, t, t) (METHOD.md Sec. 4).

    Timed after a warm-up solve on a few points (the full solve is too slow to repeat by default),
    so that its time compares with the warm medians of the few-step likelihood."""
    solver = Solver.parse(cfg.reference_solver, cfg.rtol, cfg.atol)
    estimator = parse_estimator(cfg.reference_estimator)
    gen = torch.Generator(device=device)

    def solve(chunk: Tensor, c: int) -> LogProb:
        # the batch's probes, whichever rank solves it; a stream apart from the few-step estimate's
        gen.manual_seed(chunk_seed(cfg.seed, c, REFERENCE_STREAM))
        return reference_log_prob(
            model.velocity, chunk, prior_log_prob=model.prior_log_prob, solver=solver, estimator=estimator, generator=gen
        )

    def run(points: Tensor) -> LogProb:
        return in_chunks(solve, points, cfg.batch_size)

    run(x[:WARMUP_POINTS])
    result, wall = timed(lambda: run(x), repeats, device, warmup=False)
    name = f"{cfg.reference_solver}/{cfg.reference_estimator}"
    return Likelihood(-result.log_p, result.stderr, result.nfe, wall, name, result.x0, mc_noise_draw(result.per_probe))


def mc_noise_draw(per_probe: Tensor | None) -> Tensor | None:
    """(P, N) per-probe estimates -> (N,) (e_1 - e_2) / sqrt(2 P): a contrast of two probes with the
    variance of the P-probe mean's error, and (for Gaussian errors) its distribution, independent
    of the mean. It lets a calibration floor be computed without knowing the exact values."""
    if per_probe is None or per_probe.shape[0] < 2:
        return None
    return (per_probe[0] - per_probe[1]) / math.sqrt(2 * per_probe.shape[0])


@dataclass(frozen=True)
class FewStepEstimator:
    """A model's few-step likelihood at one NFE: the F2D2 joint likelihood for models with a
    divergence head, the naive estimate otherwise (``name`` says which)."""

    log_prob: Callable[[Tensor], LogProb]
    name: str
    generator: torch.Generator | None = None  # Hutchinson probes of the naive estimate
    seed: int = 0

    def __call__(self, x: Tensor, batch_size: int) -> LogProb:
        """log p of x in batches of ``batch_size`` (sharded across ranks); batch c draws its probes
        from :func:`bench.shards.chunk_seed` (seed, c) at every call."""

        def run(chunk: Tensor, c: int) -> LogProb:
            if self.generator is not None:
                self.generator.manual_seed(chunk_seed(self.seed, c))
            return self.log_prob(chunk)

        return in_chunks(run, x, batch_size)


def few_step_estimator(
    model: FlowMap, num_steps: int, cfg: EvalConfig, device: torch.device, backward: str | None = None
) -> FewStepEstimator:
    """The estimator of :func:`few_step` (``backward`` overrides ``cfg.backward``)."""
    if model.capabilities.divergence_head:
        mode = resolve_backward(model, backward or cfg.backward)
        return FewStepEstimator(lambda chunk: few_step_log_prob(model, chunk, num_steps, backward=mode), f"f2d2-{mode}")
    estimator = parse_estimator(cfg.naive_estimator)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    fn = lambda chunk: naive_log_prob(model, chunk, num_steps, estimator=estimator, generator=gen)  # noqa: E731
    return FewStepEstimator(fn, f"naive/{cfg.naive_estimator}", gen, cfg.seed)


def few_step(
    model: FlowMap, x: Tensor, num_steps: int, cfg: EvalConfig, device: torch.device, backward: str | None = None,
    timing: bool = True,
) -> Likelihood:
    """Few-step NLL of x. With ``timing``, the median of ``cfg.num_repeats`` calls after a warm-up
    (the same Hutchinson probes in every repeat); without, one call."""
    estimator = few_step_estimator(model, num_steps, cfg, device, backward)
    result, wall = timed(lambda: estimator(x, cfg.batch_size), cfg.num_repeats if timing else 1, device, warmup=timing)
    return Likelihood(-result.log_p, None, result.nfe, wall, estimator.name, result.x0)


@dataclass(frozen=True)
class Sampled:
    x: Tensor
    wall_s: float


def draw_samples(
    model: FlowMap, noise: Tensor, num_steps: int, cfg: EvalConfig, device: torch.device, timing: bool = True
) -> Sampled:
    """K-step samples from fixed unit noise (scaled by the model's sigma_0); with ``timing`` the
    median wall-clock of ``cfg.num_repeats`` runs after a warm-up, else one run."""
    x0 = model.sigma_0 * noise

    def run() -> Tensor:
        return map_chunks(lambda chunk, c: (sample(model, chunk, num_steps, track_log_p=False).x,), x0, cfg.batch_size)[0]

    x, wall = timed(run, cfg.num_repeats if timing else 1, device, warmup=timing)
    return Sampled(x, wall)


def mean_stderr(values: Tensor) -> tuple[float, float]:
    """Mean and its standard error; non-finite values make both non-finite (never averaged away)."""
    values = values.double()
    if not torch.isfinite(values).all():
        return math.nan, math.nan
    return values.mean().item(), (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else math.nan
