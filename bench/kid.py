"""Kernel Inception Distance, clean-fid's estimator (our implementation).

M. Binkowski et al., "Demystifying MMD GANs", ICLR 2018, arXiv:1801.01401; the estimator of
clean-fid's ``kernel_distance`` (G. Parmar et al., arXiv:2104.11222). With the cubic polynomial
kernel k(a, b) = (a . b / F + 1)^3 on F-dimensional features, each of ``num_subsets`` rounds draws
m = min(N_samples, N_reference, max_subset_size) samples X and m reference features Y without
replacement and computes

    MMD^2_m = sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2;

KID is the mean over rounds (clean-fid reports this mean alone, unscaled: multiply by 1000 for the
"KID x 10^3" of many papers). Its expectation over the draws is the same formula on the full sets
(averages over distinct pairs and over all cross pairs), whatever m is.

Rounds draw the samples' indices first, then the reference's, each with ``rng.choice(N, m,
replace=False)`` (clean-fid's order), so a ``numpy.random.RandomState`` seeded like clean-fid's
global state reproduces its number. Gram matrices are float32 matrix products by default (float64
on request), the kernel values and every sum are float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

KID_SUBSETS = 100  # clean-fid's defaults
KID_SUBSET_SIZE = 1000
KID_DEGREE = 3


@dataclass(frozen=True)
class KernelDistance:
    """KID (mean over rounds) with the per-round estimates (num_subsets,) and the subset size m."""

    value: float
    per_subset: np.ndarray
    subset_size: int


def _kernel(a: torch.Tensor, b: torch.Tensor, num_features: int) -> torch.Tensor:
    """(a b^T / F + 1)^3 with the product in the inputs' dtype and the rest in float64."""
    return (torch.matmul(a, b.T).double() / num_features + 1.0) ** KID_DEGREE


def kernel_distance(
    reference: np.ndarray,
    samples: np.ndarray,
    *,
    num_subsets: int = KID_SUBSETS,
    max_subset_size: int = KID_SUBSET_SIZE,
    rng: np.random.Generator | np.random.RandomState | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> KernelDistance:
    """KID between ``samples`` (N_s, F) and ``reference`` (N_r, F) features (see module docstring).

    ``rng`` (default: numpy's default_rng(0)) draws the subsets; ``dtype`` and ``device`` are where
    the Gram matrices are computed.
    """
    if reference.ndim != 2 or samples.ndim != 2 or reference.shape[1] != samples.shape[1]:
        raise ValueError(f"KID needs (N, F) features of one width, got {reference.shape} and {samples.shape}")
    m = min(len(samples), len(reference), max_subset_size)
    if m < 2 or num_subsets < 1:
        raise ValueError(f"KID needs subsets of at least 2 points and num_subsets >= 1, got m = {m}, {num_subsets}")
    rng = rng if rng is not None else np.random.default_rng(0)
    num_features = reference.shape[1]
    ref = torch.as_tensor(np.asarray(reference), device=device).to(dtype)
    gen = torch.as_tensor(np.asarray(samples), device=device).to(dtype)
    estimates = np.empty(num_subsets)
    for r in range(num_subsets):
        x = gen[torch.as_tensor(rng.choice(len(samples), m, replace=False), device=device)]
        y = ref[torch.as_tensor(rng.choice(len(reference), m, replace=False), device=device)]
        kxx, kyy = _kernel(x, x, num_features), _kernel(y, y, num_features)
        within = kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()
        cross = _kernel(x, y, num_features).sum()
        estimates[r] = (within / (m * (m - 1)) - 2.0 * cross / m**2).item()
    return KernelDistance(float(estimates.mean()), estimates, m)
