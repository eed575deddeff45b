"""Evaluation cells: all metrics of one trained method at every NFE, as tidy rows.

A cell is cached as JSON under ``<out>/<dataset>/cells/`` keyed by the checkpoint hashes, the
evaluation config and the NFE list, so an interrupted sweep recomputes only unfinished cells.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from bench.config import EvalConfig
from bench.datasets import Dataset
from bench.evaluate import Likelihood, draw_samples, few_step, mean_stderr, per_sample_noise, reference
from f2d2.sampling import sample
from bench.metrics import CALIBRATION_TOL, calibration_stats, energy_distance_estimate, share_estimate
from f2d2.model import FlowMap
from f2d2.units import bits_per_dim

INVALID_SIGMAS = 3.0  # an NLL this many standard errors below the true entropy is invalid


@dataclass(frozen=True)
class Row:
    """One tidy result row (the public CSV interface; columns documented in README.md)."""

    dataset: str
    method: str
    nfe: int
    metric: str
    value: float
    stderr: float = math.nan
    flag: str = ""
    estimator: str = ""
    num_points: int = 0
    device: str = ""


class Units:
    """Nats for continuous data; bits/dim for discrete data with L levels (METHOD.md Sec. 4)."""

    def __init__(self, dataset: Dataset) -> None:
        self.levels, self.num_dims = dataset.levels, dataset.num_dims
        self.name = "bpd" if dataset.levels else "nats"

    def convert(self, nll_nats: Tensor) -> Tensor:
        if self.levels is None:
            return nll_nats
        return bits_per_dim(nll_nats, self.num_dims, self.levels)

    def scale(self) -> float:
        """Multiplier from nats to this unit for differences (no offset)."""
        return 1.0 if self.levels is None else 1.0 / (self.num_dims * math.log(2.0))

    def convert_value(self, nll_nats: float) -> float:
        return float(self.convert(torch.tensor(nll_nats, dtype=torch.float64)))


@dataclass
class CellContext:
    """What every cell of a sweep shares: data, noise, the teacher's reference and the units."""

    dataset: Dataset
    x_test: Tensor
    noise: Tensor
    teacher_ref: Likelihood
    cfg: EvalConfig
    device: torch.device
    device_label: str
    quality: Any = None  # bench.fid.SampleQuality for images; None: energy distance (2D data)
    teacher_name: str = "flow-matching"


def nll_flag(mean: float, stderr: float, dataset: Dataset, units: Units) -> str:
    """'invalid' below the true entropy (by > 3 standard errors) or a negative bpd; 'nonfinite' for NaN."""
    if not math.isfinite(mean):
        return "nonfinite"
    entropy = dataset.entropy()
    if entropy is not None:  # compared in the unit of the NLL
        floor, floor_se = units.convert_value(entropy.nats), entropy.stderr * units.scale()
        se = math.sqrt((stderr if math.isfinite(stderr) else 0.0) ** 2 + floor_se**2)
        return "invalid" if mean < floor - INVALID_SIGMAS * se else ""
    return "invalid" if units.name == "bpd" and mean < 0 else ""


