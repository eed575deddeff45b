"""Shortcut models and their F2D2 variant: the semigroup (self-consistency) condition.

Flow-matching rows regress u(x_t, t, t) on x_1 - x_0 (or, for Shortcut-Distill, on a frozen
teacher's velocity). Bootstrap rows take a step d in {1, 1/2, ..., 1/2^(L-1)}, a start t on the
d-grid, the midpoint r = t + d/2 and the target built from two half jumps of the model (or its EMA)
under no_grad (Frans et al., arXiv:2410.12557, Eq. 5):
    u* = (u(x, t, r) + u(x', r, t + d)) / 2,   x' = Phi(x, t, r).
The F2D2 variant mirrors it for the divergence head, D* = (D(x, t, r) + D(x', r, t + d)) / 2
(arXiv:2512.02636, Sec. 3). Bidirectional training adds rows with negative steps (t on the grid
from 1 downwards), so trained backward maps exist for likelihoods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from f2d2.divergence_loss import scalar_squared_error, semigroup_target
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
class ShortcutConfig(MethodConfig):
    """Attributes:
        bootstrap_fraction: share of rows with the self-consistency target (kvfrans: 1/8 to 1/4).
        num_levels: number of step sizes, d in {1, ..., 2^-(num_levels - 1)} (7: down to 1/64).
        target_model: 'model' (the live weights) or 'ema' to build u*, D* under no_grad.
        euler_smallest: build the smallest step's target from Euler half steps of the
            instantaneous field (its half jumps are never trained), as Shortcut does.
    """

    bootstrap_fraction: float = 0.25
    num_levels: int = 7
    target_model: str = "model"
    euler_smallest: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.bootstrap_fraction <= 1.0:
            raise ValueError(f"bootstrap_fraction must lie in [0, 1], got {self.bootstrap_fraction}")
        if self.num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {self.num_levels}")
        if self.target_model not in ("model", "ema"):
            raise ValueError(f"target_model must be 'model' or 'ema', got {self.target_model!r}")


class Shortcut(Method):
    """Shortcut / Shortcut-Distill, with the F2D2 semigroup mirror when a divergence loss is set."""

    Config = ShortcutConfig

    def sample_steps(self, num: int, generator: torch.Generator, like: Tensor) -> tuple[Tensor, Tensor]:
        """(t, s) on the dyadic grids: s - t = +-d, t a multiple of d (from 1 downwards if negative)."""
        kw = dict(generator=generator, device=like.device)
        level = torch.randint(0, self.config.num_levels, (num,), **kw)
        d = 0.5 ** level.to(like.dtype)
        k = torch.floor(torch.rand(num, **kw).to(like.dtype) / d)  # k in {0, ..., 1/d - 1}
        t, s = k * d, (k + 1) * d
        if self.config.bidirectional:
            back = torch.rand(num, **kw) < 0.5
            t, s = torch.where(back, 1 - t, t), torch.where(back, 1 - s, s)
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
        num_boot = round(cfg.bootstrap_fraction * num)
        x0 = model.sample_prior(num, generator, dtype=x1.dtype, device=x1.device)
        # flow-matching rows: s = t
        xf0, xf1 = x0[num_boot:], x1[num_boot:]
        tf = torch.rand(num - num_boot, generator=generator, dtype=x1.dtype, device=x1.device)
        xf = interpolate(xf0, xf1, tf)
        div_target = self.divergence_target(model, xf, tf, teacher, generator) if cfg.divergence else None
        diag = self.diagonal_loss(model, xf, tf, self.velocity_target(xf, tf, xf0, xf1, teacher), div_target)
        # bootstrap rows: one jump of size d against two half jumps
        t, s = self.sample_steps(num_boot, generator, x1)
        x = interpolate(x0[:num_boot], x1[:num_boot], t)
        if cfg.target_model == "ema" and ema is None:
            raise ValueError("target_model 'ema' needs the EMA model (the training loop passes it)")
        boot = self.bootstrap_terms(model, x, t, s, ema if cfg.target_model == "ema" else model)
        terms = concat_rows((boot, num_boot), (diag, num - num_boot))
        return combine(terms, self.term_weights)

    def bootstrap_terms(self, model: FlowMap, x: Tensor, t: Tensor, s: Tensor, target_net: FlowMap) -> dict[str, Tensor]:
        """L_u (and L_D) of the semigroup condition on rows (x, t, s) with midpoint r.

        The half jumps of the smallest step are never trained themselves, so they are taken as
        Euler steps of the instantaneous field (s = t inputs), as Shortcut queries its
        flow-matching level there. The targets u*, D* are computed in float32 also under a
        reduced-precision autocast (f2d2/precision.py)."""
        r = 0.5 * (t + s)
        smallest = ((s - t).abs() <= 0.5 ** (self.config.num_levels - 1) + 1e-9) & self.config.euler_smallest
        with torch.no_grad(), full_precision(x):
            first = target_net(x, t, torch.where(smallest, t, r))
            x_mid = x + batch_view(r - t, x) * first.u
            second = target_net(x_mid, r, torch.where(smallest, r, s))
            u_target = 0.5 * (first.u + second.u)
        pred = model(x, t, s)
        terms = {VELOCITY_OFFDIAG: squared_norm(pred.u - u_target)}
        if self.config.divergence is not None:
            terms[DIV_OFFDIAG] = scalar_squared_error(pred.div, semigroup_target(first.div, second.div).detach())
        return terms
