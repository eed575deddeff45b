"""Self-guidance on the analytic Gaussian flow map, where J has a closed form."""

from __future__ import annotations

import math

import pytest
import torch

from f2d2.analytic import gaussian_flow_map
from f2d2.guidance import guidance_objective, guide_noise

MEAN = torch.tensor([1.0, -1.0], dtype=torch.float64)


def model():
    return gaussian_flow_map(MEAN, 0.5, 1.5, kappa=2.0)


def test_objective_is_minus_log_density_of_the_landing_point():
    m = model()
    x0 = torch.randn(16, 2, dtype=torch.float64)
    x1 = m.phi(x0, 0.0, 1.0)
    expected = -m.net.log_prob(x1, torch.ones(16, dtype=torch.float64))
    torch.testing.assert_close(guidance_objective(m, x0), expected)
    # without the prior term only kappa D(x_0, 0, 1) = int_0^1 div v = d log(s / sigma_0) remains, a constant here
    div_part = 2 * math.log(0.5 / 1.5)
    torch.testing.assert_close(guidance_objective(m, x0, prior_term=False), torch.full((16,), div_part, dtype=torch.float64))


def test_one_adam_step_is_a_sign_step_that_raises_the_likelihood():
    m = model()
    x0 = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eta = 0.05
    guided = guide_noise(m, x0, eta)
    # Adam's first step from zero moments is eta * sign(grad) (up to its epsilon): J = |x|^2 / (2 sigma_0^2) + c
    torch.testing.assert_close(guided, x0 - eta * torch.sign(x0), rtol=0, atol=1e-6)
    assert (guidance_objective(m, guided) < guidance_objective(m, x0)).float().mean() > 0.95
    assert all(p.grad is None for p in m.parameters())


def test_zero_eta_or_zero_steps_leave_noise_unchanged_and_samples_independent():
    m = model()
    x0 = torch.randn(8, 2, dtype=torch.float64)
    torch.testing.assert_close(guide_noise(m, x0, 0.0), x0)
    torch.testing.assert_close(guide_noise(m, x0, 0.3, num_steps=0), x0)
    torch.testing.assert_close(guide_noise(m, x0[:3], 0.1), guide_noise(m, x0, 0.1)[:3])
    with pytest.raises(ValueError):
        guide_noise(m, x0, -1.0)
