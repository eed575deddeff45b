"""Every registered loss is zero at the nonlinear sinh flow map and positive off it, term by term.

The sinh flow (f2d2.analytic_sinh) has an x-dependent divergence head and a non-diagonal Jacobian,
so a divergence target read at the wrong point (Shortcut's second half at x instead of
x' = Phi(x, t, r), LSD's endpoint divergence at x_t instead of X = Phi(x_t, t, s)) or an Eulerian
mirror without its transport term (grad_x D) v leaves a non-zero loss at the exact map, which the
Gaussian fixture of tests/test_losses_closed_form.py cannot show. Methods regress on the exact
map as teacher ('distill' velocity rows), since x_1 - x_0 is not this flow's velocity.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from baselines import FORWARD_ONLY, METHODS, get_method
from f2d2.analytic_sinh import sinh_flow_map
from f2d2.method import DIV_DIAG, DIV_OFFDIAG, VELOCITY_DIAG, VELOCITY_OFFDIAG

F64 = torch.float64
SIGMA_0, KAPPA = 1.2, 2.0
BATCH = 256
ZERO_ATOL = 1e-9  # closed forms agree to ~1e-14, so squared residuals at the exact map are ~1e-25
# "clearly positive": the smallest mean term measured below is 3.9e-4 (Shortcut's L_D under
# div_error 0.2, where only a quarter of the rows bootstrap), 39x this bound
POSITIVE = 1e-5

FLOW_MAP = [n for n, spec in METHODS.items() if spec.cls.trains_flow_map]
F2D2 = [n for n, spec in METHODS.items() if spec.config.divergence is not None]
NAMES = list(METHODS) + [n + FORWARD_ONLY for n in FLOW_MAP]
F2D2_NAMES = F2D2 + [n + FORWARD_ONLY for n in F2D2]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared machine
    yield
    torch.set_num_threads(previous)


def exact(**errors):
    return sinh_flow_map((3,), SIGMA_0, KAPPA, **errors)


def data() -> torch.Tensor:
    """Exact samples of the flow's t = 1 marginal."""
    m = exact()
    return m.net.flow(m.sample_prior(BATCH, torch.Generator().manual_seed(0), dtype=F64), 0.0, 1.0)


def distilled(name: str, div_target: str = "teacher"):
    """The method ``name`` regressing its diagonal on the exact map as teacher; the divergence
    target is the teacher's or the model's own ('self', the registered F2D2 default)."""
    spec = get_method(name)
    changes = {"velocity_target": "teacher"}
    if hasattr(spec.config, "euler_smallest"):  # Euler half steps are not exact even for the exact map
        changes["euler_smallest"] = False
    cfg = replace(spec.config, **changes)
    if cfg.divergence is not None:
        cfg = replace(cfg, divergence=replace(cfg.divergence, target=div_target))
    return spec.build(cfg)


def loss_of(name: str, model, div_target: str = "teacher"):
    method = distilled(name, div_target)
    return method.loss(model, data(), generator=torch.Generator().manual_seed(1), teacher=exact())


def assert_zero(term: torch.Tensor) -> None:
    torch.testing.assert_close(term, torch.zeros_like(term), rtol=0, atol=ZERO_ATOL)


@pytest.mark.parametrize(
    "name, div_target", [(n, "teacher") for n in NAMES] + [(n, "self") for n in F2D2_NAMES]
)
def test_loss_is_zero_at_the_exact_nonlinear_map(name, div_target):
    loss = loss_of(name, exact(), div_target)
    assert loss.total.shape == (BATCH,)
    assert_zero(loss.total)
    expected = {VELOCITY_DIAG} | ({VELOCITY_OFFDIAG} if name in FLOW_MAP or name.endswith(FORWARD_ONLY) else set())
    if get_method(name).config.divergence is not None:
        expected |= {DIV_DIAG, DIV_OFFDIAG}
    assert set(loss.terms) == expected
    for term in loss.terms.values():
        assert_zero(term)


def test_the_bootstrap_and_meanflow_rows_cover_both_time_orders():
    """The zero-loss test is only as strong as the rows it sees: backward jumps are among them
    (LSD draws t and s independently inside its loss, so half its rows are backward by design)."""
    for name in ("shortcut-f2d2", "meanflow-f2d2"):
        method = distilled(name)
        gen = torch.Generator().manual_seed(1)
        sampler = method.sample_times if name.startswith("meanflow") else method.sample_steps
        t, s = sampler(BATCH, gen, data())
        assert (s > t).sum() > 10 and (s < t).sum() > 10, name


@pytest.mark.parametrize("name", NAMES)
def test_a_velocity_error_is_seen_on_and_off_the_diagonal(name):
    loss = loss_of(name, exact(velocity_error=0.1))
    assert loss.terms[VELOCITY_DIAG].mean() > POSITIVE
    if VELOCITY_OFFDIAG in loss.terms:
        assert loss.terms[VELOCITY_OFFDIAG].mean() > POSITIVE


@pytest.mark.parametrize("name", FLOW_MAP + [n + FORWARD_ONLY for n in FLOW_MAP])
def test_an_off_diagonal_velocity_error_is_seen_by_the_flow_map_condition(name):
    """u (1 + e (s - t)) is exact on the diagonal: only the base method's own condition sees it."""
    loss = loss_of(name, exact(velocity_error=0.1, offdiag_only=True))
    assert_zero(loss.terms[VELOCITY_DIAG])
    assert loss.terms[VELOCITY_OFFDIAG].mean() > POSITIVE


@pytest.mark.parametrize("div_target", ["teacher", "self"])
@pytest.mark.parametrize("name", F2D2_NAMES)
def test_a_divergence_error_is_seen_by_both_divergence_terms_only(name, div_target):
    loss = loss_of(name, exact(div_error=0.2), div_target)
    for term in (VELOCITY_DIAG, VELOCITY_OFFDIAG):
        assert_zero(loss.terms[term])
    assert loss.terms[DIV_DIAG].mean() > POSITIVE and loss.terms[DIV_OFFDIAG].mean() > POSITIVE
    # rows with s = t get exactly the diagonal error 0.2^2
    rows = loss.terms[DIV_DIAG] > 0
    assert rows.sum() > 10
    torch.testing.assert_close(loss.terms[DIV_DIAG][rows], torch.full_like(loss.terms[DIV_DIAG][rows], 0.2**2))


@pytest.mark.parametrize("div_target", ["teacher", "self"])
@pytest.mark.parametrize("name", F2D2_NAMES)
def test_an_off_diagonal_divergence_error_is_seen_by_the_mirror_alone(name, div_target):
    """D + e (s - t) is exact on the diagonal: L_div stays zero and the F2D2 mirror of the base
    condition (semigroup, Eulerian or Lagrangian) must see the error by itself."""
    loss = loss_of(name, exact(div_error=0.2, offdiag_only=True), div_target)
    for term in (VELOCITY_DIAG, VELOCITY_OFFDIAG, DIV_DIAG):
        assert_zero(loss.terms[term])
    assert loss.terms[DIV_OFFDIAG].mean() > POSITIVE
