"""Sample-quality metrics: two-sample distances for 2D data (image metrics in bench/fid.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import torch
from torch import Tensor

NUM_BOOTSTRAP = 50  # resamples for the energy distance's standard error
CALIBRATION_TOL = {"nats": 0.1, "bpd": 0.01}  # |few - ref| counted as "within" (inclusive)


@dataclass(frozen=True)
class Estimate:
    value: float
    stderr: float


def _mean_pairwise(a: Tensor, b: Tensor, same: bool) -> Tensor:
    dist = torch.cdist(a, b)
    if same:  # U-statistic: leave out the zero diagonal
        n = a.shape[0]
        return dist.sum() / (n * (n - 1))
    return dist.mean()


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo, 2013), >= 0,
    zero iff the distributions agree; unbiased within-sample terms."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    cross = _mean_pairwise(x, y, False)
    return (2 * cross - _mean_pairwise(x, x, True) - _mean_pairwise(y, y, True)).item()


def energy_distance_estimate(x: Tensor, y: Tensor, seed: int = 0) -> Estimate:
    """Energy distance with a bootstrap standard error (both samples resampled)."""
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(NUM_BOOTSTRAP):
        ix = torch.randint(0, len(x), (len(x),), generator=gen)
        iy = torch.randint(0, len(y), (len(y),), generator=gen)
        values.append(energy_distance(x[ix], y[iy]))
    return Estimate(energy_distance(x, y), float(torch.tensor(values).std()))


def share_estimate(mask: Tensor) -> Estimate:
    """Share of True entries with its binomial standard error."""
    p = mask.double().mean().item()
    return Estimate(p, math.sqrt(max(p * (1 - p), 0.0) / len(mask)))


# Per-point calibration of few-step likelihoods against the exact reference ---------------


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(np.clip(ra @ rb / denom, -1.0, 1.0)) if denom > 0 else math.nan  # constant input: undefined


def calibration_stats(few: np.ndarray, ref: np.ndarray, unit: str = "nats") -> dict[str, float]:
    """Agreement of few-step and exact per-point NLLs, both (N,) in ``unit``.

    mae: mean |few - ref|; spearman: rank correlation (Pearson correlation of average ranks, so
    ties are handled as scipy.stats.spearmanr does); within: share of points with
    |few - ref| <= 0.1 nats (0.01 bits/dim). All NaN if any value is non-finite: like the tables, a
    non-finite NLL is reported, never averaged away.
    """
    if unit not in CALIBRATION_TOL:
        raise ValueError(f"unit must be one of {', '.join(CALIBRATION_TOL)}, got {unit!r}")
    few, ref = np.asarray(few, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if few.shape != ref.shape or few.size == 0:
        raise ValueError(f"need two non-empty arrays of one shape, got {few.shape} and {ref.shape}")
    few, ref = few.reshape(-1), ref.reshape(-1)
    if not (np.isfinite(few).all() and np.isfinite(ref).all()):
        return {"mae": math.nan, "spearman": math.nan, "within": math.nan}
    err = np.abs(few - ref)
    spearman = _spearman(few, ref) if few.size > 1 else math.nan
    return {"mae": float(err.mean()), "spearman": spearman, "within": float((err <= CALIBRATION_TOL[unit]).mean())}


def calibration_floor(ref: np.ndarray, noise: np.ndarray | None, unit: str = "nats") -> dict[str, float]:
    """What a perfect few-step estimator (one returning the exact NLL) would score in
    :func:`calibration_stats` against a noisy reference.

    An exact-trace reference has no Monte-Carlo noise (``noise`` None): floors 0 (MAE), 1
    (Spearman, within); its solver error is measured separately (README.md, "Reference accuracy").
    A Hutchinson reference with P fixed probes is the truth plus an error e_i; ``noise`` is one
    draw distributed as e_i per point (:func:`bench.measure.mc_noise_draw`: a contrast of two of its
    probes, (p_1 - p_2) / sqrt(2 P)). The perfect estimator then scores
        MAE floor = mean_i |noise_i|, within floor = share of |noise_i| <= tol,
        Spearman floor = spearman(ref, ref - noise),
    unbiased for the first two (one draw per point, averaged over points); the last uses ref - noise
    as a stand-in for the truth. All in ``unit``. (Plugging the per-point standard errors into
    E|N(0, s^2)| instead would bias the within-share upwards: with P = 2 probes s is itself noisy.)
    """
    if unit not in CALIBRATION_TOL:
        raise ValueError(f"unit must be one of {', '.join(CALIBRATION_TOL)}, got {unit!r}")
    if noise is None:
        return {"mae": 0.0, "spearman": 1.0, "within": 1.0}
    ref = np.asarray(ref, dtype=np.float64).reshape(-1)
    noise = np.asarray(noise, dtype=np.float64).reshape(-1)
    if ref.shape != noise.shape or ref.size == 0:
        raise ValueError(f"need two non-empty arrays of one shape, got {ref.shape} and {noise.shape}")
    if not (np.isfinite(ref).all() and np.isfinite(noise).all()):
        return {"mae": math.nan, "spearman": math.nan, "within": math.nan}
    spearman = _spearman(ref, ref - noise) if ref.size > 1 else math.nan
    err = np.abs(noise)
    return {"mae": float(err.mean()), "spearman": spearman, "within": float((err <= CALIBRATION_TOL[unit]).mean())}
