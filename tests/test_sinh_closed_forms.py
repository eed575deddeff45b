"""Closed forms of the nonlinear, anisotropic sinh flow (f2d2.analytic_sinh) against the harness.

Unlike the Gaussian fixture, this flow has a divergence that depends on x and a non-diagonal,
non-symmetric Jacobian: a divergence read at the wrong end of a jump, a missing transport term or
a trusted Rademacher probe all change the numbers here. Float64 throughout; the closed forms agree
with each other to about 1e-14, so "exact" below means a few 1e-10 at most.
"""

from __future__ import annotations

import pytest
import torch

from f2d2 import Exact, Hutchinson, divergence, few_step_log_prob, naive_log_prob, reference_log_prob, sample
from f2d2.analytic_sinh import default_parameters, sinh_flow_map
from f2d2.guidance import guidance_objective, guide_noise
from f2d2.likelihood import Solver
from f2d2.sampling import time_grid

F64 = torch.float64
SIGMA_0, KAPPA = 1.2, 2.0
EXACT_ATOL = 1e-10  # closed forms agree to ~1e-14; compositions of 8 steps stay far below this
BATCH = 64


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared machine
    yield
    torch.set_num_threads(previous)


def model(shape=(3,), **errors):
    return sinh_flow_map(shape, SIGMA_0, KAPPA, **errors)


def draw_x0(m, num=BATCH, seed=0):
    return m.sample_prior(num, torch.Generator().manual_seed(seed), dtype=F64)


def draw_x1(m, num=BATCH, seed=1):
    """Exact samples of p_1: the flow of prior samples."""
    return m.net.flow(draw_x0(m, num, seed), 0.0, 1.0)


def log_p1(m, x):
    return m.net.log_prob(x, 1.0)


def times(value, n=BATCH):
    return torch.full((n,), value, dtype=F64)


# 1. The closed forms agree with each other and with autograd ---------------------------------


def test_fixture_has_structure_the_gaussian_lacks():
    """The point of this fixture: if these fail, the tests below cannot see wrong-point bugs."""
    m, x = model(), draw_x1(model())
    t = times(0.4)
    div = m.net.divergence(x, t)
    assert div.std() > 0.3, "divergence must vary with x"
    jac = m.net.velocity_jacobian(x, t)
    off = jac - torch.diag_embed(torch.diagonal(jac, dim1=1, dim2=2))
    # (it is a multiple of I only where all c_i tanh w_i coincide, so look at the typical point)
    assert off.abs().amax((1, 2)).median() > 0.2, "Jacobian must be non-diagonal"
    assert (jac - jac.transpose(1, 2)).abs().amax((1, 2)).median() > 0.2, "and non-symmetric"
    rates = default_parameters(3)["rate"]
    assert len(set(rates.abs().tolist())) == 3, "anisotropic: a different rate per dimension"


