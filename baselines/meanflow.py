"""MeanFlow and MeanFlow-F2D2: the Eulerian (MeanFlow) identity, for the velocity and the divergence.

In our convention (t = 0 noise, s > t samples) the average velocity satisfies
    u(x_t, t, s) = v(x_t, t) + (s - t) du/dt,   du/dt = d_t u + (grad_x u) v,
one forward-mode JVP of (x, t, s) -> u with tangent (v, 1, 0) (Geng et al., arXiv:2505.13447, Eq. 6,
converted from their data-at-t=0 convention). The F2D2 variant mirrors it for the divergence head,
D(x_t, t, s) = div w(x_t, t) / kappa + (s - t) dD/dt, with dD/dt from the same JVP
(arXiv:2512.02636, Sec. 3; METHOD.md Sec. 3).

Under a reduced-precision autocast the JVP runs in float32 without a graph (it only feeds the
targets) and the prediction comes from one more forward in the reduced precision (f2d2/precision.py);
with dropout the two calls then draw different masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from f2d2.divergence_loss import eulerian_target, scalar_squared_error
from f2d2.method import (
    DIV_DIAG,
    DIV_OFFDIAG,
    VELOCITY_DIAG,
    VELOCITY_OFFDIAG,
    Loss,
    Method,
    MethodConfig,
    adaptive_weight,
    interpolate,
    squared_norm,
)
from f2d2.model import FlowMap, batch_view
from f2d2.precision import as_float32, autocast_active, full_precision


@dataclass(frozen=True)
class MeanFlowConfig(MethodConfig):
    """MeanFlow's recipe (arXiv:2505.13447, Sec. 4).

    Attributes:
        diag_fraction: share of rows with s = t (plain flow matching rows).
        time_sampler: 'logit_normal' or 'uniform' for the two times.
        logit_mean, logit_std: logit-normal parameters in MeanFlow's own time (data at 0); a draw
            tau maps to our time as 1 - tau.
        adaptive_power, adaptive_eps: adaptive weight L / sg((L + eps)^p); power 0 disables it.
    """

    diag_fraction: float = 0.25
    time_sampler: str = "logit_normal"
    logit_mean: float = -0.4
    logit_std: float = 1.0
    adaptive_power: float = 0.75
    adaptive_eps: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.diag_fraction <= 1.0:
            raise ValueError(f"diag_fraction must lie in [0, 1], got {self.diag_fraction}")
        if self.time_sampler not in ("logit_normal", "uniform"):
            raise ValueError(f"time_sampler must be 'logit_normal' or 'uniform', got {self.time_sampler!r}")


class MeanFlow(Method):
    """MeanFlow (from scratch or distilled) with optional F2D2 divergence head."""

    Config = MeanFlowConfig

    def sample_times(self, num: int, generator: torch.Generator, like: Tensor) -> tuple[Tensor, Tensor]:
        """(t, s) of shape (num,): t <= s (forward rows), s = t on a diag_fraction of rows,
        and, if bidirectional, the order swapped on half of the other rows."""
        cfg = self.config
        kw = dict(generator=generator, dtype=like.dtype, device=like.device)
        if cfg.time_sampler == "uniform":
            a, b = torch.rand(num, **kw), torch.rand(num, **kw)
        else:
            a = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(num, **kw))
            b = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(num, **kw))
        # MeanFlow jumps from its (noisier) larger time to the smaller one; ours run 1 - tau.
        t, s = 1 - torch.maximum(a, b), 1 - torch.minimum(a, b)
        num_diag = round(cfg.diag_fraction * num)
        s = torch.cat([t[:num_diag], s[num_diag:]])
        if cfg.bidirectional:
            swap = torch.rand(num, **kw) < 0.5
            swap[:num_diag] = False
            t, s = torch.where(swap, s, t), torch.where(swap, t, s)
        return t, s

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
        x0 = model.sample_prior(num, generator, dtype=x1.dtype, device=x1.device)
        t, s = self.sample_times(num, generator, x1)
        x_t = interpolate(x0, x1, t)
        v = self.velocity_target(x_t, t, x0, x1, teacher)
        with_div = cfg.divergence is not None

        def fn(x: Tensor, t_: Tensor, s_: Tensor) -> tuple[Tensor, ...]:
            out = model(x, t_, s_)
            return (out.u, out.div) if with_div else (out.u,)

        if autocast_active(x_t):  # reduced precision: the JVP (targets only) in float32, the prediction apart
            v = as_float32(v, x_t)
            with torch.no_grad(), full_precision(x_t):
                _, tangent = torch.func.jvp(fn, (x_t, t, s), (v, torch.ones_like(t), torch.zeros_like(s)))
            primal = fn(x_t, t, s)
        else:
            primal, tangent = torch.func.jvp(fn, (x_t, t, s), (v, torch.ones_like(t), torch.zeros_like(s)))
        step = s - t
        u_target = (v + batch_view(step, v) * tangent[0]).detach()
        velocity = squared_norm(primal[0] - u_target)
        diag = (step == 0).to(x1.dtype)
        terms = {VELOCITY_DIAG: velocity * diag, VELOCITY_OFFDIAG: velocity * (1 - diag)}
        p, c = cfg.adaptive_power, cfg.adaptive_eps
        total = adaptive_weight(velocity, p, c)
        if with_div:
            div_diag = self.divergence_target(model, x_t, t, teacher, generator)
            div = scalar_squared_error(primal[1], eulerian_target(div_diag, tangent[1], step))
            terms[DIV_DIAG], terms[DIV_OFFDIAG] = div * diag, div * (1 - diag)
            weights = self.term_weights
            weight = weights[DIV_DIAG] * diag + weights[DIV_OFFDIAG] * (1 - diag)
            total = total + weight * adaptive_weight(div, p, c)
        return Loss(total, terms)
