"""The calibration floor of a noisy reference and the total-mass estimators, against closed forms
and simulations whose truth is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench.mass import grid_mass, grid_points, importance_mass
from bench.measure import mc_noise_draw
from bench.metrics import calibration_floor, calibration_stats


def simulated_reference(num_probes: int, n: int = 20_000, seed: int = 0):
    """Truth per point, and a Hutchinson-like reference: P probes with per-point error scales."""
    rng = np.random.default_rng(seed)
    truth = 1.9 + 0.05 * rng.standard_normal(n)
    sigma = rng.uniform(0.002, 0.03, n)  # the P-probe mean's error scale, in bits/dim
    probes = truth[None] + sigma[None] * math.sqrt(num_probes) * rng.standard_normal((num_probes, n))
    return truth, probes.mean(0), torch.from_numpy(probes)


@pytest.mark.parametrize("num_probes", [2, 4])
def test_the_floor_is_what_a_perfect_estimator_scores_against_the_noisy_reference(num_probes):
    truth, ref, probes = simulated_reference(num_probes)
    floor = calibration_floor(ref, mc_noise_draw(probes).numpy(), "bpd")
    perfect = calibration_stats(truth, ref, "bpd")  # the truth as the few-step estimate
    assert floor["mae"] == pytest.approx(perfect["mae"], rel=0.03)
    assert floor["within"] == pytest.approx(perfect["within"], abs=0.015)  # 20k points: binomial se 0.0035
    assert floor["spearman"] == pytest.approx(perfect["spearman"], abs=0.01)
    assert perfect["within"] < 0.7  # the floor is far from the perfect 1: this reference is too noisy for 0.01 bpd


def test_the_noise_draw_has_the_variance_of_the_probe_mean():
    probes = torch.randn(4, 200_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3.0
    draw = mc_noise_draw(probes)
    assert draw.var().item() == pytest.approx(9.0 / 4, rel=0.01)  # Var(mean of 4 probes of variance 9)
    assert mc_noise_draw(probes[:1]) is None and mc_noise_draw(None) is None


def test_an_exact_reference_has_a_perfect_floor():
    assert calibration_floor(np.array([1.0, 2.0, 3.0]), None, "nats") == {"mae": 0.0, "spearman": 1.0, "within": 1.0}
    with pytest.raises(ValueError, match="one shape"):
        calibration_floor(np.ones(3), np.ones(2), "nats")


def test_importance_mass_of_a_scaled_density_is_the_scale():
    """p_hat = c N(0, 1) against the proposal q = N(0, 1): every weight is c (zero variance)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=gen, dtype=torch.float64)
    log_q = -0.5 * x**2 - 0.5 * math.log(2 * math.pi)
    est = importance_mass(log_q + math.log(1.7), log_q)
    assert est.value == pytest.approx(1.7, rel=1e-12) and est.stderr == pytest.approx(0.0, abs=1e-12)
    assert "ESS=1000.0" in est.estimator


def test_importance_mass_of_a_normalised_density_is_one_within_its_standard_error():
    """p_hat = N(0.3, 1.2^2) against q = N(0, 1): mass 1; the reported se covers the error."""
    values = []
    for seed in range(20):
        x = torch.randn(4000, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        log_q = -0.5 * x**2 - 0.5 * math.log(2 * math.pi)
        log_p = -0.5 * ((x - 0.3) / 1.2) ** 2 - math.log(1.2) - 0.5 * math.log(2 * math.pi)
        values.append(importance_mass(log_p, log_q))
    z = [(v.value - 1.0) / v.stderr for v in values]
    assert abs(np.mean(z)) < 0.7 and 0.5 < np.std(z) < 1.6  # standardised errors look like N(0, 1)


def test_importance_mass_survives_huge_log_ratios_and_refuses_bad_shapes():
    log_q = torch.zeros(10, dtype=torch.float64)
    est = importance_mass(log_q + 800.0, log_q)  # weights e^800 overflow float64
    assert est.value == math.inf
    est = importance_mass(log_q - 800.0, log_q)
    assert est.value == pytest.approx(math.exp(-800.0), rel=1e-9)
    with pytest.raises(ValueError, match="N >= 2"):
        importance_mass(log_q[:1], log_q[:1])
    assert math.isnan(importance_mass(log_q + math.nan, log_q).value)


def test_grid_mass_of_a_gaussian_and_of_the_uniform_square():
    points = grid_points(4.5, 200)
    assert points.shape == (40_000, 2)
    normal = lambda x: -0.5 * x.pow(2).sum(1) - math.log(2 * math.pi)  # noqa: E731
    inside = math.erf(4.5 / math.sqrt(2)) ** 2  # the mass of N(0, I) in the square: 1 - 1.4e-5
    assert grid_mass(normal(points)).value == pytest.approx(inside, abs=1e-7)  # midpoint rule on a smooth density
    uniform = lambda x: torch.where((x.abs() <= 2).all(1), -math.log(16.0), -math.inf)  # noqa: E731
    assert grid_mass(uniform(points)).value == pytest.approx(1.0, abs=0.02)  # cell edges straddle the square


def test_the_reference_and_the_naive_estimate_draw_unrelated_probes(monkeypatch):
    """Both used to seed their Hutchinson probes with the same (seed, batch): the naive estimate's
    first-step probe was the reference's first probe, their Monte-Carlo errors were correlated and
    a naive baseline's calibration against a Hutchinson reference looked better than it is
    (digits flow-matching at NFE 1: Spearman 0.39 against 2 probes, 0.32 against the exact trace)."""
    from baselines import get_method
    from bench.config import EvalConfig, ModelConfig
    from bench.measure import few_step_estimator, reference
    from bench.models import build_model
    from f2d2.divergence import Hutchinson

    drawn: dict[str, list[torch.Tensor]] = {"reference": [], "naive": []}
    phase = ["reference"]
    original = Hutchinson.probes

    def recording(self, x, generator=None):
        eps = original(self, x, generator)
        drawn[phase[0]].append(eps.reshape(eps.shape[0], -1).clone())
        return eps

    monkeypatch.setattr(Hutchinson, "probes", recording)
    torch.manual_seed(0)
    spec = get_method("flow-matching")
    model = build_model(ModelConfig(arch="mlp", hidden=16, depth=2), (2,), spec.build().capabilities, kappa=10.0, sigma_0=1.0)
    cfg = EvalConfig(reference_estimator="hutchinson:2", naive_estimator="hutchinson:1", batch_size=64, rtol=1e-3, atol=1e-3)
    x = torch.randn(64, 2)
    reference(model, x, cfg, torch.device("cpu"))
    phase[0] = "naive"
    few_step_estimator(model, 1, cfg, torch.device("cpu"))(x, cfg.batch_size)
    assert drawn["reference"] and drawn["naive"]
    width = drawn["naive"][0].shape[1]  # the whole batch's probe; the reference's warm-up solve draws a smaller one
    ref_rows = torch.cat([eps for eps in drawn["reference"] if eps.shape[1] == width])  # one row per probe
    for eps in drawn["naive"]:
        for row in eps:
            # 64 x 2 Rademacher signs: an accidental match has probability 2^-128
            assert not (ref_rows == row).all(dim=1).any(), "the naive estimate reused a reference probe"
