"""Datasets registered by name: 2D toy densities with exact log p (images live in bench/images.py).

Every dataset gives training batches from a seeded generator, a fixed held-out test set, the
prior scale sigma_0 and divergence scale kappa it is trained with, and, where known, the exact
log-density, its entropy (the lowest NLL any model can reach) and a support test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

TEST_SEED = 20_251_202  # held-out points never overlap a training stream (different generator)
VALIDATION_SEED = TEST_SEED + 2
ENTROPY_SAMPLES = 1_000_000


@dataclass(frozen=True)
class Entropy:
    """True entropy E[-log p(x)] in nats with its Monte-Carlo standard error (0 if exact)."""

    nats: float
    stderr: float


class Dataset:
    """Base class; subclasses implement :meth:`sample` (and optionally the exact density)."""

    name: str = ""
    data_shape: tuple[int, ...] = ()
    levels: int | None = None  # values per dimension of discrete data (bits/dim), None if continuous
    sigma_0: float = 1.0
    kappa: float = 10.0

    @property
    def num_dims(self) -> int:
        return math.prod(self.data_shape)

    def sample(self, num: int, generator: torch.Generator) -> Tensor:
        """``num`` fresh samples on the generator's device."""
        raise NotImplementedError

    def train_batch(self, num: int, generator: torch.Generator) -> Tensor:
        """A training batch on the generator's device (fresh samples for densities we can sample)."""
        return self.sample(num, generator)

    def test_set(self, num: int) -> Tensor:
        return self.sample(num, torch.Generator().manual_seed(TEST_SEED))

    def validation_set(self, num: int) -> Tensor:
        """A fixed batch for model selection during training, disjoint from the test set's stream."""
        return self.sample(num, torch.Generator().manual_seed(VALIDATION_SEED))

    def log_prob(self, x: Tensor) -> Tensor | None:
        return None

    def entropy(self) -> Entropy | None:
        return None

    def in_support(self, x: Tensor) -> Tensor | None:
        """(B,) bool: inside the support, when the support is a proper subset of space."""
        return None


class Checkerboard(Dataset):
    """FFJORD's checkerboard: eight 2 x 2 squares on [-4, 4]^2, log p = -ln 32 on the support.

    a ~ U[-2, 2), b = U[0, 1) - 2 Bernoulli(1/2) + (floor(a) mod 2), x = 2 (a, b)
    (Grathwohl et al., arXiv:1810.01367).
    """

    name = "checkerboard"
    data_shape = (2,)
    sigma_0 = 2.31  # per-dimension data std, sqrt(16/3)
    kappa = 10.0  # the authors' divergence scale for this dataset
    AREA = 32.0

    def sample(self, num: int, generator: torch.Generator) -> Tensor:
        kw = dict(generator=generator, device=generator.device)
        a = 4 * torch.rand(num, **kw) - 2
        b = torch.rand(num, **kw) - 2 * torch.randint(0, 2, (num,), **kw)
        b = b + torch.floor(a).remainder(2)
        return 2 * torch.stack([a, b], dim=1)

    def in_support(self, x: Tensor) -> Tensor:
        half = x / 2
        inside = ((half >= -2) & (half < 2)).all(dim=1)
        parity = (torch.floor(half[:, 0]) + torch.floor(half[:, 1])).remainder(2) == 0
        return inside & parity

    def log_prob(self, x: Tensor) -> Tensor:
        inside = self.in_support(x)
        return torch.where(inside, -math.log(self.AREA), -math.inf).to(x.dtype)

    def entropy(self) -> Entropy:
        return Entropy(math.log(self.AREA), 0.0)


class EightGaussians(Dataset):
    """Eight N(c_i, 0.5^2 I), centres on a circle of radius 4, everything divided by sqrt(2)."""

    name = "8gaussians"
    data_shape = (2,)
    sigma_0 = 2.03  # per-dimension data std, sqrt(4 + 1/8)
    kappa = 10.0
    RADIUS, STD = 4.0 / math.sqrt(2), 0.5 / math.sqrt(2)

    def centres(self, dtype: torch.dtype = torch.float32) -> Tensor:
        angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
        return (self.RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)).to(dtype)

    def sample(self, num: int, generator: torch.Generator) -> Tensor:
        kw = dict(generator=generator, device=generator.device)
        idx = torch.randint(0, 8, (num,), **kw)
        return self.centres().to(generator.device)[idx] + self.STD * torch.randn(num, 2, **kw)

    def log_prob(self, x: Tensor) -> Tensor:
        sq = (x[:, None, :] - self.centres(x.dtype)).pow(2).sum(-1)
        log_comp = -0.5 * sq / self.STD**2 - math.log(2 * math.pi * self.STD**2)
        return torch.logsumexp(log_comp, dim=1) - math.log(8)

    def entropy(self) -> Entropy:
        """Monte-Carlo entropy on a fixed stream of samples, with its standard error."""
        x = self.sample(ENTROPY_SAMPLES, torch.Generator().manual_seed(TEST_SEED + 1)).double()
        nll = -self.log_prob(x)
        return Entropy(nll.mean().item(), (nll.std() / math.sqrt(len(nll))).item())


DATASETS: dict[str, type[Dataset]] = {cls.name: cls for cls in (Checkerboard, EightGaussians)}


class DataError(ValueError):
    """A dataset is unknown or its files are missing or malformed; the message says what to do."""


def dataset_class(name: str) -> type[Dataset]:
    """The class registered as ``name``; the error lists the valid names."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[name]


def get_dataset(name: str, data_dir: str | None = None) -> Dataset:
    """The dataset registered as ``name``; file-backed datasets read from ``data_dir``."""
    cls = dataset_class(name)
    return cls(data_dir) if getattr(cls, "needs_files", False) else cls()


# Image datasets subclass Dataset, so they register after it is defined.
from bench.images import DATASETS_IMAGES  # noqa: E402

DATASETS.update(DATASETS_IMAGES)
