"""The authors' DDPM++ UNet for CIFAR-10 on the (x, t, s) flow-map interface.

A re-implementation (no code copied) of the network the authors of arXiv:2512.02636 train on
CIFAR-10: ``SongUNet_ctm_scalar`` in Keely-Ai/F2D2 ``training/networks.py`` as configured by their
``train.py --arch ddpmpp`` (EDM's DDPM++ of Karras et al., arXiv:2206.00364, itself Song et al.'s
arXiv:2011.13456, plus a second time embedding and a scalar head). The paper's configuration is
``channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,), dropout=0.13``.

Layout (resolution r = H >> level, widths c_l = channels * channel_mult[l]):
- encoder: 3x3 conv C -> channels; per level: (level > 0) a downsampling block, then ``num_blocks``
  residual blocks to c_l, with self-attention when r is in ``attn_resolutions``;
- decoder: at the lowest level two blocks (the first always with attention), elsewhere an
  upsampling block; per level ``num_blocks + 1`` blocks that each take one skip connection (every
  encoder output, last first), the last one with attention when r is in ``attn_resolutions``;
- output: GroupNorm -> SiLU -> 3x3 conv to C channels.
- residual block: GroupNorm-SiLU-conv3x3, + affine(emb_t) [+ affine_s(emb_step)], GroupNorm-SiLU,
  dropout, conv3x3; skip added (1x1 conv when widths differ or it resamples); times sqrt(1/2).
  Attention: one head, GroupNorm -> 1x1 qkv -> softmax(q^T k / sqrt(c)) -> 1x1 proj, residual,
  times sqrt(1/2). GroupNorm: min(32, c / 4) groups, eps 1e-6.
- resampling with the filter [1, 1]: downsampling is 2x2 average pooling, upsampling
  nearest-neighbour x2 (what the authors' depthwise [1, 1] filters compute), then the conv.
- initialisation: Xavier-uniform weights, zero biases; the second conv of each block, the attention
  projection and the output conv scaled by 1e-5, qkv by sqrt(0.2).
- divergence head (``div_head``): the output of the last full-resolution decoder block (before the
  output GroupNorm, as the authors), flattened -> 128 -> SiLU -> 64 -> SiLU -> 1, PyTorch's default
  Linear initialisation (``div_pool="gap"``: spatial mean first, a cheaper alternative).
- input scaling: x is multiplied by 1 / sqrt(t^2 + 0.5^2), the authors' EDM-style c_in with their
  time t (t = 1 data) in the place of EDM's noise level sigma.

Times (our choice, differs from the authors): the authors feed log(t + 1e-9) / 4 and log(d) / 4
(d = s - t > 0, d = 1/1024 for their "instantaneous" rows) to EDM's positional embedding. The
logarithm is undefined for backward steps (s < t, trained here) and for s = t (our instantaneous
velocity), and d/dt log t = 1/t blows up the JVP-based losses (MeanFlow, LSD) near t = 0. Here t
and the signed step s - t, both scaled by TIME_SCALE as in :mod:`f2d2.unet`, go through the same
positional embedding; as in the authors' network each has its own two-layer SiLU mapping and each
block its own affine layer (``step_input=False`` drops the step path: the authors' flow-matching
teacher, a plain ``SongUNet``, has none).

Samples never interact: GroupNorm, attention within one image, per-element dropout masks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from f2d2.model import FlowMapNet, FlowMapOutput
from f2d2.unet import TIME_SCALE

SIGMA_DATA = 0.5  # the authors' sigma_data in c_in(t) = 1 / sqrt(t^2 + sigma_data^2)
EMB_MULT = 4  # mapping width = EMB_MULT * channels
MAX_POSITIONS = 10_000.0  # slowest positional frequency is 1 / MAX_POSITIONS
NUM_GROUPS, MIN_GROUP_CHANNELS, NORM_EPS = 32, 4, 1e-6
SKIP_SCALE = math.sqrt(0.5)
ZERO_INIT, ATTN_INIT = 1e-5, math.sqrt(0.2)  # weight gains of the "init_zero" and qkv layers
DIV_HIDDEN = (128, 64)  # the authors' scalar head widths
DIV_POOLS = ("mlp", "gap")


def positional_embedding(c: Tensor, num_channels: int) -> Tensor:
    """(B,) -> (B, num_channels): [sin(c f_i), cos(c f_i)], f_i = MAX_POSITIONS^(-i / (n - 1)), i < n = C / 2.

    EDM's PositionalEmbedding with endpoint=True, sin and cos halves swapped as DDPM++ does.
    """
    half = num_channels // 2
    freqs = MAX_POSITIONS ** (-torch.arange(half, dtype=c.dtype, device=c.device) / (half - 1))
    angles = c[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _init(layer: nn.Conv2d | nn.Linear, gain: float = 1.0) -> nn.Module:
    """Xavier-uniform weight times ``gain``, zero bias (the authors' weight_init)."""
    with torch.no_grad():
        nn.init.xavier_uniform_(layer.weight)
        layer.weight.mul_(gain)
        layer.bias.zero_()
    return layer


def conv(c_in: int, c_out: int, kernel: int, gain: float = 1.0) -> nn.Conv2d:
    return _init(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2), gain)


