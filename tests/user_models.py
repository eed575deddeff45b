"""Models defined outside the package, for the `--checkpoint NAME=module:loader` route (tests only)."""

from __future__ import annotations

import torch

from f2d2.analytic import gaussian_flow_map


def gaussian_teacher():
    """An analytic 2D flow model posing as a flow-matching teacher: N(0, 2.31^2 I) -> N(0, 2.3^2 I)."""
    return gaussian_flow_map(torch.zeros(2), 2.3, 2.31, 10.0)


def gaussian_student():
    """The same flow with a divergence head that under-predicts on short jumps (optimistic)."""
    return gaussian_flow_map(torch.zeros(2), 2.3, 2.31, 10.0, div_error=-0.01)


def not_a_flow_map():
    return torch.nn.Linear(2, 2)
