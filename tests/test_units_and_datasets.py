"""Bits/dim by hand arithmetic; the toy datasets' exact densities and entropies."""

from __future__ import annotations

import math

import pytest
import torch

from bench.datasets import Checkerboard, DataError, EightGaussians, get_dataset
from f2d2.units import bits_per_dim, dequantize, to_levels


def test_bpd_hand_arithmetic():
    # 8-bit images: bpd = nll / (D ln 2) + 7
    assert bits_per_dim(0.0, 3072, 256) == pytest.approx(7.0)
    assert bits_per_dim(3072 * math.log(2) * 3.5, 3072, 256) == pytest.approx(10.5)
    # sklearn digits: 17 levels, 64 dims: log2(17) - 1 = 3.0874628...
    assert bits_per_dim(64 * math.log(2) * 2.0, 64, 17) == pytest.approx(2.0 + 3.0874628412503395)


def test_bpd_of_uniform_model_is_log2_levels():
    # a model uniform on [-1, 1]^D has nll_y = D ln 2 and must cost exactly log2(L) bits per dim
    for levels in (2, 17, 256):
        assert bits_per_dim(10 * math.log(2), 10, levels) == pytest.approx(math.log2(levels))


def test_bpd_rejects_bad_arguments():
    with pytest.raises(ValueError):
        bits_per_dim(1.0, 0, 256)
    with pytest.raises(ValueError):
        bits_per_dim(1.0, 3, 1)


def test_dequantize_round_trip_and_range():
    k = torch.randint(0, 17, (1000, 64))
    y = dequantize(k, 17, torch.Generator().manual_seed(0))
    assert y.min() >= -1 and y.max() <= 1
    assert torch.equal(to_levels(y, 17), k)


def test_checkerboard_samples_lie_on_the_support_uniformly():
    ds = Checkerboard()
    x = ds.sample(80_000, torch.Generator().manual_seed(0))
    assert ds.in_support(x).all()
    torch.testing.assert_close(ds.log_prob(x), torch.full((80_000,), -math.log(32)))
    # eight squares, 1/8 of the mass each
    cells = (torch.floor(x[:, 0] / 2) * 10 + torch.floor(x[:, 1] / 2)).long()
    counts = torch.unique(cells, return_counts=True)[1].double() / len(x)
    assert len(counts) == 8
    torch.testing.assert_close(counts, torch.full((8,), 1 / 8, dtype=torch.float64), rtol=0, atol=0.006)
    assert ds.entropy().nats == pytest.approx(math.log(32)) and ds.entropy().stderr == 0
    # (1, 1) lies in the square [0, 2)^2; (5, 0) is outside [-4, 4)^2; (2.5, 0.5) is in an empty square
    points = torch.tensor([[1.0, 1.0], [5.0, 0.0], [2.5, 0.5]])
    assert ds.in_support(points).tolist() == [True, False, False]
    assert ds.log_prob(points)[1:].tolist() == [-math.inf, -math.inf]


def test_checkerboard_data_std_matches_sigma_0():
    x = Checkerboard().sample(200_000, torch.Generator().manual_seed(1))
    assert x.std(0).tolist() == pytest.approx([Checkerboard.sigma_0] * 2, abs=0.02)


def test_eight_gaussians_density_integrates_to_one_and_entropy_agrees():
    ds = EightGaussians()
    grid = torch.linspace(-5, 5, 801, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    logp = ds.log_prob(pts)
    cell = (grid[1] - grid[0]).item() ** 2
    mass = (logp.exp().sum() * cell).item()
    assert mass == pytest.approx(1.0, abs=1e-4)
    entropy_grid = -(logp.exp() * logp).sum().item() * cell
    h = ds.entropy()
    assert abs(h.nats - entropy_grid) < 4 * h.stderr + 1e-3


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError, match="valid: checkerboard, 8gaussians"):
        get_dataset("cifar11")


def test_test_set_is_fixed_and_independent_of_training_stream():
    ds = Checkerboard()
    a, b = ds.test_set(100), ds.test_set(100)
    assert torch.equal(a, b)
    assert not torch.equal(a, ds.sample(100, torch.Generator().manual_seed(0)))
