"""The interface every training method implements, and the pieces they share.

A method is a loss on a :class:`~f2d2.model.FlowMap`: ``loss(model, x1, ...)`` draws noise and
times itself (from the given generator) and returns an unreduced per-sample :class:`Loss`.
Base methods (flow matching, Shortcut, MeanFlow, LSD) live in ``baselines/``; an F2D2 variant is the
same class with a :class:`~f2d2.divergence_loss.DivergenceLoss` in its config.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from f2d2.divergence_loss import DivergenceLoss, diagonal_divergence_target, scalar_squared_error
from f2d2.model import Capabilities, FlowMap, batch_view

# Names of the loss terms, shared by logs and tables (arXiv:2512.02636, Eq. 10-13).
VELOCITY_DIAG = "velocity_diag"  # L_VM: u(x_t, t, t) against the (conditional or teacher) velocity
VELOCITY_OFFDIAG = "velocity_offdiag"  # L_u: the base method's flow-map condition
DIV_DIAG = "div_diag"  # L_div: D(x_t, t, t) against div w / kappa
DIV_OFFDIAG = "div_offdiag"  # L_D: the divergence mirror of the flow-map condition


@dataclass(frozen=True)
class Loss:
    """Per-sample loss.

    Attributes:
        total: (B,) weighted sum of the terms; the training loop takes its mean.
        terms: name -> (B,) unweighted terms, zero on rows a term does not apply to.
    """

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in {"total": self.total, **self.terms}.items():
            if value.ndim != 1 or value.shape != self.total.shape:
                raise ValueError(f"loss term {name!r} has shape {tuple(value.shape)}, expected (B,)")


@dataclass(frozen=True)
class MethodConfig:
    """Options shared by all methods.

    Attributes:
        divergence: the F2D2 divergence terms; None for a base method without a head.
        bidirectional: also train flow-map rows with s < t (exact backward maps).
        velocity_target: regress the diagonal on the conditional velocity x_1 - x_0 ('conditional')
            or on a frozen flow-matching teacher ('teacher', the distill variants).
    """

    divergence: DivergenceLoss | None = None
    bidirectional: bool = False
    velocity_target: str = "conditional"

    def __post_init__(self) -> None:
        if self.velocity_target not in ("conditional", "teacher"):
            raise ValueError(f"velocity_target must be 'conditional' or 'teacher', got {self.velocity_target!r}")


class Method(abc.ABC):
    """A training objective for a flow-map network.

    Subclasses set ``Config`` (a frozen dataclass deriving from :class:`MethodConfig`),
    ``trains_flow_map`` and implement :meth:`loss`.
    """

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    trains_flow_map: ClassVar[bool] = True

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(self.config).__name__}")

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            flow_map=self.trains_flow_map,
            divergence_head=self.config.divergence is not None,
            backward=self.trains_flow_map and self.config.bidirectional,
        )

    @property
    def term_weights(self) -> dict[str, float]:
        """Weights of the F2D2 terms in the total (velocity terms weigh 1)."""
        div = self.config.divergence
        return {} if div is None else {DIV_DIAG: div.weight_diag, DIV_OFFDIAG: div.weight_offdiag}

    @property
    def needs_teacher(self) -> bool:
        div = self.config.divergence
        return self.config.velocity_target == "teacher" or (div is not None and div.target == "teacher")

    @abc.abstractmethod
    def loss(
        self,
        model: FlowMap,
        x1: Tensor,
        *,
        generator: torch.Generator,
        teacher: FlowMap | None = None,
        ema: FlowMap | None = None,
    ) -> Loss:
        """Per-sample loss on a batch of data x1 (B, *data_shape)."""

    # Shared pieces -------------------------------------------------------------------------

    def check_teacher(self, teacher: FlowMap | None) -> None:
        if self.needs_teacher and teacher is None:
            raise ValueError(f"{type(self).__name__} with this config needs a teacher model")

    def velocity_target(self, x_t: Tensor, t: Tensor, x0: Tensor, x1: Tensor, teacher: FlowMap | None) -> Tensor:
        """sg[target of u(x_t, t, t)]: x_1 - x_0 or the teacher's v_T(x_t, t)."""
        if self.config.velocity_target == "teacher":
            with torch.no_grad():
                return teacher.velocity(x_t, t)
        return x1 - x0

    def divergence_target(
        self, model: FlowMap, x_t: Tensor, t: Tensor, teacher: FlowMap | None, generator: torch.Generator
    ) -> Tensor:
        """sg[div w(x_t, t)] / kappa, with w the model's own diagonal or the teacher."""
        div = self.config.divergence
        field_model = teacher if div.target == "teacher" else model
        return diagonal_divergence_target(field_model, x_t, t, model.kappa, div.estimator, generator)

    def diagonal_loss(
        self, model: FlowMap, x_t: Tensor, t: Tensor, target_v: Tensor, div_target: Tensor | None
    ) -> dict[str, Tensor]:
        """L_VM and (for F2D2) L_div on diagonal rows (s = t)."""
        out = model(x_t, t, t)
        terms = {VELOCITY_DIAG: squared_norm(out.u - target_v)}
        if div_target is not None:
            terms[DIV_DIAG] = scalar_squared_error(out.div, div_target)
        return terms


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x_0 + t x_1 for t of shape (B,)."""
    tb = batch_view(t, x0)
    return (1 - tb) * x0 + tb * x1


def squared_norm(residual: Tensor) -> Tensor:
    """||r||^2 per sample: (B, *shape) -> (B,)."""
    return residual.flatten(1).pow(2).sum(1)


def adaptive_weight(loss: Tensor, power: float, eps: float) -> Tensor:
    """MeanFlow's adaptive loss weighting L / sg((L + c)^p) (arXiv:2505.13447, Sec. 4.3)."""
    if power == 0:
        return loss
    return loss / (loss.detach() + eps) ** power


def combine(terms: dict[str, Tensor], weights: dict[str, float]) -> Loss:
    """Weighted sum of named per-sample terms (missing weights count as 1)."""
    total = sum(weights.get(name, 1.0) * value for name, value in terms.items())
    return Loss(total, terms)


def concat_rows(*parts: tuple[dict[str, Tensor], int]) -> dict[str, Tensor]:
    """Concatenate the terms of consecutive row blocks, filling a block's missing terms with zeros.

    ``parts`` are (terms, num_rows) pairs in batch order; e.g. diagonal rows then off-diagonal rows.
    """
    names = list(dict.fromkeys(name for terms, _ in parts for name in terms))
    ref = next(v for terms, _ in parts for v in terms.values())
    return {
        name: torch.cat([terms.get(name, ref.new_zeros(n)) for terms, n in parts]) for name in names
    }
