"""Flow matching, the teacher: regress u(x_t, t, t) on the conditional velocity x_1 - x_0.

L_VM = || u(x_t, t, t) - (x_1 - x_0) ||^2 with t ~ U[0, 1] (Lipman et al., arXiv:2210.02747;
Liu et al., arXiv:2209.03003), or t = sigmoid(z), z ~ N(logit_mean, logit_std^2), the logit-normal
times of the authors' CIFAR-10 teacher (Keely-Ai/F2D2, FMLoss: sigma = exp(N(-1.2, 1.2^2)),
t = 1 / (1 + sigma), i.e. logit t ~ N(1.2, 1.2^2), skewed towards the data at t = 1).
No flow map is trained: sampling takes Euler steps of v.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch
from torch import Tensor

from f2d2.method import Loss, Method, MethodConfig, combine, interpolate
from f2d2.model import FlowMap


@dataclass(frozen=True)
class FlowMatchingConfig(MethodConfig):
    """Attributes:
        time_sampler: 'uniform' (t ~ U[0, 1)) or 'logit_normal' (logit t ~ N(logit_mean, logit_std^2),
            in our time: t = 1 is data).
    """

    time_sampler: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    KEY_OMITS_DEFAULT: typing.ClassVar[tuple[str, ...]] = ("time_sampler", "logit_mean", "logit_std")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.time_sampler not in ("uniform", "logit_normal"):
            raise ValueError(f"time_sampler must be 'uniform' or 'logit_normal', got {self.time_sampler!r}")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")


class FlowMatching(Method):
    """Conditional flow matching with the linear interpolant."""

    Config = FlowMatchingConfig
    trains_flow_map = False

    def __init__(self, config: MethodConfig | None = None) -> None:
        super().__init__(config)
        if self.config.divergence is not None or self.config.bidirectional:
            raise ValueError("flow matching trains no flow map: no divergence head, no backward rows")

    def sample_times(self, num: int, generator: torch.Generator, like: Tensor) -> Tensor:
        """(num,) training times in [0, 1]."""
        kw = dict(generator=generator, dtype=like.dtype, device=like.device)
        if self.config.time_sampler == "uniform":
            return torch.rand(num, **kw)
        return torch.sigmoid(self.config.logit_mean + self.config.logit_std * torch.randn(num, **kw))

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
        t = self.sample_times(x1.shape[0], generator, x1)
        x_t = interpolate(x0, x1, t)
        target = self.velocity_target(x_t, t, x0, x1, teacher)
        return combine(self.diagonal_loss(model, x_t, t, target, None), {})
