"""Lagrangian self-distillation (LSD) and LSD-F2D2: d/ds Phi(x, t, s) = v(Phi(x, t, s), s).

Diagonal rows regress u(x_t, t, t) on x_1 - x_0 (or a teacher). Off-diagonal rows draw t, s
independently on [0, 1]^2 (both orders, so backward maps are trained) and match the s-derivative
of the flow map, one forward-mode JVP in s, to the model's own instantaneous velocity at the
endpoint (Boffi et al., arXiv:2505.18825):
    L_u = || d_s Phi(x_t, t, s) - sg[v(sg[Phi(x_t, t, s)], s)] ||^2.
The F2D2 mirror (arXiv:2512.02636; METHOD.md Sec. 3), with X = sg[Phi(x_t, t, s)]:
    L_D = ( D(x_t, t, s) + (s - t) sg[d_s D(x_t, t, s)] - sg[div v(X, s)] / kappa )^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from f2d2.divergence import divergence
from f2d2.divergence_loss import lagrangian_residual
from f2d2.method import (
    DIV_OFFDIAG,
    VELOCITY_OFFDIAG,
    Loss,
    Method,
    MethodConfig,
    combine,
    concat_rows,
    interpolate,
    squared_norm,
)
from f2d2.model import FlowMap, batch_view
from f2d2.precision import full_precision


@dataclass(frozen=True)
class LSDConfig(MethodConfig):
    """Attributes:
        diag_fraction: share of diagonal (flow-matching) rows; the authors use 1/2.
        offdiag_field: whose velocity v (and divergence) the Lagrangian condition uses at the
            endpoint: 'self' (the model's own diagonal, the authors' choice) or 'teacher'.
        bidirectional: t and s independent on [0, 1]^2 (True, as the authors) or sorted t <= s.
    """

    diag_fraction: float = 0.5
    offdiag_field: str = "self"
    bidirectional: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.diag_fraction <= 1.0:
            raise ValueError(f"diag_fraction must lie in [0, 1], got {self.diag_fraction}")
        if self.offdiag_field not in ("self", "teacher"):
            raise ValueError(f"offdiag_field must be 'self' or 'teacher', got {self.offdiag_field!r}")


class LSD(Method):
    """LSD, with the Lagrangian divergence mirror when a divergence loss is set."""

    Config = LSDConfig

    @property
    def needs_teacher(self) -> bool:
        return super().needs_teacher or self.config.offdiag_field == "teacher"

    def loss(
        self,
        model: FlowMap,
        x1: Tensor,
        *,
        generator: torch.Generator,
        teacher: FlowMap | None = None,
        ema: FlowMap | None = None,
    ) -> Loss:
        self.check_teacher(teacher)
        cfg = self.config
        num = x1.shape[0]
        num_diag = round(cfg.diag_fraction * num)
        kw = dict(generator=generator, dtype=x1.dtype, device=x1.device)
        x0 = model.sample_prior(num, generator, dtype=x1.dtype, device=x1.device)
        t = torch.rand(num, **kw)
        x_t = interpolate(x0, x1, t)
        xd, td = x_t[:num_diag], t[:num_diag]
        div_target = self.divergence_target(model, xd, td, teacher, generator) if cfg.divergence else None
        target = self.velocity_target(xd, td, x0[:num_diag], x1[:num_diag], teacher)
        diag = self.diagonal_loss(model, xd, td, target, div_target)
        s = torch.rand(num - num_diag, **kw)
        to, so = t[num_diag:], s
        if not cfg.bidirectional:
            to, so = torch.minimum(to, so), torch.maximum(to, so)
            x_off = interpolate(x0[num_diag:], x1[num_diag:], to)
        else:
            x_off = x_t[num_diag:]
        field = teacher if cfg.offdiag_field == "teacher" else model
        off = self.lagrangian_terms(model, field, x_off, to, so, generator)
        return combine(concat_rows((diag, num_diag), (off, num - num_diag)), self.term_weights)

    def lagrangian_terms(
        self, model: FlowMap, field: FlowMap, x: Tensor, t: Tensor, s: Tensor, generator: torch.Generator
    ) -> dict[str, Tensor]:
        """L_u (and L_D) of the Lagrangian condition on rows (x, t, s).

        In float32 also under a reduced-precision autocast: the JVP that gives the prediction
        d_s Phi also gives the target piece sg[d_s D], and the endpoint field is a target
        (f2d2/precision.py)."""
        with full_precision(x):
            return self._lagrangian_terms(model, field, x, t, s, generator)

    def _lagrangian_terms(
        self, model: FlowMap, field: FlowMap, x: Tensor, t: Tensor, s: Tensor, generator: torch.Generator
    ) -> dict[str, Tensor]:
        with_div = self.config.divergence is not None

        def fn(s_: Tensor) -> tuple[Tensor, ...]:
            out = model(x, t, s_)
            return (out.u, out.div) if with_div else (out.u,)

        primal, tangent = torch.func.jvp(fn, (s,), (torch.ones_like(s),))
        step = s - t
        dphi_ds = primal[0] + batch_view(step, x) * tangent[0]  # d_s [x + (s - t) u]
        end = (x + batch_view(step, x) * primal[0]).detach()
        with torch.no_grad():
            if with_div:
                div = divergence(lambda y: field.velocity(y, s), end, self.config.divergence.estimator, generator=generator)
                v_end, div_end = div.output, div.value / model.kappa
            else:
                v_end = field.velocity(end, s)
        terms = {VELOCITY_OFFDIAG: squared_norm(dphi_ds - v_end.detach())}
        if with_div:
            terms[DIV_OFFDIAG] = lagrangian_residual(primal[1], tangent[1], step, div_end).pow(2)
        return terms
