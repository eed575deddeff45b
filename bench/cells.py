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
from bench.flags import nll_flag
from bench.measure import Likelihood, draw_samples, few_step, mean_stderr, per_sample_noise, reference
from bench.metrics import CALIBRATION_TOL, calibration_floor, calibration_stats, energy_distance_estimate, share_estimate
from bench.shards import map_chunks
from f2d2.divergence import Hutchinson, parse_estimator
from f2d2.model import FlowMap
from f2d2.sampling import sample
from f2d2.units import bits_per_dim


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
class EvalContext:
    """What every evaluation of a sweep shares: data, noise, the teacher's reference (None when no
    teacher is given or the nll group is off), the sample-quality evaluator, and the metric groups."""

    dataset: Dataset
    x_test: Tensor
    noise: Tensor
    teacher_ref: Likelihood | None
    cfg: EvalConfig
    device: torch.device
    device_label: str
    quality: Any = None  # bench.fid.SampleQuality for images; None: energy distance (2D data)
    teacher_name: str = "flow-matching"
    groups: frozenset[str] = frozenset({"nll", "calibration", "quality", "timing"})
    teacher_model: Any = None  # the FlowMap behind teacher_ref: its own reference is not solved twice


CellContext = EvalContext  # the name used before the Python evaluation API existed


class RowSink(list):
    """Rows of one method, with the columns every row of it shares."""

    def __init__(self, ctx: EvalContext, name: str) -> None:
        super().__init__()
        self.ctx, self.name = ctx, name

    def add(self, k: int, metric: str, value: float, stderr: float = math.nan, flag: str = "", estimator: str = "",
            points: int | None = None) -> None:
        num = len(self.ctx.x_test) if points is None else points
        self.append(Row(self.ctx.dataset.name, self.name, k, metric, float(value), stderr, flag, estimator, num, self.ctx.device_label))


def evaluate_cell(
    name: str, model: FlowMap, ctx: EvalContext, nfe: tuple[int, ...], own_ref: Likelihood | None = None
) -> tuple[list[Row], dict[str, Tensor]]:
    """All rows of one method in the context's metric groups (METHOD.md Sec. 4) and its per-point
    NLLs in nats ('ref' and 'nfe<K>', empty without likelihood groups) for calibration figures.
    ``own_ref``: the model's exact-ODE reference if already computed (the teacher's)."""
    groups, cfg = ctx.groups, ctx.cfg
    rows = RowSink(ctx, name)
    arrays: dict[str, Tensor] = {}
    own = None
    if groups & {"nll", "calibration", "timing"}:
        own = own_ref if own_ref is not None else reference(model, ctx.x_test, cfg, ctx.device)
        arrays["ref"] = own.nll.detach().cpu()
    timing = "timing" in groups
    for k in nfe:
        if own is not None:
            arrays[f"nfe{k}"] = likelihood_rows(rows, model, k, own)
        if groups & {"quality", "timing"}:
            samples = draw_samples(model, ctx.noise, k, cfg, ctx.device, timing=timing)
            if timing:
                rows.add(k, "sample_wall_s", samples.wall_s, points=len(ctx.noise))
            if "quality" in groups:
                rows += sample_quality_rows(name, k, samples.x, ctx, _sampler(model, k, cfg))
        if "guidance" in groups and model.capabilities.divergence_head:
            rows.add(k, "network_calls_forward", k, points=len(ctx.noise))
            rows.add(k, "network_calls_backward", 0, points=len(ctx.noise))
            rows += guided_rows(name, model, k, ctx)
    if "mass" in groups:
        from bench.mass import mass_rows

        mass_rows(rows, model, nfe)
    if name == ctx.teacher_name and cfg.teacher_steps and groups & {"quality", "guidance"}:
        many = draw_samples(model, ctx.noise, cfg.teacher_steps, cfg, ctx.device, timing=timing)
        if timing:
            rows.add(cfg.teacher_steps, "sample_wall_s", many.wall_s, points=len(ctx.noise))
        rows += sample_quality_rows(name, cfg.teacher_steps, many.x, ctx, _sampler(model, cfg.teacher_steps, cfg))
    return list(rows), arrays


def likelihood_rows(rows: RowSink, model: FlowMap, k: int, own: Likelihood) -> Tensor:
    """The nll / calibration / timing rows at NFE k; returns the per-point few-step NLL (nats)."""
    ctx = rows.ctx
    groups, cfg = ctx.groups, ctx.cfg
    fast = few_step(model, ctx.x_test, k, cfg, ctx.device, timing="timing" in groups)
    if "nll" in groups:
        nll_rows(rows, model, k, fast, own)
    if "calibration" in groups:
        calibration_rows(rows, k, fast, own)
    if "timing" in groups:
        rows.add(k, "nll_wall_s", fast.wall_s, estimator=fast.estimator)
        rows.add(k, "ref_wall_s", own.wall_s, estimator=own.estimator)
        rows.add(k, "nll_speedup", own.wall_s / fast.wall_s, estimator=fast.estimator)
    return fast.nll.detach().cpu()


