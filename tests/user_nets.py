"""User-defined flow-map networks, outside the package, for ``model.arch: "tests.user_nets:NAME"``.

``factory`` follows the protocol of :mod:`f2d2.model`; every other factory breaks one rule of it,
and tests/test_user_arch.py checks that the harness names that rule.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from f2d2.model import FlowMapOutput


class TwoTimeMLP(nn.Module):
    """A small MLP on [x, t, s - t] for flat data; deliberately not a FlowMapNet subclass."""

    def __init__(self, data_shape: tuple[int, ...], div_head: bool, width: int = 64) -> None:
        super().__init__()
        (num_dims,) = data_shape
        self.data_shape = tuple(data_shape)
        self.has_div_head = div_head
        self.trunk = nn.Sequential(nn.Linear(num_dims + 2, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.u = nn.Linear(width, num_dims)
        self.div = nn.Linear(width, 1) if div_head else None

    def features(self, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        return self.trunk(torch.cat([x, t[:, None], (s - t)[:, None]], dim=1))

    def forward(self, x: Tensor, t: Tensor, s: Tensor) -> FlowMapOutput:
        h = self.features(x, t, s)
        return FlowMapOutput(self.u(h), self.div(h).squeeze(1) if self.div is not None else None)


def factory(data_shape, div_head, width=64):
    return TwoTimeMLP(data_shape, div_head, width)


# --- factories that break the protocol, one rule each -----------------------------------------


def not_a_module(data_shape, div_head):
    return {"u": None}


def no_attributes(data_shape, div_head):
    return nn.Linear(2, 2)


def wrong_data_shape(data_shape, div_head):
    return TwoTimeMLP((3,), div_head)


def always_a_head(data_shape, div_head):
    return TwoTimeMLP(data_shape, True)


def never_a_head(data_shape, div_head):
    return TwoTimeMLP(data_shape, False)


class ReturnsTuple(TwoTimeMLP):
    def forward(self, x, t, s):
        out = super().forward(x, t, s)
        return out.u, out.div


class DivColumn(TwoTimeMLP):
    def forward(self, x, t, s):
        h = self.features(x, t, s)
        return FlowMapOutput(self.u(h), self.div(h))  # (B, 1): broadcasts to (B, B) in likelihoods


class FlatU(TwoTimeMLP):
    def forward(self, x, t, s):
        return FlowMapOutput(self.u(self.features(x, t, s)).sum(1), None)


class MixesBatch(TwoTimeMLP):
    def __init__(self, data_shape, div_head, amount):
        super().__init__(data_shape, div_head)
        self.amount = amount

    def forward(self, x, t, s):
        out = super().forward(x, t, s)
        return FlowMapOutput(out.u + self.amount * out.u.mean(0, keepdim=True), out.div)


class Crashes(TwoTimeMLP):
    def forward(self, x, t, s):
        return FlowMapOutput(self.u(x))  # Linear(width) applied to x: a shape error


class WithBatchNorm(TwoTimeMLP):
    def __init__(self, data_shape, div_head):
        super().__init__(data_shape, div_head)
        self.trunk.append(nn.BatchNorm1d(64))


class IgnoresStep(TwoTimeMLP):
    uses_step = False


def returns_tuple(data_shape, div_head):
    return ReturnsTuple(data_shape, div_head)


def div_column(data_shape, div_head):
    return DivColumn(data_shape, True)


def flat_u(data_shape, div_head):
    return FlatU(data_shape, False)


def mixes_batch(data_shape, div_head, amount=1.0):
    return MixesBatch(data_shape, div_head, amount)


def crashes(data_shape, div_head):
    return Crashes(data_shape, div_head)


def with_batch_norm(data_shape, div_head):
    return WithBatchNorm(data_shape, div_head)


def ignores_step(data_shape, div_head):
    return IgnoresStep(data_shape, div_head)


NOT_CALLABLE = 3