def evaluate_cell(
    name: str, model: FlowMap, ctx: CellContext, nfe: tuple[int, ...], own_ref: Likelihood | None = None
) -> tuple[list[Row], dict[str, Tensor]]:
    """All rows for one method (references, few-step NLL, calibration, samples and timings at
    each NFE) and the per-point NLLs in nats ('ref' and one entry per NFE) for calibration plots."""
    units, ds, cfg = Units(ctx.dataset), ctx.dataset, ctx.cfg
    n = len(ctx.x_test)
    own = own_ref if own_ref is not None else reference(model, ctx.x_test, cfg, ctx.device)
    rows: list[Row] = []
    per_sample: dict[int, Tensor] = {}

    def add(k: int, metric: str, value: float, stderr: float = math.nan, flag: str = "", estimator: str = "", points: int = n) -> None:
        rows.append(Row(ds.name, name, k, metric, value, stderr, flag, estimator, points, ctx.device_label))

    def add_nll(k: int, metric: str, lik: Likelihood) -> None:
        mean, se = mean_stderr(units.convert(lik.nll))
        add(k, metric, mean, se, nll_flag(mean, se, ds, units), lik.estimator)

    entropy = ds.entropy()
    for k in nfe:
        fast = few_step(model, ctx.x_test, k, cfg, ctx.device)
        add_nll(k, f"nll_{units.name}", fast)
        if fast.estimator == "f2d2-trained":  # the same model through the first-order approximation
            add_nll(k, f"nll_first_order_{units.name}", few_step(model, ctx.x_test, k, cfg, ctx.device, "first_order"))
        add_nll(k, f"nll_ref_{units.name}", own)
        add_nll(k, f"nll_teacher_{units.name}", ctx.teacher_ref)
        gap, gap_se = mean_stderr(fast.nll - own.nll)
        add(k, f"nll_gap_{units.name}", gap * units.scale(), gap_se * units.scale(), estimator=fast.estimator)
        calib = calibration_stats(units.convert(fast.nll).cpu().numpy(), units.convert(own.nll).cpu().numpy(), units.name)
        add(k, f"calib_mae_{units.name}", calib["mae"], estimator=fast.estimator)
        add(k, "calib_spearman", calib["spearman"], estimator=fast.estimator)
        add(k, "calib_within", calib["within"], estimator=f"{fast.estimator}, |gap| <= {CALIBRATION_TOL[units.name]:g} {units.name}")
        per_sample[k] = fast.nll
        if entropy is not None:
            add(k, f"entropy_{units.name}", units.convert_value(entropy.nats), entropy.stderr * units.scale(),
                estimator="exact" if entropy.stderr == 0 else "monte-carlo")
        if own.mc_stderr is not None:  # the reference's own Monte-Carlo noise, part of the calibration error
            add(k, f"ref_mc_stderr_{units.name}", own.mc_stderr.mean().item() * units.scale(), estimator=own.estimator)
        add(k, "ref_nfe", own.nfe, estimator=own.estimator)
        add(k, "nll_wall_s", fast.wall_s, estimator=fast.estimator)
        add(k, "ref_wall_s", own.wall_s, estimator=own.estimator)
        add(k, "nll_speedup", own.wall_s / fast.wall_s, estimator=fast.estimator)
        samples = draw_samples(model, ctx.noise, k, cfg, ctx.device)
        add(k, "sample_wall_s", samples.wall_s, points=len(ctx.noise))
        rows += sample_quality_rows(name, k, samples.x, ctx, _sampler(model, k, cfg))
        if cfg.guidance_etas and model.capabilities.divergence_head:
            add(k, "network_calls_forward", k, points=len(ctx.noise))
            add(k, "network_calls_backward", 0, points=len(ctx.noise))
            rows += guided_rows(name, model, k, ctx)
    if name == ctx.teacher_name and cfg.teacher_steps:
        many = draw_samples(model, ctx.noise, cfg.teacher_steps, cfg, ctx.device)
        add(cfg.teacher_steps, "sample_wall_s", many.wall_s, points=len(ctx.noise))
        rows += sample_quality_rows(name, cfg.teacher_steps, many.x, ctx, _sampler(model, cfg.teacher_steps, cfg))
    arrays = {"ref": own.nll.detach().cpu()} | {f"nfe{k}": v.detach().cpu() for k, v in per_sample.items()}
    return rows, arrays