def linear(n_in: int, n_out: int) -> nn.Linear:
    return _init(nn.Linear(n_in, n_out))


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(NUM_GROUPS, channels // MIN_GROUP_CHANNELS), channels, eps=NORM_EPS)


def resample(x: Tensor, mode: str | None) -> Tensor:
    """The [1, 1] filter: 'down' averages 2x2 blocks, 'up' repeats each pixel 2x2, None is identity."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class Block(nn.Module):
    """DDPM++ residual block, optionally resampling and with one-head self-attention.

    Shapes: x (B, c_in, H, W), emb (B, E), emb_step (B, E) or None -> (B, c_out, H', W').
    """

    def __init__(
        self, c_in: int, c_out: int, emb_dim: int, *, step_input: bool, resample: str | None = None,
        attention: bool = False, dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.resample, self.dropout = c_in, c_out, resample, dropout
        self.norm0, self.conv0 = group_norm(c_in), conv(c_in, c_out, 3)
        self.affine = linear(emb_dim, c_out)
        self.affine_s = linear(emb_dim, c_out) if step_input else None
        self.norm1, self.conv1 = group_norm(c_out), conv(c_out, c_out, 3, ZERO_INIT)
        self.skip = conv(c_in, c_out, 1) if c_in != c_out or resample else None
        self.attention = attention
        if attention:
            self.norm2, self.qkv, self.proj = group_norm(c_out), conv(c_out, 3 * c_out, 1, ATTN_INIT), conv(c_out, c_out, 1, ZERO_INIT)

    def forward(self, x: Tensor, emb: Tensor, emb_step: Tensor | None) -> Tensor:
        h = self.conv0(resample(F.silu(self.norm0(x)), self.resample))
        shift = self.affine(emb)
        if self.affine_s is not None:
            shift = shift + self.affine_s(emb_step)
        h = F.silu(self.norm1(h + shift[:, :, None, None]))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        skip = resample(x, self.resample)
        h = (h + (self.skip(skip) if self.skip is not None else skip)) * SKIP_SCALE
        if self.attention:
            h = (h + self.attend(h)) * SKIP_SCALE
        return h

    def attend(self, h: Tensor) -> Tensor:
        """proj(v softmax(q^T k / sqrt(c))) over the H W positions of each image separately."""
        b, c, height, width = h.shape
        # qkv channels interleave as (c, 3), the authors' layout, so their weights would load unchanged
        q, k, v = self.qkv(self.norm2(h)).reshape(b, c, 3, height * width).unbind(2)
        weights = torch.einsum("bcq,bck->bqk", q, k / math.sqrt(c)).softmax(dim=2)
        return self.proj(torch.einsum("bqk,bck->bcq", weights, v).reshape(b, c, height, width))


class DDPMppNet(FlowMapNet):
    """The authors' DDPM++ UNet: u(x, t, s) and, optionally, their scalar head D(x, t, s).

    Args:
        data_shape: (C, H, W); H and W divisible by 2^(len(channel_mult) - 1).
        channels: base width ("model_channels"); channel_mult: width multiplier per level.
        num_blocks: residual blocks per level in the encoder (the decoder has one more).
        attn_resolutions: heights H >> level at which blocks attend; each must be a level's height.
        dropout: dropout probability before each block's second conv (train mode only).
        div_head: add the scalar head; div_pool: "mlp" (flatten, the authors') or "gap".
        step_input: embed the step s - t (False: an instantaneous field that ignores s).
    """

    def __init__(
        self, data_shape: tuple[int, int, int], channels: int, channel_mult: tuple[int, ...], num_blocks: int,
        attn_resolutions: tuple[int, ...] = (), dropout: float = 0.0, div_head: bool = False,
        div_pool: str = "mlp", step_input: bool = True,
    ) -> None:
        super().__init__()
        self._check(data_shape, channels, channel_mult, num_blocks, attn_resolutions, dropout, div_head, div_pool)
        self.data_shape = tuple(int(n) for n in data_shape)
        self.has_div_head, self.div_pool, self.channels = div_head, div_pool, channels
        c_img, height, width = self.data_shape
        emb_dim = EMB_MULT * channels
        self.map_layer0, self.map_layer1 = linear(channels, emb_dim), linear(emb_dim, emb_dim)
        self.map_layer0_s = linear(channels, emb_dim) if step_input else None
        self.map_layer1_s = linear(emb_dim, emb_dim) if step_input else None
        block = lambda c_in, c_out, **kw: Block(c_in, c_out, emb_dim, step_input=step_input, dropout=dropout, **kw)  # noqa: E731
        self.enc, widths = nn.ModuleDict(), []
        width = channels
        for level, mult in enumerate(channel_mult):
            res = height >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = conv(c_img, channels, 3)
            else:
                self.enc[f"{res}x{res}_down"] = block(width, width, resample="down")
            widths.append(width)
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = block(width, channels * mult, attention=res in attn_resolutions)
                width = channels * mult
                widths.append(width)
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = height >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = block(width, width, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(width, width)
            else:
                self.dec[f"{res}x{res}_up"] = block(width, width, resample="up")
            for idx in range(num_blocks + 1):
                attend = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = block(width + widths.pop(), channels * mult, attention=attend)
                width = channels * mult
        assert not widths, "every skip connection must be consumed"
        self.out_norm, self.out_conv = group_norm(width), conv(width, c_img, 3, ZERO_INIT)
        self.div = _div_mlp(width * height * self.data_shape[2] if div_pool == "mlp" else width) if div_head else None

    @staticmethod
    def _check(data_shape, channels, channel_mult, num_blocks, attn_resolutions, dropout, div_head, div_pool) -> None:
        if len(data_shape) != 3:
            raise ValueError(f"ddpmpp needs image data (C, H, W), got shape {tuple(data_shape)}")
        if not channel_mult or num_blocks < 1 or channels < 2 * MIN_GROUP_CHANNELS or channels % 2:
            raise ValueError("ddpmpp needs an even channels >= 8, num_res_blocks >= 1 and a non-empty channel_mult")
        multiple = 2 ** (len(channel_mult) - 1)
        if data_shape[1] % multiple or data_shape[2] % multiple:
            raise ValueError(f"ddpmpp with {len(channel_mult)} levels needs H and W divisible by {multiple}, got {tuple(data_shape)}")
        heights = [data_shape[1] >> level for level in range(len(channel_mult))]
        unknown = [r for r in attn_resolutions if r not in heights]
        if unknown:
            raise ValueError(f"attn_resolutions {unknown} are not level heights {heights}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if div_head and div_pool not in DIV_POOLS:
            raise ValueError(f"unknown div_pool {div_pool!r}; valid: {', '.join(DIV_POOLS)}")

    def embed(self, c: Tensor, first: nn.Linear, second: nn.Linear) -> Tensor:
        """(B,) scaled time -> (B, EMB_MULT * channels): positional features, two SiLU layers."""
        return F.silu(second(F.silu(first(positional_embedding(c, self.channels)))))

    def features(self, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """Output of the last full-resolution decoder block, (B, channels * channel_mult[0], H, W)."""
        emb = self.embed(TIME_SCALE * t, self.map_layer0, self.map_layer1)
        emb_step = None
        if self.map_layer0_s is not None:
            emb_step = self.embed(TIME_SCALE * (s - t), self.map_layer0_s, self.map_layer1_s)
        h = x / torch.sqrt(t**2 + SIGMA_DATA**2)[:, None, None, None]
        skips = []
        for layer in self.enc.values():
            h = layer(h, emb, emb_step) if isinstance(layer, Block) else layer(h)
            skips.append(h)
        for layer in self.dec.values():
            if h.shape[1] != layer.in_channels:  # blocks that take a skip are wider than their input
                h = torch.cat([h, skips.pop()], dim=1)
            h = layer(h, emb, emb_step)
        return h

    def forward(self, x: Tensor, t: Tensor, s: Tensor) -> FlowMapOutput:
        """x: (B, C, H, W), t and s: (B,) -> u: (B, C, H, W), div: (B,) or None."""
        h = self.features(x, t, s)
        u = self.out_conv(F.silu(self.out_norm(h)))
        if self.div is None:
            return FlowMapOutput(u)
        pooled = h.flatten(1) if self.div_pool == "mlp" else h.mean(dim=(2, 3))
        # the head ends in a width-1 layer: squeeze to (B,) here, never compare (B,) with (B, 1)
        return FlowMapOutput(u, self.div(pooled).squeeze(1))


def _div_mlp(width_in: int) -> nn.Sequential:
    """width_in -> 128 -> SiLU -> 64 -> SiLU -> 1 with PyTorch's default init (as the authors)."""
    layers: list[nn.Module] = []
    for width in DIV_HIDDEN:
        layers += [nn.Linear(width_in, width), nn.SiLU()]
        width_in = width
    return nn.Sequential(*layers, nn.Linear(width_in, 1))