def test_identity_and_composition_in_every_order():
    m = model()
    x = draw_x1(m)
    t = torch.rand(BATCH, dtype=F64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(m.phi(x, t, t), x, rtol=0, atol=0)
    torch.testing.assert_close(m.net.flow(x, t, t), x, rtol=0, atol=1e-13)
    for a, b, c in [(0.1, 0.45, 0.9), (0.9, 0.45, 0.1), (0.2, 0.8, 0.5), (0.7, 0.0, 1.0), (1.0, 0.3, 0.0)]:
        mid = m.phi(x, a, b)
        torch.testing.assert_close(m.phi(mid, b, c), m.phi(x, a, c), rtol=1e-12, atol=1e-12)
        # the accumulated divergence (s - t) kappa D is additive along the trajectory
        acc = lambda y, t_, s_: (s_ - t_) * KAPPA * m(y, t_, s_).div  # noqa: E731
        torch.testing.assert_close(acc(x, a, b) + acc(mid, b, c), acc(x, a, c), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("step", [0.0, 1e-9, -1e-7, 5e-4, -2e-3, 0.3, -0.6])
def test_average_velocity_and_head_equal_the_flow_and_its_log_jacobian(step):
    """u and D (series branches near s = t) against Phi and log det dPhi/dx computed another way."""
    m = model()
    x, t = draw_x1(m), times(0.55)
    out = m(x, t, t + step)
    torch.testing.assert_close(x + step * out.u, m.net.flow(x, t, t + step), rtol=0, atol=1e-12)
    torch.testing.assert_close(step * KAPPA * out.div, m.net.log_det(x, t, t + step), rtol=0, atol=1e-12)
    if abs(step) < 1e-6:  # s -> t: D tends to div v / kappa and u to v, at first order in the step
        atol = 1e-12 + 100 * abs(step)  # |d_s u| and |d_s D| stay below 30 on these points
        torch.testing.assert_close(out.div, m.net.divergence(x, t) / KAPPA, rtol=0, atol=atol)
        torch.testing.assert_close(out.u, m.net.velocity(x, t), rtol=0, atol=atol)


def test_velocity_jacobian_and_divergence_match_autograd_and_the_exact_trace():
    m = model()
    x, t = draw_x1(m), times(0.3)
    # v is the s-derivative of Phi at s = t (forward-mode AD of the closed-form flow)
    _, dphi_ds = torch.func.jvp(lambda s: m.net.flow(x, t, s), (t,), (torch.ones_like(t),))
    torch.testing.assert_close(dphi_ds, m.net.velocity(x, t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m(x, t, t).u, m.net.velocity(x, t), rtol=1e-12, atol=1e-12)
    jac = torch.func.vmap(torch.func.jacrev(lambda y, tt: m.velocity(y[None], tt[None])[0]))(x, t)
    torch.testing.assert_close(jac, m.net.velocity_jacobian(x, t), rtol=1e-12, atol=1e-12)
    exact = divergence(lambda y: m.velocity(y, t), x, Exact(chunk_size=2))
    torch.testing.assert_close(exact.value, m.net.divergence(x, t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(KAPPA * m(x, t, t).div, exact.value, rtol=1e-12, atol=1e-12)


def test_log_density_is_the_change_of_variables_and_solves_the_continuity_equation():
    m = model()
    x = draw_x1(m, 16)
    # t = 0 is exactly the FlowMap's prior N(0, sigma_0^2 I)
    torch.testing.assert_close(m.net.log_prob(x, 0.0), m.prior_log_prob(x), rtol=0, atol=1e-12)
    # change of variables with a dense autograd Jacobian of x -> Phi(x, t, 0)
    tt = 0.65
    jac = torch.func.vmap(torch.func.jacrev(lambda y: m.net.flow(y[None], tt, 0.0)[0]))(x)
    expected = m.prior_log_prob(m.net.flow(x, tt, 0.0)) + torch.linalg.slogdet(jac)[1]
    torch.testing.assert_close(m.net.log_prob(x, tt), expected, rtol=0, atol=1e-11)
    # d_t log p + v . grad log p + div v = 0 (the log-density ODE seen from a fixed point)
    t = times(tt, 16)
    _, d_t = torch.func.jvp(lambda s: m.net.log_prob(x, s), (t,), (torch.ones_like(t),))
    v = m.net.velocity(x, t)
    _, transport = torch.func.jvp(lambda y: m.net.log_prob(y, t), (x,), (v,))
    torch.testing.assert_close(d_t + transport + m.net.divergence(x, t), torch.zeros(16, dtype=F64), rtol=0, atol=1e-11)


# 2. Likelihoods and sampling ------------------------------------------------------------------


def test_reference_dopri5_matches_the_closed_form():
    """Measured max error over these 32 points: 3.7e-7 nats at rtol = atol = 1e-7 (|log p| up to
    13.5; 62 NFE). The bound 1e-5 is 27x that, and a solver that ignored the requested tolerance
    fails it: the default 1e-5 leaves 6.1e-5."""
    m = model()
    x = draw_x1(m, 32)
    result = reference_log_prob(m.velocity, x, prior_log_prob=m.prior_log_prob, solver=Solver(rtol=1e-7, atol=1e-7))
    torch.testing.assert_close(result.log_p, log_p1(m, x), rtol=0, atol=1e-5)
    torch.testing.assert_close(result.x0, m.net.flow(x, 1.0, 0.0), rtol=0, atol=1e-5)
    assert result.stderr is None and result.nfe > 20


@pytest.mark.parametrize("num_steps", [1, 2, 3, 8])
def test_few_step_likelihood_with_trained_backward_maps_is_exact(num_steps):
    m = model()
    x = draw_x1(m)
    result = few_step_log_prob(m, x, num_steps, backward="trained")
    torch.testing.assert_close(result.log_p, log_p1(m, x), rtol=0, atol=EXACT_ATOL)
    torch.testing.assert_close(result.x0, m.net.flow(x, 1.0, 0.0), rtol=0, atol=EXACT_ATOL)
    assert result.nfe == num_steps
    torch.testing.assert_close(few_step_log_prob(m, x, num_steps).log_p, result.log_p, rtol=0, atol=0)  # 'auto'


@pytest.mark.parametrize("num_steps", [1, 2, 3, 8])
def test_joint_sampling_tracks_the_exact_log_density(num_steps):
    m = model()
    x0 = draw_x0(m)
    out = sample(m, x0, num_steps)
    torch.testing.assert_close(out.x, m.net.flow(x0, 0.0, 1.0), rtol=0, atol=EXACT_ATOL)
    torch.testing.assert_close(out.log_p, log_p1(m, out.x), rtol=0, atol=EXACT_ATOL)
    # and the two directions agree: the likelihood of a sample is the log_p it was drawn with
    back = few_step_log_prob(m, out.x, num_steps, backward="trained")
    torch.testing.assert_close(back.log_p, out.log_p, rtol=0, atol=EXACT_ATOL)
    torch.testing.assert_close(back.x0, x0, rtol=0, atol=EXACT_ATOL)


def test_image_shaped_data_is_flattened_consistently():
    m = model((1, 2, 2))
    x = draw_x1(m, 16)
    assert x.shape == (16, 1, 2, 2)
    torch.testing.assert_close(few_step_log_prob(m, x, 3).log_p, log_p1(m, x), rtol=0, atol=EXACT_ATOL)
    t = times(0.2, 16)
    exact = divergence(lambda y: m.velocity(y, t), x)
    torch.testing.assert_close(exact.value, m.net.divergence(x, t), rtol=1e-12, atol=1e-12)


def first_order_recurrence(m, x, num_steps):
    """METHOD.md's first-order backward map written with the closed forms: a step from t down to s
    uses the forward jump over [s, t] at the wrong endpoint, x <- x - (Phi(x, s, t) - x) and
    A <- A + log det dPhi(x, s, t)/dx."""
    grid = time_grid(num_steps, like=x, reverse=True)
    acc = torch.zeros(x.shape[0], dtype=x.dtype)
    for t, s in zip(grid[:-1].tolist(), grid[1:].tolist()):
        acc = acc + m.net.log_det(x, s, t)
        x = 2 * x - m.net.flow(x, s, t)
    return m.prior_log_prob(x) - acc


def test_first_order_backward_follows_its_definition_and_its_error_shrinks_like_one_over_k():
    m = model()
    x = draw_x1(m)
    for k in (1, 2, 3):
        got = few_step_log_prob(m, x, k, backward="first_order").log_p
        torch.testing.assert_close(got, first_order_recurrence(m, x, k), rtol=0, atol=EXACT_ATOL)
    truth = log_p1(m, x)
    errors = [
        (few_step_log_prob(m, x, k, backward="first_order").log_p - truth).abs().mean().item() for k in (8, 32, 128)
    ]
    assert errors[0] > 0.05, "the first-order map must not be exact on this flow"
    # O(1/K): 4x the steps, 4x smaller (measured ratios 3.59 and 3.91)
    assert 3.0 < errors[0] / errors[1] < 5.0 and 3.0 < errors[1] / errors[2] < 5.0, errors


def test_naive_likelihood_follows_its_definition():
    """K backward Euler steps of the joint ODE, v and div v both at the upper end of each step."""
    m = model()
    x1 = draw_x1(m, 32)
    for k in (1, 2, 3):
        grid = time_grid(k, like=x1, reverse=True)
        x, acc = x1, torch.zeros(32, dtype=F64)
        for t, s in zip(grid[:-1].tolist(), grid[1:].tolist()):
            acc = acc + (t - s) * m.net.divergence(x, t)
            x = x - (t - s) * m.net.velocity(x, t)
        expected = m.prior_log_prob(x) - acc
        torch.testing.assert_close(naive_log_prob(m, x1, k).log_p, expected, rtol=0, atol=EXACT_ATOL)


def test_guidance_objective_and_its_gradient_are_the_closed_form():
    """J(x_0) = -log p_1(Phi(x_0, 0, 1)); here kappa D(x_0, 0, 1) depends on x_0, so a dropped or
    misplaced divergence term changes the gradient, not just a constant."""
    m = model()
    x0 = draw_x0(m, 32)

    def closed(y):
        return -m.net.log_prob(m.net.flow(y, 0.0, 1.0), 1.0)

    torch.testing.assert_close(guidance_objective(m, x0), closed(x0), rtol=0, atol=1e-11)
    # without the prior: kappa D(x_0, 0, 1) = int_0^1 div v = log det dPhi(x_0, 0, 1)/dx
    div_part = guidance_objective(m, x0, prior_term=False)
    torch.testing.assert_close(div_part, m.net.log_det(x0, 0.0, 1.0), rtol=0, atol=1e-11)
    grad = torch.func.grad(lambda y: closed(y).sum())(x0)
    eta = 0.05
    # Adam's first step from zero moments is eta * sign(grad), up to its epsilon
    torch.testing.assert_close(guide_noise(m, x0, eta), x0 - eta * torch.sign(grad), rtol=0, atol=1e-6)
    prior_grad = x0 / SIGMA_0**2
    assert (torch.sign(grad) != torch.sign(prior_grad)).any(), "the divergence term must matter"


# 3. Hutchinson where probes are not exact -------------------------------------------------------


def probe_variance(jac: torch.Tensor, distribution: str) -> torch.Tensor:
    """Var(eps^T M eps) = (1/2) sum (M_ij + M_ji)^2 over i != j (Rademacher) or all i, j (Gaussian)."""
    sym = jac + jac.transpose(1, 2)
    if distribution == "rademacher":
        sym = sym - torch.diag_embed(torch.diagonal(sym, dim1=1, dim2=2))
    return 0.5 * sym.pow(2).sum((1, 2))


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_and_its_stderr_is_the_closed_form_one(distribution):
    m = model()
    x, t = draw_x1(m, 6), times(0.8, 6)
    num_probes = 4000
    field = lambda y: m.velocity(y, t)  # noqa: E731
    result = divergence(field, x, Hutchinson(num_probes, distribution), generator=torch.Generator().manual_seed(3))
    exact = m.net.divergence(x, t)
    z = (result.value - exact) / result.stderr
    assert torch.all(z.abs() < 4), z
    expected_stderr = (probe_variance(m.net.velocity_jacobian(x, t), distribution) / num_probes).sqrt()
    assert expected_stderr.min() > 1e-3, "probes must not be exact on this Jacobian"
    # relative spread of a sample std over 4000 draws: below 3 % here (kurtosis of eps^T M eps is small)
    torch.testing.assert_close(result.stderr, expected_stderr, rtol=0.1, atol=0)
    # a single Rademacher probe is no longer exact, unlike on a diagonal or isotropic Jacobian
    one = divergence(field, x, Hutchinson(1, distribution), generator=torch.Generator().manual_seed(4))
    assert (one.value - exact).abs().max() > 1e-2


def test_reference_with_fixed_probes_reports_a_standard_error_that_matches_its_error():
    """Fixed probes along the solve: each probe's integral is an unbiased estimate, so over many
    points the mean squared error equals the mean reported stderr^2. Measured over 20 seeds of this
    setting (256 points, 8 probes): ratio 0.76 to 1.29, mean 1.00; bounds [0.6, 1.6]. A stderr off
    by a factor sqrt(P) gives a ratio of 8 or 1/8."""
    m = model()
    x = draw_x1(m, 256, seed=5)
    result = reference_log_prob(
        m.velocity,
        x,
        prior_log_prob=m.prior_log_prob,
        estimator=Hutchinson(8),
        generator=torch.Generator().manual_seed(6),
    )  # the default solver's error (6e-5 above) is negligible beside a stderr of about 0.1
    error = result.log_p - log_p1(m, x)
    ratio = error.pow(2).mean() / result.stderr.pow(2).mean()
    assert 0.6 < ratio < 1.6, ratio
    assert result.stderr.mean() > 0.05, "fixed Rademacher probes are not exact on this flow"


# 4. Negative controls: the deliberate errors are visible -------------------------------------------


@pytest.mark.parametrize(
    "errors", [{"div_error": 0.01}, {"velocity_error": 0.01}, {"div_error": 0.01, "offdiag_only": True}]
)
def test_a_perturbed_map_is_not_exact(errors):
    m, truth_model = model(**errors), model()
    x = draw_x1(truth_model)
    gap = (few_step_log_prob(m, x, 2).log_p - log_p1(truth_model, x)).abs()
    assert gap.mean() > 1e-3
