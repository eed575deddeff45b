"""Closed forms for Gaussian data x_1 ~ N(m, s^2 I) under the linear interpolant (f2d2.analytic)."""

from __future__ import annotations

import math

import pytest
import torch

from f2d2 import Exact, Hutchinson, few_step_log_prob, naive_log_prob, reference_log_prob, sample
from f2d2.analytic import gaussian_flow_map
from f2d2.likelihood import Solver

MEAN = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
STD, SIGMA_0, KAPPA = 0.5, 1.5, 3.0


@pytest.fixture
def model():
    return gaussian_flow_map(MEAN, STD, SIGMA_0, KAPPA)


@pytest.fixture
def data():
    return MEAN + STD * torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def true_log_p(model, x, t=1.0):
    return model.net.log_prob(x, torch.full((x.shape[0],), t, dtype=x.dtype))


def test_analytic_density_is_the_gaussian(model, data):
    # at t = 1 the marginal is N(m, s^2 I): compare with torch.distributions
    ref = torch.distributions.Normal(MEAN, STD).log_prob(data).sum(1)
    torch.testing.assert_close(true_log_p(model, data), ref)
    # at t = 0 it is the prior
    torch.testing.assert_close(true_log_p(model, data, 0.0), model.prior_log_prob(data))


def test_reference_dopri5_matches_analytic_log_density(model, data):
    result = reference_log_prob(model.velocity, data, prior_log_prob=model.prior_log_prob)
    torch.testing.assert_close(result.log_p, true_log_p(model, data), rtol=0, atol=1e-4)
    assert result.stderr is None and result.nfe > 10


def test_reference_euler_converges_at_first_order(model, data):
    errors = []
    for steps in (64, 256):
        result = reference_log_prob(model.velocity, data, prior_log_prob=model.prior_log_prob, solver=Solver.parse(f"euler:{steps}"))
        errors.append((result.log_p - true_log_p(model, data)).abs().max().item())
        assert result.nfe == steps
    assert 3 < errors[0] / errors[1] < 5  # error O(1/N): 4x fewer steps, 4x the error


def test_reference_hutchinson_with_fixed_probes_reports_stderr(model, data):
    gen = torch.Generator().manual_seed(0)
    result = reference_log_prob(
        model.velocity, data, prior_log_prob=model.prior_log_prob, estimator=Hutchinson(8), generator=gen
    )
    # the field is isotropic (J = c I), so each Rademacher probe gives the exact trace
    torch.testing.assert_close(result.log_p, true_log_p(model, data), rtol=0, atol=1e-4)
    assert result.stderr is not None and result.stderr.shape == (64,)


def test_flow_map_identity_and_semigroup_both_orders(model, data):
    t = torch.rand(64, dtype=torch.float64)
    torch.testing.assert_close(model.phi(data, t, t), data, rtol=0, atol=0)
    for a, b, c in [(0.1, 0.45, 0.9), (0.9, 0.45, 0.1), (0.2, 0.8, 0.5)]:
        direct = model.phi(data, a, c)
        composed = model.phi(model.phi(data, a, b), b, c)
        torch.testing.assert_close(direct, composed, rtol=1e-12, atol=1e-12)
        # the accumulated divergence is additive too
        def acc(x, t, s):
            return (s - t) * KAPPA * model(x, t, s).div

        torch.testing.assert_close(acc(data, a, c), acc(data, a, b) + acc(model.phi(data, a, b), b, c))


def test_one_step_joint_likelihood_is_exact(model, data):
    for steps in (1, 2, 4, 8):
        result = few_step_log_prob(model, data, steps, backward="trained")
        torch.testing.assert_close(result.log_p, true_log_p(model, data), rtol=0, atol=1e-10)
        assert result.nfe == steps


def test_first_order_backward_error_shrinks_with_steps(model, data):
    errors = [
        (few_step_log_prob(model, data, k, backward="first_order").log_p - true_log_p(model, data)).abs().mean().item()
        for k in (1, 4, 16, 64)
    ]
    assert errors[0] > 0.1, "first-order backward must not be exact for this flow"
    assert all(b < a for a, b in zip(errors, errors[1:]))
    assert errors[-1] < errors[0] / 10


def test_joint_sampling_tracks_exact_log_density(model):
    x0 = model.sample_prior(32, torch.Generator().manual_seed(0), dtype=torch.float64)
    for steps in (1, 3):
        out = sample(model, x0, steps)
        torch.testing.assert_close(out.log_p, true_log_p(model, out.x), rtol=0, atol=1e-10)


def test_naive_likelihood_converges_to_the_truth(model, data):
    coarse = naive_log_prob(model, data, 2)
    fine = naive_log_prob(model, data, 512, estimator=Exact())
    truth = true_log_p(model, data)
    assert (coarse.log_p - truth).abs().mean() > 0.05
    torch.testing.assert_close(fine.log_p, truth, rtol=0, atol=5e-2)


def test_divergence_head_diagonal_is_velocity_divergence(model, data):
    from f2d2.divergence import divergence

    t = torch.full((64,), 0.3, dtype=torch.float64)
    div = divergence(lambda x: model.velocity(x, t), data).value
    torch.testing.assert_close(model(data, t, t).div * KAPPA, div)
    # and the off-diagonal head approaches it as s -> t
    near = model(data, t, t + 1e-4).div * KAPPA
    torch.testing.assert_close(near, div, rtol=1e-3, atol=1e-3)


def test_prior_log_prob_closed_form(model):
    x = torch.zeros(1, 3, dtype=torch.float64)
    expected = -1.5 * math.log(2 * math.pi * SIGMA_0**2)
    assert math.isclose(model.prior_log_prob(x).item(), expected, rel_tol=1e-12)


def test_exact_sample_lands_on_the_flow_map_with_the_analytic_log_density(model):
    """The forward exact ODE (the proposal of the importance-sampled mass) from prior noise: its
    endpoint is Phi(x_0, 0, 1) and its log-density the Gaussian's, for exact and Hutchinson traces."""
    from f2d2.likelihood import Solver, exact_sample

    x0 = model.sample_prior(64, torch.Generator().manual_seed(3)).double()
    solver = Solver("dopri5", 1e-9, 1e-9)
    out = exact_sample(model.velocity, x0, prior_log_prob=model.prior_log_prob, solver=solver)
    torch.testing.assert_close(out.x, model.phi(x0, 0.0, 1.0), atol=1e-7, rtol=0)
    torch.testing.assert_close(out.log_p, true_log_p(model, out.x), atol=1e-7, rtol=0)
    assert out.stderr is None and out.nfe > 0
    # isotropic Jacobian: every Rademacher probe is exact, so the probe spread is zero
    hutch = exact_sample(model.velocity, x0, prior_log_prob=model.prior_log_prob, solver=solver,
                         estimator=Hutchinson(3), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hutch.log_p, out.log_p, atol=1e-7, rtol=0)
