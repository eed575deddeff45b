"""Sample-quality metrics: two-sample distances for 2D data (image metrics in bench/fid.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

NUM_BOOTSTRAP = 50  # resamples for the energy distance's standard error


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