def guided_rows(name: str, model: FlowMap, k: int, ctx: CellContext) -> list[Row]:
    """Sample quality with self-guided noise for every eta, under the label NAME+guided@ETA, and the
    network calls spent: k forward jumps plus, per Adam step, one forward and one backward pass."""
    cfg, rows = ctx.cfg, []
    for eta in cfg.guidance_etas:
        label = f"{name}+guided@{eta:g}"
        draw = _guided_sampler(model, k, eta, cfg)
        x = draw(ctx.noise)
        objective = "-log p_1(Phi(x_0))" if cfg.guidance_prior else "kappa D(x_0, 0, 1)"
        estimator = f"eta={eta:g}, {cfg.guidance_steps} Adam step(s) on {objective}"
        calls = (("network_calls_forward", k + cfg.guidance_steps), ("network_calls_backward", cfg.guidance_steps))
        rows += [Row(ctx.dataset.name, label, k, metric, value, math.nan, "", estimator, len(x), ctx.device_label) for metric, value in calls]
        rows += sample_quality_rows(label, k, x, ctx, draw)
    return rows


Draw = Callable[[Tensor], Tensor]  # unit noise (N, *shape) -> samples (N, *shape)


def _sampler(model: FlowMap, k: int, cfg: EvalConfig) -> Draw:
    """K-step samples from unit noise, chunked as :func:`bench.evaluate.draw_samples`, untimed."""
    return lambda noise: torch.cat([sample(model, c, k, track_log_p=False).x for c in (model.sigma_0 * noise).split(cfg.batch_size)])


def _guided_sampler(model: FlowMap, k: int, eta: float, cfg: EvalConfig) -> Draw:
    """K-step samples from self-guided noise (``cfg.guidance_steps`` Adam steps of size eta)."""
    from f2d2.guidance import guide_noise

    def draw(noise: Tensor) -> Tensor:
        x0 = model.sigma_0 * noise
        guided = torch.cat([guide_noise(model, c, eta, num_steps=cfg.guidance_steps, prior_term=cfg.guidance_prior) for c in x0.split(cfg.batch_size)])
        return torch.cat([sample(model, c, k, track_log_p=False).x for c in guided.split(cfg.batch_size)])

    return draw


def seed_range_noise(ctx: CellContext, r: int) -> Tensor:
    """Unit noise of seed range r: per-sample seeds r N ... (r + 1) N - 1, N = len(ctx.noise)
    (range 0 is ``ctx.noise`` itself)."""
    n = len(ctx.noise)
    return per_sample_noise(n, tuple(ctx.dataset.data_shape), ctx.cfg.seed, ctx.device, first=r * n)


def sample_quality_rows(name: str, k: int, x: Tensor, ctx: CellContext, draw: Draw | None = None) -> list[Row]:
    """Images: the dataset's Frechet distance (FID or FD-<classifier>) and, for FID, KID; with
    ``eval.fid_seeds`` = R > 1, ``draw`` samples seed ranges 1 .. R - 1 as well (see
    :meth:`bench.fid.SampleQuality.seed_metrics`). 2D data: a two-sample distance to held-out data
    and, where the support is known, the share inside it."""
    ds = ctx.dataset
    x = x.detach().cpu()
    if ctx.quality is not None:
        more = (draw(seed_range_noise(ctx, r)).detach().cpu() for r in range(1, ctx.cfg.fid_seeds)) if draw else ()
        return [
            Row(ds.name, name, k, metric, value, stderr, "", estimator, len(x), ctx.device_label)
            for metric, value, stderr, estimator in ctx.quality.seed_metrics(x, more)
        ]
    rows = []
    est = energy_distance_estimate(x, ctx.x_test.cpu(), seed=ctx.cfg.seed)
    rows.append(Row(ds.name, name, k, "energy_distance", est.value, est.stderr, "", "bootstrap", len(x), ctx.device_label))
    inside = ds.in_support(x)
    if inside is not None:
        share = share_estimate(inside)
        rows.append(Row(ds.name, name, k, "support_share", share.value, share.stderr, "", "binomial", len(x), ctx.device_label))
    return rows


def rows_to_json(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


def rows_from_json(data: list[dict]) -> list[Row]:
    return [Row(**{**d, "value": float(d["value"]), "stderr": float(d["stderr"])}) for d in data]