def nll_rows(rows: RowSink, model: FlowMap, k: int, fast: Likelihood, own: Likelihood) -> None:
    """Few-step NLL (flagged invalid or optimistic), its first-order twin, the references, the
    paired gap and its split into map and head parts, the entropy and the reference's cost."""
    ctx = rows.ctx
    units, ds = Units(ctx.dataset), ctx.dataset
    entropy = ds.entropy()
    floor = (units.convert_value(entropy.nats), entropy.stderr * units.scale()) if entropy is not None else (None, 0.0)

    def add_nll(metric: str, lik: Likelihood, paired: bool) -> None:
        mean, se = mean_stderr(units.convert(lik.nll))
        gap, gap_se = mean_stderr(lik.nll - own.nll) if paired else (None, math.nan)
        flag = nll_flag(
            mean, se, unit=units.name, num_dims=ds.num_dims, entropy=floor[0], entropy_stderr=floor[1],
            gap=None if gap is None else gap * units.scale(), gap_stderr=gap_se * units.scale(),
        )
        rows.add(k, metric, mean, se, flag, lik.estimator)

    add_nll(f"nll_{units.name}", fast, paired=True)
    if fast.estimator == "f2d2-trained":  # the same model through the first-order approximation
        first = few_step(model, ctx.x_test, k, ctx.cfg, ctx.device, "first_order", timing=False)
        add_nll(f"nll_first_order_{units.name}", first, paired=True)
    add_nll(f"nll_ref_{units.name}", own, paired=False)
    if ctx.teacher_ref is not None:
        add_nll(f"nll_teacher_{units.name}", ctx.teacher_ref, paired=False)
    gap = fast.nll - own.nll
    mean, se = mean_stderr(gap)
    rows.add(k, f"nll_gap_{units.name}", mean * units.scale(), se * units.scale(), estimator=fast.estimator)
    # gap = -(log p_0(x0_few) - log p_0(x0_ref)) + (A_few - A_ref): where the map lands + what the head adds up
    landing = -(model.prior_log_prob(fast.x0) - model.prior_log_prob(own.x0)).detach().cpu()
    for metric, part, what in (("nll_gap_map", landing, "-(log p_0(few-step endpoint) - log p_0(exact endpoint))"),
                               ("nll_gap_head", gap.cpu() - landing, "accumulated divergence, few-step minus exact")):
        mean, se = mean_stderr(part)
        rows.add(k, f"{metric}_{units.name}", mean * units.scale(), se * units.scale(), estimator=f"{fast.estimator}: {what}")
    if entropy is not None:
        rows.add(k, f"entropy_{units.name}", floor[0], floor[1], estimator="exact" if entropy.stderr == 0 else "monte-carlo")
    if own.mc_stderr is not None:  # the reference's own Monte-Carlo noise, part of the calibration error
        rows.add(k, f"ref_mc_stderr_{units.name}", own.mc_stderr.mean().item() * units.scale(), estimator=own.estimator)
    rows.add(k, "ref_nfe", own.nfe, estimator=own.estimator)


def calibration_rows(rows: RowSink, k: int, fast: Likelihood, own: Likelihood) -> None:
    """Per-point agreement with the own reference, and the floor a perfect estimator would score
    against that reference (its Monte-Carlo noise; 0 / 1 for an exact trace)."""
    ctx = rows.ctx
    units = Units(ctx.dataset)
    ref = units.convert(own.nll).cpu().numpy()
    calib = calibration_stats(units.convert(fast.nll).cpu().numpy(), ref, units.name)
    noise = None if own.mc_noise is None else (own.mc_noise * units.scale()).cpu().numpy()
    floor = calibration_floor(ref, noise, units.name)
    floor_note = f"a perfect estimator against the {own.estimator} reference"
    if noise is None and isinstance(parse_estimator(rows.ctx.cfg.reference_estimator), Hutchinson):
        # one probe: its Monte-Carlo error cannot be told from the data, so the floor is unknown, not perfect
        floor = {key: math.nan for key in floor}
        floor_note += ": unknown with 1 probe (use hutchinson:P, P >= 2)"
    tol = f"|gap| <= {CALIBRATION_TOL[units.name]:g} {units.name}"
    for metric, key, extra in ((f"calib_mae_{units.name}", "mae", ""), ("calib_spearman", "spearman", ""), ("calib_within", "within", f", {tol}")):
        rows.add(k, metric, calib[key], estimator=fast.estimator + extra)
        rows.add(k, metric.replace("calib_", "calib_floor_", 1), floor[key], estimator=floor_note + extra)


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
    return lambda noise: map_chunks(lambda c, _: (sample(model, c, k, track_log_p=False).x,), model.sigma_0 * noise, cfg.batch_size)[0]


def _guided_sampler(model: FlowMap, k: int, eta: float, cfg: EvalConfig) -> Draw:
    """K-step samples from self-guided noise (``cfg.guidance_steps`` Adam steps of size eta)."""
    from f2d2.guidance import guide_noise

    def draw(noise: Tensor) -> Tensor:
        x0 = model.sigma_0 * noise
        def batch(c: Tensor, _: int) -> tuple[Tensor]:  # each sample's Adam step is its own: batching does not matter
            guided = guide_noise(model, c, eta, num_steps=cfg.guidance_steps, prior_term=cfg.guidance_prior)
            return (sample(model, guided, k, track_log_p=False).x,)

        return map_chunks(batch, x0, cfg.batch_size)[0]

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
