"""Each loss is zero at the exact flow map of Gaussian data and clearly positive off it."""

from __future__ import annotations

import pytest
import torch

from baselines import METHODS
from f2d2.analytic import gaussian_flow_map
from f2d2.divergence_loss import DivergenceLoss, scalar_squared_error
from f2d2.method import DIV_DIAG, DIV_OFFDIAG, VELOCITY_DIAG, VELOCITY_OFFDIAG
from f2d2.model import Capabilities, FlowMap, FlowMapNet, FlowMapOutput

MEAN = torch.tensor([1.0, -2.0], dtype=torch.float64)
STD, SIGMA_0, KAPPA = 0.5, 1.5, 3.0
BATCH = 256


def exact(**errors) -> FlowMap:
    return gaussian_flow_map(MEAN, STD, SIGMA_0, KAPPA, **errors)


def data() -> torch.Tensor:
    return MEAN + STD * torch.randn(BATCH, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def distilled(name: str, **changes):
    """The registered method, regressing on the (exact) teacher instead of x_1 - x_0."""
    from dataclasses import replace

    spec = METHODS[name]
    if hasattr(spec.config, "euler_smallest"):  # Euler half steps are not exact even for the exact map
        changes = {"euler_smallest": False, **changes}
    cfg = replace(spec.config, velocity_target="teacher", **changes)
    if cfg.divergence is not None:
        cfg = replace(cfg, divergence=replace(cfg.divergence, target="teacher"))
    return spec.build(cfg)


def flow_map_methods() -> list[str]:
    return [name for name, spec in METHODS.items() if spec.build().trains_flow_map]


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_loss_is_zero_at_the_exact_flow_map(name, bidirectional):
    if name == "flow-matching" and bidirectional:
        pytest.skip("flow matching trains no backward maps")
    method = distilled(name, bidirectional=bidirectional)
    teacher = exact()
    loss = method.loss(exact(), data(), generator=torch.Generator().manual_seed(1), teacher=teacher)
    assert loss.total.shape == (BATCH,)
    torch.testing.assert_close(loss.total, torch.zeros(BATCH, dtype=torch.float64), rtol=0, atol=1e-9)
    for term in loss.terms.values():
        torch.testing.assert_close(term, torch.zeros(BATCH, dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", list(METHODS))
def test_wrong_velocity_gives_positive_velocity_loss(name):
    method = distilled(name)
    loss = method.loss(exact(velocity_error=0.2), data(), generator=torch.Generator().manual_seed(1), teacher=exact())
    velocity = loss.terms[VELOCITY_DIAG] + loss.terms.get(VELOCITY_OFFDIAG, 0)
    assert velocity.mean() > 1e-2


@pytest.mark.parametrize("name", [n for n in METHODS if METHODS[n].config.divergence is not None])
def test_wrong_divergence_head_gives_positive_divergence_loss_only(name):
    method = distilled(name)
    loss = method.loss(exact(div_error=0.1), data(), generator=torch.Generator().manual_seed(1), teacher=exact())
    for term in (VELOCITY_DIAG, VELOCITY_OFFDIAG):
        torch.testing.assert_close(loss.terms[term], torch.zeros(BATCH, dtype=torch.float64), rtol=0, atol=1e-9)
    assert loss.terms[DIV_DIAG].sum() > 0 and loss.terms[DIV_OFFDIAG].sum() > 0
    # rows with s = t get exactly the diagonal error 0.1^2
    diag_rows = loss.terms[DIV_DIAG] > 0
    torch.testing.assert_close(loss.terms[DIV_DIAG][diag_rows], torch.full_like(loss.terms[DIV_DIAG][diag_rows], 0.01))


def test_flow_map_methods_are_registered():
    assert "meanflow" in flow_map_methods() and "meanflow-f2d2" in flow_map_methods()


class BroadcastingHead(FlowMapNet):
    """Returns the divergence head as (B, 1), the shape bug of the authors' PyTorch code."""

    def __init__(self, inner: FlowMapNet) -> None:
        super().__init__()
        self.inner, self.data_shape, self.has_div_head = inner, inner.data_shape, True

    def forward(self, x, t, s):
        out = self.inner(x, t, s)
        return FlowMapOutput(out.u, out.div[:, None])


def test_prediction_target_shape_broadcast_is_caught():
    with pytest.raises(ValueError, match="must both be \\(B,\\)"):
        scalar_squared_error(torch.zeros(4), torch.zeros(4, 1))
    # and end to end through a loss: a (B, 1) head never silently becomes a (B, B) loss
    model = exact()
    bad = FlowMap(BroadcastingHead(model.net), Capabilities(True, True, True), kappa=KAPPA, sigma_0=SIGMA_0)
    for name in [n for n in METHODS if METHODS[n].config.divergence is not None]:
        with pytest.raises(ValueError, match="\\(B,\\)"):
            distilled(name).loss(bad, data(), generator=torch.Generator().manual_seed(1), teacher=model)


def test_self_divergence_target_equals_teacher_target_at_the_exact_map():
    from dataclasses import replace

    spec = METHODS["meanflow-f2d2"]
    cfg = replace(spec.config, velocity_target="teacher", divergence=DivergenceLoss(target="self"))
    loss = spec.build(cfg).loss(exact(), data(), generator=torch.Generator().manual_seed(2), teacher=exact())
    torch.testing.assert_close(loss.total, torch.zeros(BATCH, dtype=torch.float64), rtol=0, atol=1e-9)


def test_shortcut_smallest_step_uses_euler_half_steps():
    """With euler_smallest the exact map's loss is no longer zero on the smallest step only, by
    the Euler error of two half steps (second order in the step)."""
    from dataclasses import replace

    spec = METHODS["shortcut-distill"]
    method = spec.build(replace(spec.config, bootstrap_fraction=1.0, num_levels=2))
    loss = method.loss(exact(), data(), generator=torch.Generator().manual_seed(3), teacher=exact())
    velocity = loss.terms[VELOCITY_OFFDIAG]
    assert velocity.max() > 1e-6  # the d = 1/2 rows see the Euler error
    strict = spec.build(replace(spec.config, bootstrap_fraction=1.0, num_levels=2, euler_smallest=False))
    loss = strict.loss(exact(), data(), generator=torch.Generator().manual_seed(3), teacher=exact())
    torch.testing.assert_close(loss.terms[VELOCITY_OFFDIAG], torch.zeros(BATCH, dtype=torch.float64), rtol=0, atol=1e-9)
