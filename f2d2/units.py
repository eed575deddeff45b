"""Units: bits per dimension for discrete data, and the dequantization that defines them."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def bits_per_dim(nll_nats: Tensor | float, num_dims: int, levels: int) -> Tensor | float:
    """Bits/dim of data with ``levels`` values per dimension from the NLL of its scaled version.

    Data k in {0, ..., L - 1}^D is dequantized to x = (k + U) / L in [0, 1]^D and scaled to
    y = 2x - 1 in [-1, 1]^D. With nll_y = -log p(y) in nats,
        bpd = nll_y / (D ln 2) + log2(L) - 1,
    i.e. nll_y / (D ln 2) + 7 for 8-bit images (L = 256). The change of variables from y to the
    dequantized integer grid has Jacobian (2 / L)^D, hence the last two terms.
    """
    if levels < 2 or num_dims < 1:
        raise ValueError(f"need levels >= 2 and num_dims >= 1, got {levels}, {num_dims}")
    return nll_nats / (num_dims * math.log(2.0)) + math.log2(levels) - 1.0


def dequantize(k: Tensor, levels: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization of integer data k in {0, ..., L - 1} to y = 2 (k + U) / L - 1."""
    u = torch.rand(k.shape, generator=generator, dtype=torch.get_default_dtype(), device=k.device)
    return 2.0 * (k.to(u.dtype) + u) / levels - 1.0


def to_levels(y: Tensor, levels: int) -> Tensor:
    """Inverse of the scaling in :func:`dequantize`: y in [-1, 1] back to integer levels."""
    return ((y + 1.0) / 2.0 * levels).floor().clamp(0, levels - 1).long()
