"""Flow matching, the teacher: regress u(x_t, t, t) on the conditional velocity x_1 - x_0.

L_VM = || u(x_t, t, t) - (x_1 - x_0) ||^2 with t ~ U[0, 1] (Lipman et al., arXiv:2210.02747;
Liu et al., arXiv:2209.03003). No flow map is trained: sampling takes Euler steps of v.
"""

from __future__ import annotations

import torch
from torch import Tensor

from f2d2.method import Loss, Method, MethodConfig, combine, interpolate
from f2d2.model import FlowMap


class FlowMatching(Method):
    """Conditional flow matching with the linear interpolant."""

    trains_flow_map = False

    def __init__(self, config: MethodConfig | None = None) -> None:
        super().__init__(config)
        if self.config.divergence is not None or self.config.bidirectional:
            raise ValueError("flow matching trains no flow map: no divergence head, no backward rows")

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
        x0 = model.sample_prior(x1.shape[0], generator, dtype=x1.dtype, device=x1.device)
        t = torch.rand(x1.shape[0], generator=generator, dtype=x1.dtype, device=x1.device)
        x_t = interpolate(x0, x1, t)
        target = self.velocity_target(x_t, t, x0, x1, teacher)
        return combine(self.diagonal_loss(model, x_t, t, target, None), {})
