"""Exact divergence equals the Jacobian trace; Hutchinson is unbiased around it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from f2d2.divergence import Exact, Hutchinson, divergence, estimator_spec, parse_estimator


def mlp_field(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 32), nn.Tanh(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, dim)).double()


class ConvField(nn.Module):
    """An image-shaped field (B, 2, 3, 3) -> same shape, samples independent."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1).double()
        self.b = nn.Conv2d(4, 2, 3, padding=1).double()

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def jacobian_trace(fn, x: torch.Tensor) -> torch.Tensor:
    traces = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda z: fn(z[None])[0], xi)
        traces.append(jac.reshape(xi.numel(), xi.numel()).trace())
    return torch.stack(traces)


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_exact_divergence_is_jacobian_trace_flat(chunk_size):
    fn = mlp_field(5)
    x = torch.randn(7, 5, dtype=torch.float64)
    result = divergence(fn, x, Exact(chunk_size))
    torch.testing.assert_close(result.value, jacobian_trace(fn, x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(result.output, fn(x))
    assert result.stderr is None


def test_exact_divergence_is_jacobian_trace_images():
    fn = ConvField()
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    result = divergence(fn, x, Exact(chunk_size=5))
    torch.testing.assert_close(result.value, jacobian_trace(fn, x), rtol=1e-10, atol=1e-10)


def test_exact_divergence_ignores_outer_no_grad_and_records_no_graph():
    fn = mlp_field(3)
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        result = divergence(fn, x)
    assert not result.value.requires_grad
    torch.testing.assert_close(result.value, jacobian_trace(fn, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_mean_within_four_standard_errors(distribution):
    fn = mlp_field(6)
    x = torch.randn(3, 6, dtype=torch.float64)
    exact = jacobian_trace(fn, x)
    gen = torch.Generator().manual_seed(1)
    result = divergence(fn, x, Hutchinson(4000, distribution), generator=gen)
    z = (result.value - exact) / result.stderr
    assert result.per_probe.shape == (4000, 3)
    assert torch.all(z.abs() < 4), z
    # the estimator really is random: its spread is far from zero
    assert torch.all(result.stderr > 1e-4)


def test_hutchinson_single_probe_on_a_diagonal_field_is_exact():
    # eps^T diag(a) eps = sum a_i eps_i^2 = tr for Rademacher probes
    scale = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    result = divergence(lambda z: z * scale, x, Hutchinson(1), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(result.value, torch.full((5,), 1.5, dtype=torch.float64))


def test_fixed_probes_are_reused():
    fn = mlp_field(4)
    x = torch.randn(2, 4, dtype=torch.float64)
    probes = Hutchinson(3).probes(x, torch.Generator().manual_seed(0))
    a = divergence(fn, x, Hutchinson(3), probes=probes)
    b = divergence(fn, x, Hutchinson(3), probes=probes)
    torch.testing.assert_close(a.value, b.value, rtol=0, atol=0)


def test_divergence_needs_square_field():
    with pytest.raises(ValueError, match="R\\^d -> R\\^d"):
        divergence(lambda z: z[:, :1], torch.randn(2, 3))


@pytest.mark.parametrize("spec", ["exact", "hutchinson:1", "hutchinson:8", "gaussian:2"])
def test_estimator_spec_round_trip(spec):
    assert estimator_spec(parse_estimator(spec)) == spec


@pytest.mark.parametrize("spec", ["", "exact:2", "hutch", "hutchinson:x", "hutchinson:0"])
def test_bad_estimator_spec(spec):
    with pytest.raises(ValueError):
        parse_estimator(spec)


def test_hutchinson_rejects_bad_arguments():
    with pytest.raises(ValueError):
        Hutchinson(0)
    with pytest.raises(ValueError):
        Hutchinson(2, "uniform")
    assert math.isclose(Exact(3).chunk_size, 3)
