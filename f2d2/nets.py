"""Networks for low-dimensional data: an MLP with two time inputs and an optional divergence head.

Both times are embedded: t, and the signed step s - t (so s = t is exactly the instantaneous
velocity's input and backward steps s < t are distinct inputs). See METHOD.md Sec. 2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from f2d2.model import FlowMapNet, FlowMapOutput



def fourier_features(t: Tensor, num_frequencies: int) -> Tensor:
    """(B,) -> (B, 2 num_frequencies + 1): t, sin(2^k pi t), cos(2^k pi t)."""
    freqs = math.pi * 2.0 ** torch.arange(num_frequencies, dtype=t.dtype, device=t.device)
    angles = t[:, None] * freqs
    return torch.cat([t[:, None], angles.sin(), angles.cos()], dim=1)


class MLPNet(FlowMapNet):
    """Shared MLP trunk on [x, emb(t), emb(s - t)] with a velocity head and a scalar divergence head.

    Args:
        num_dims: data dimension d (data shape (d,)).
        hidden: width of each hidden layer. depth: number of hidden layers.
        div_head: add the scalar head D(x, t, s).
    """

    def __init__(
        self,
        num_dims: int,
        hidden: int = 256,
        depth: int = 4,
        div_head: bool = False,
        x_frequencies: int = 0,
        x_scale: float = 1.0,
        t_frequencies: int = 4,
    ) -> None:
        super().__init__()
        self.data_shape = (num_dims,)
        self.has_div_head = div_head
        self.x_frequencies, self.x_scale, self.t_frequencies = x_frequencies, x_scale, t_frequencies
        width_in = num_dims * (1 + 2 * x_frequencies) + 2 * (2 * t_frequencies + 1)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(width_in if i == 0 else hidden, hidden), nn.SiLU()]
        self.trunk = nn.Sequential(*layers)
        self.velocity_head = nn.Linear(hidden, num_dims)
        self.div_head = nn.Linear(hidden, 1) if div_head else None

    def embed_x(self, x: Tensor) -> Tensor:
        """x and, optionally, sin/cos(2^k pi x / x_scale): sharp densities need high frequencies."""
        if self.x_frequencies == 0:
            return x
        freqs = math.pi * 2.0 ** torch.arange(self.x_frequencies, dtype=x.dtype, device=x.device)
        angles = (x[:, :, None] / self.x_scale * freqs).flatten(1)
        return torch.cat([x, angles.sin(), angles.cos()], dim=1)

    def forward(self, x: Tensor, t: Tensor, s: Tensor) -> FlowMapOutput:
        h = self.trunk(torch.cat([self.embed_x(x), fourier_features(t, self.t_frequencies), fourier_features(s - t, self.t_frequencies)], dim=1))
        div = self.div_head(h).squeeze(1) if self.div_head is not None else None
        return FlowMapOutput(self.velocity_head(h), div)
