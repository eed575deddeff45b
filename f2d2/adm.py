"""OpenAI's ADM UNet as TorchCFM ships it: an instantaneous velocity field v(x, t) for images.

This is the network of TorchCFM's CIFAR-10 flow-matching models (``torchcfm.models.unet``,
``UNetModelWrapper``; Tong et al., arXiv:2302.00482), itself OpenAI's guided-diffusion UNet
(Dhariwal & Nichol, arXiv:2105.05233), written again here so that a converted TorchCFM checkpoint
loads without torchcfm. It computes the same function as torchcfm's ``net(t, x)`` for the
options TorchCFM's models use: unconditional, ``learn_sigma=False``, ``use_scale_shift_norm=False``,
``resblock_updown=False``, ``use_new_attention_order=False``, ``conv_resample=True``, 2D images.

The math, with C = ``channels``, E = 4 C and GN = GroupNorm with 32 groups and eps = 1e-5 computed
in (at least) float32:

- Time embedding: emb = W2 SiLU(W1 [cos(t f_k), sin(t f_k)]_{k < C/2}), f_k = 10^(-4 k / (C/2)),
  t in [0, 1] used as is (no rescaling to [0, 1000]), features in (at least) float32.
- Residual block (c_in -> c_out): h = conv3(SiLU(GN(x))); h = h + Lin(SiLU(emb)) per channel;
  h = conv3(Dropout(SiLU(GN(h)))); out = skip(x) + h, skip a 1x1 conv when c_in != c_out.
- Attention block (c channels, n heads of c / n channels): y = Lin_qkv(GN(x)) per position,
  split per head as [q | k | v] (guided-diffusion's "legacy" order); per head
  a_t = sum_s softmax_s(q_t . k_s / sqrt(c / n)) v_s, softmax in (at least) float32;
  out = x + Lin_proj(a). n = c / num_head_channels, or num_heads when num_head_channels = -1.
- Layout: 3x3 input conv to C; per level l (width C m_l) ``num_res_blocks`` residual blocks, each
  followed by attention when the level's resolution H / 2^l is in ``attention_resolutions``, then a
  stride-2 3x3 conv except after the last level. Middle: residual, attention, residual. Decoder:
  levels in reverse, ``num_res_blocks + 1`` residual blocks on [h, encoder skip] (channel concat),
  attention where the encoder had it, nearest x2 + 3x3 conv after each level but the top one.
  Output: GN, SiLU, 3x3 conv to the image channels (zero at initialisation).

As a flow-map network it takes (x, t, s) and ignores s: it is an instantaneous field
(``uses_step = False``), so it serves methods without a flow map (flow matching, a teacher) and has
no divergence head. Samples never interact (GroupNorm only), so it works under ``torch.func``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from f2d2.model import FlowMapNet, FlowMapOutput

NORM_GROUPS = 32  # guided-diffusion's normalization(): GroupNorm(32, channels)
NORM_EPS = 1e-5
MAX_PERIOD = 10_000.0  # slowest time frequency is 1 / MAX_PERIOD
EMB_MULT = 4  # time-embedding width = EMB_MULT * channels


def at_least_float32(x: Tensor) -> Tensor:
    """float16 / bfloat16 -> float32; float32 and float64 unchanged (guided-diffusion's GroupNorm32
    and softmax upcast half precision; float64 is kept for float64 evaluations)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in at least float32, cast back to the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(at_least_float32(x)).to(x.dtype)


def norm(channels: int) -> GroupNorm32:
    return GroupNorm32(NORM_GROUPS, channels, eps=NORM_EPS)


