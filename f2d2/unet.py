"""A small UNet flow-map network for images, with an optional scalar divergence head.

The network maps (x, t, s) with x of shape (B, C, H, W) to the average velocity u(x, t, s) of the
same shape and, with ``div_head``, to D(x, t, s) of shape (B,) (arXiv:2512.02636, Sec. 3; METHOD.md
Sec. 2). Layout follows the DDPM UNet (Ho et al., arXiv:2006.11239) without attention: GroupNorm +
SiLU residual blocks that add a time embedding, one resolution level per entry of
``channel_mult`` (stride-2 convolutions down, nearest-neighbour + convolution up), skip connections
from every encoder block to the decoder.

Times: both t and the signed step s - t get sinusoidal features and share one MLP, so s = t is
exactly the instantaneous velocity's input and backward steps (s < t) are distinct inputs.

Image sizes: H and W are zero-padded (symmetrically) to the next multiple of 2^(levels - 1) and
the output is cropped back, so 28 x 28 MNIST runs unpadded with up to three levels (28 -> 14 -> 7)
and is padded to 32 x 32 with four. 8 x 8 digits and 32 x 32 CIFAR-10 never need padding.

The velocity output conv and the divergence head's last layer start at a tenth of PyTorch's default
initialisation (u and D near zero, yet every parameter gets a gradient from the first step).

Samples never interact (GroupNorm only, no batch statistics), so per-sample Jacobians are block
diagonal and the network works under torch.func.vjp, vmap-of-vjp (exact divergence) and jvp
(MeanFlow's Eulerian target).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from f2d2.model import FlowMapNet, FlowMapOutput

MAX_GROUPS = 8  # GroupNorm groups; fewer when the channel count is not divisible
TIME_SCALE = 50.0  # fastest time feature: d/dt of the embedding is O(TIME_SCALE), and JVP-based losses
# (MeanFlow, LSD) differentiate through it; DDPM-style 1000 made MeanFlow-F2D2 on digits diverge
MAX_PERIOD = 10_000.0  # longest sinusoid period of the time features (in scaled time)
TIME_FEATURES = 64  # sinusoidal features per time input (t and s - t); even
EMB_MULT = 4  # time-embedding width = EMB_MULT * channels
DIV_HIDDEN = (128, 64)  # divergence head MLP widths (the authors' flatten -> 128 -> 64 -> 1)
DIV_POOLS = ("mlp", "gap")
OUT_INIT_SCALE = 0.1  # output layers start small (near-zero u and D) but not at zero, so that
# every parameter gets a gradient from the first step (the registry contract test checks this)


def sinusoidal_features(t: Tensor, dim: int) -> Tensor:
    """(B,) -> (B, dim): sin and cos of TIME_SCALE t at geometric frequencies 1 ... 1 / MAX_PERIOD."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    angles = TIME_SCALE * t[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= MAX_GROUPS that divides ``channels``."""
    groups = max(g for g in range(1, MAX_GROUPS + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between; 1x1 skip when widths differ.

    Shapes: x (B, c_in, H, W), emb (B, emb_dim) -> (B, c_out, H, W).
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: (B, c, H, W) -> (B, c, H/2, W/2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution: (B, c, H, W) -> (B, c, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def shrink_(layer: nn.Conv2d | nn.Linear) -> None:
    """Scale a freshly initialised output layer by OUT_INIT_SCALE and zero its bias."""
    with torch.no_grad():
        layer.weight.mul_(OUT_INIT_SCALE)
        layer.bias.zero_()


def div_mlp(width_in: int) -> nn.Sequential:
    """width_in -> 128 -> SiLU -> 64 -> SiLU -> 1; the last layer starts small (D ~ 0 at init)."""
    layers: list[nn.Module] = []
    for width in DIV_HIDDEN:
        layers += [nn.Linear(width_in, width), nn.SiLU()]
        width_in = width
    last = nn.Linear(width_in, 1)
    shrink_(last)
    return nn.Sequential(*layers, last)


class UNetNet(FlowMapNet):
    """UNet flow map u(x, t, s) with an optional divergence head D(x, t, s).

    Args:
        data_shape: (C, H, W) of one image.
        channels: base width; level i has ``channels * channel_mult[i]`` channels.
        channel_mult: one entry per resolution level (len(channel_mult) - 1 downsamplings).
        num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
        div_head: add the scalar head D(x, t, s).
        div_pool: what the head reads from the last full-resolution decoder feature map
            h of shape (B, channels, H, W): "mlp" flattens it (the authors' choice, METHOD.md
            Sec. 2), "gap" averages it over space first (cheaper, fewer parameters).
    """

    def __init__(
        self,
        data_shape: tuple[int, int, int],
        channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        div_head: bool,
        div_pool: str,
    ) -> None:
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(f"UNetNet needs image data (C, H, W), got shape {tuple(data_shape)}")
        if not channel_mult or channels < 1 or num_res_blocks < 1:
            raise ValueError("UNetNet needs channels >= 1, num_res_blocks >= 1 and a non-empty channel_mult")
        if div_head and div_pool not in DIV_POOLS:
            raise ValueError(f"unknown div_pool {div_pool!r}; valid: {', '.join(DIV_POOLS)}")
        self.data_shape = tuple(int(n) for n in data_shape)
        self.has_div_head = div_head
        self.div_pool = div_pool
        c, height, width = self.data_shape
        multiple = 2 ** (len(channel_mult) - 1)
        self.pad = _padding(width, multiple) + _padding(height, multiple)  # F.pad order: (left, right, top, bottom)
        self.emb_dim = EMB_MULT * channels
        self.time_mlp = nn.Sequential(
            nn.Linear(2 * TIME_FEATURES, self.emb_dim), nn.SiLU(), nn.Linear(self.emb_dim, self.emb_dim)
        )
        self.inp = nn.Conv2d(c, channels, 3, padding=1)
        self.down, self.up, skip_widths = self._build_levels(channels, channel_mult, num_res_blocks)
        width_mid = channels * channel_mult[-1]
        self.mid = nn.ModuleList([ResBlock(width_mid, width_mid, self.emb_dim) for _ in range(2)])
        assert not skip_widths, "every skip connection must be consumed"
        self.out_norm = group_norm(channels)
        self.out = nn.Conv2d(channels, c, 3, padding=1)
        shrink_(self.out)
        self.div = None
        if div_head:
            self.div = div_mlp(channels * height * width if div_pool == "mlp" else channels)

    def _build_levels(
        self, channels: int, mult: tuple[int, ...], num_blocks: int
    ) -> tuple[nn.ModuleList, nn.ModuleList, list[int]]:
        """Encoder and decoder module lists; returns the unconsumed skip widths (empty when wired right)."""
        down, widths, width = nn.ModuleList(), [channels], channels
        for level, m in enumerate(mult):
            for _ in range(num_blocks):
                down.append(ResBlock(width, channels * m, self.emb_dim))
                width = channels * m
                widths.append(width)
            if level < len(mult) - 1:
                down.append(Downsample(width))
                widths.append(width)
        up = nn.ModuleList()
        for level in reversed(range(len(mult))):
            for _ in range(num_blocks + 1):
                up.append(ResBlock(width + widths.pop(), channels * mult[level], self.emb_dim))
                width = channels * mult[level]
            if level > 0:
                up.append(Upsample(width))
        return down, up, widths

    def embed_times(self, t: Tensor, s: Tensor) -> Tensor:
        """(B,), (B,) -> (B, emb_dim): MLP of [features(t), features(s - t)]."""
        feats = [sinusoidal_features(t, TIME_FEATURES), sinusoidal_features(s - t, TIME_FEATURES)]
        return self.time_mlp(torch.cat(feats, dim=1))

    def features(self, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """The last full-resolution decoder feature map after GroupNorm + SiLU, (B, channels, H, W)."""
        emb = self.embed_times(t, s)
        h = self.inp(F.pad(x, self.pad) if any(self.pad) else x)
        skips = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb) if isinstance(block, ResBlock) else block(h)
        h = F.silu(self.out_norm(h))
        left, right, top, bottom = self.pad
        return h[:, :, top : h.shape[2] - bottom, left : h.shape[3] - right]

    def forward(self, x: Tensor, t: Tensor, s: Tensor) -> FlowMapOutput:
        """x: (B, C, H, W), t and s: (B,) -> u: (B, C, H, W), div: (B,) or None."""
        h = self.features(x, t, s)
        u = self.out(h)
        if self.div is None:
            return FlowMapOutput(u)
        pooled = h.flatten(1) if self.div_pool == "mlp" else h.mean(dim=(2, 3))
        return FlowMapOutput(u, self.div(pooled).squeeze(1))


def _padding(size: int, multiple: int) -> tuple[int, int]:
    """(before, after) zero padding that brings ``size`` to the next multiple of ``multiple``."""
    total = -size % multiple
    return total // 2, total - total // 2
