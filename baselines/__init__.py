"""Base flow-map methods on the f2d2 interface, and the registry of every named method.

A new method is one file here plus one line in ``METHODS``. F2D2 variants are the base method's
class with the F2D2 divergence terms switched on in its config, never a copy. They also train
backward maps (``bidirectional``) by default, so that few-step likelihoods need no first-order
backward approximation; ``bidirectional: false`` restores the paper's forward-only training.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from baselines.flow_matching import FlowMatching, FlowMatchingConfig
from baselines.lsd import LSD, LSDConfig
from baselines.meanflow import MeanFlow, MeanFlowConfig
from baselines.shortcut import Shortcut, ShortcutConfig
from f2d2.divergence_loss import DivergenceLoss
from f2d2.method import Method, MethodConfig


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its class, default config and a one-line summary."""

    name: str
    cls: type[Method]
    config: MethodConfig
    summary: str

    def build(self, config: MethodConfig | None = None) -> Method:
        return self.cls(config if config is not None else self.config)


def _specs(*specs: MethodSpec) -> dict[str, MethodSpec]:
    return {spec.name: spec for spec in specs}


_SELF = DivergenceLoss(target="self")
_TEACHER = DivergenceLoss(target="teacher")

METHODS: dict[str, MethodSpec] = _specs(
    MethodSpec("flow-matching", FlowMatching, FlowMatchingConfig(), "teacher: conditional flow matching, Euler sampling"),
    MethodSpec("shortcut", Shortcut, ShortcutConfig(), "Shortcut: semigroup self-consistency from scratch"),
    MethodSpec(
        "shortcut-distill", Shortcut, ShortcutConfig(velocity_target="teacher"), "Shortcut with teacher velocity rows"
    ),
    MethodSpec("meanflow", MeanFlow, MeanFlowConfig(), "MeanFlow: Eulerian identity via one JVP"),
    MethodSpec("lsd", LSD, LSDConfig(), "LSD: Lagrangian self-distillation, both time orders"),
    MethodSpec(
        "shortcut-f2d2",
        Shortcut,
        ShortcutConfig(divergence=_SELF, bidirectional=True),
        "Shortcut + F2D2 divergence head (semigroup mirror)",
    ),
    MethodSpec(
        "shortcut-distill-f2d2",
        Shortcut,
        ShortcutConfig(velocity_target="teacher", divergence=_TEACHER, bidirectional=True),
        "Shortcut-Distill + F2D2, divergence of the teacher",
    ),
    MethodSpec(
        "meanflow-f2d2",
        MeanFlow,
        MeanFlowConfig(divergence=_SELF, bidirectional=True),
        "MeanFlow + F2D2 divergence head (Eulerian mirror)",
    ),
    MethodSpec("lsd-f2d2", LSD, LSDConfig(divergence=_SELF), "LSD + F2D2 divergence head (Lagrangian mirror)"),
)


FORWARD_ONLY = "-fwd"


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``; the error lists the valid names.

    A flow-map method's name with the suffix ``-fwd`` is the same method trained forward only
    (s > t, ``bidirectional: false``), the paper's setting, whose likelihoods then use the
    first-order backward approximation; e.g. ``meanflow-f2d2-fwd``.
    """
    if name in METHODS:
        return METHODS[name]
    base = METHODS.get(name.removesuffix(FORWARD_ONLY)) if name.endswith(FORWARD_ONLY) else None
    if base is not None and base.cls.trains_flow_map:
        config = replace(base.config, bidirectional=False)
        return MethodSpec(name, base.cls, config, f"{base.summary} (forward-only training)")
    raise KeyError(f"unknown method {name!r}; valid: {', '.join(METHODS)} (flow-map methods also as NAME{FORWARD_ONLY})")


__all__ = ["FORWARD_ONLY", "METHODS", "MethodSpec", "get_method"]