def time_features(t: Tensor, dim: int) -> Tensor:
    """(B,) -> (B, dim): [cos(t f_k), sin(t f_k)] with f_k = MAX_PERIOD^(-k / (dim / 2)), k < dim / 2."""
    t = at_least_float32(t)
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t[:, None] * freqs.to(t.dtype)[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ResBlock(nn.Module):
    """Shapes: x (B, c_in, H, W), emb (B, E) -> (B, c_out, H, W)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.dropout = norm(c_out), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # guided-diffusion's zero_module: each block starts as identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb)).to(h.dtype)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H W positions: (B, c, H, W) -> (B, c, H, W)."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        flat = x.reshape(b, c, height * width)
        qkv = F.conv1d(self.norm(flat), self.qkv.weight[:, :, None], self.qkv.bias)  # Lin per position
        ch = c // self.num_heads
        q, k, v = qkv.reshape(b * self.num_heads, 3 * ch, height * width).split(ch, dim=1)
        scale = ch**-0.25  # on q and k each, as guided-diffusion (steadier in float16 than one 1/sqrt(ch))
        logits = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weights = torch.softmax(at_least_float32(logits), dim=-1).to(logits.dtype)
        a = torch.einsum("bts,bcs->bct", weights, v).reshape(b, c, height * width)
        return (flat + F.conv1d(a, self.proj.weight[:, :, None], self.proj.bias)).reshape(b, c, height, width)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv: (B, c, H, W) -> (B, c, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stage(nn.Module):
    """One entry of the encoder or decoder: [residual block] [attention] [resampling], each optional."""

    def __init__(self, res: ResBlock | None = None, attn: Attention | None = None, resample: nn.Module | None = None) -> None:
        super().__init__()
        self.res, self.attn, self.resample = res, attn, resample

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        if self.res is not None:
            h = self.res(h, emb)
        if self.attn is not None:
            h = self.attn(h)
        return self.resample(h) if self.resample is not None else h


def num_heads_for(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Heads of an attention block of ``channels`` channels (guided-diffusion's rule)."""
    if num_head_channels == -1:
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"{channels} attention channels cannot be split into {num_heads} heads")
        return num_heads
    if num_head_channels < 1 or channels % num_head_channels:
        raise ValueError(f"{channels} attention channels are not a multiple of num_head_channels {num_head_channels}")
    return channels // num_head_channels


class ADMNet(FlowMapNet):
    """ADM UNet velocity field v(x, t); ``forward(x, t, s)`` ignores s and returns no divergence.

    Args:
        data_shape: (C_img, H, W) of one image, H = W.
        channels: base width C (a multiple of 32, the GroupNorm groups); level l has C m_l channels.
        channel_mult: the widths' multipliers m_l, one per level.
        num_res_blocks: residual blocks per encoder level (the decoder has one more).
        attention_resolutions: resolutions (pixels, e.g. (16,) for 32x32 images) with attention.
        num_heads, num_head_channels: heads per attention block (see :func:`num_heads_for`).
        dropout: dropout rate inside residual blocks (training only).
    """

    uses_step = False

    def __init__(
        self,
        data_shape: tuple[int, ...],
        channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        attention_resolutions: tuple[int, ...],
        num_heads: int,
        num_head_channels: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
            raise ValueError(f"ADMNet needs square images (C, H, H), got shape {tuple(data_shape)}")
        if channels < 1 or channels % NORM_GROUPS or not channel_mult or num_res_blocks < 1:
            raise ValueError(f"ADMNet needs channels a multiple of {NORM_GROUPS}, num_res_blocks >= 1 and a channel_mult")
        if data_shape[1] % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"image size {data_shape[1]} is not divisible by 2^{len(channel_mult) - 1}")
        self.data_shape = tuple(int(n) for n in data_shape)
        self.has_div_head = False
        self.channels = channels
        emb_dim = EMB_MULT * channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.inp = nn.Conv2d(data_shape[0], channels, 3, padding=1)
        size = data_shape[1]

        def attention(level: int, width: int) -> Attention | None:
            if size // 2**level not in attention_resolutions:
                return None
            return Attention(width, num_heads_for(width, num_heads, num_head_channels))

        self.down, skips, width = nn.ModuleList(), [channels], channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                res = ResBlock(width, channels * mult, emb_dim, dropout)
                width = channels * mult
                self.down.append(Stage(res, attention(level, width)))
                skips.append(width)
            if level < len(channel_mult) - 1:
                self.down.append(Stage(resample=nn.Conv2d(width, width, 3, stride=2, padding=1)))
                skips.append(width)
        deepest = len(channel_mult) - 1
        self.mid1 = ResBlock(width, width, emb_dim, dropout)
        self.mid_attn = Attention(width, num_heads_for(width, num_heads, num_head_channels))
        self.mid2 = ResBlock(width, width, emb_dim, dropout)
        self.up = nn.ModuleList()
        for level in reversed(range(deepest + 1)):
            for i in range(num_res_blocks + 1):
                res = ResBlock(width + skips.pop(), channels * channel_mult[level], emb_dim, dropout)
                width = channels * channel_mult[level]
                last = level > 0 and i == num_res_blocks
                self.up.append(Stage(res, attention(level, width), Upsample(width) if last else None))
        self.out_norm = norm(width)
        self.out_conv = nn.Conv2d(width, data_shape[0], 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def forward(self, x: Tensor, t: Tensor, s: Tensor) -> FlowMapOutput:
        """x: (B, C_img, H, W), t: (B,), s ignored -> u = v(x, t) of shape (B, C_img, H, W)."""
        emb = self.time_mlp(time_features(t, self.channels).to(self.time_mlp[0].weight.dtype))
        h = self.inp(x)
        skips = [h]
        for stage in self.down:
            h = stage(h, emb)
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return FlowMapOutput(self.out_conv(F.silu(self.out_norm(h))))
