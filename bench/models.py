"""Build a :class:`~f2d2.model.FlowMap` network from a :class:`~bench.config.ModelConfig`."""

from __future__ import annotations

from f2d2.model import Capabilities, FlowMap, FlowMapNet
from f2d2.nets import MLPNet

from bench.config import ConfigError, ModelConfig

ARCHS = ("mlp", "unet", "ddpmpp")

# The authors' CIFAR-10 network (Keely-Ai/F2D2 train.py --arch ddpmpp, training/networks.py
# SongUNet_ctm_scalar): model_channels 128, channel_mult [2, 2, 2], 4 blocks per resolution,
# attention at 16 x 16, dropout 0.13. With the divergence head: 93,958,148 parameters.
AUTHORS_CIFAR10_MODEL = ModelConfig(
    arch="ddpmpp", channels=128, channel_mult=(2, 2, 2), num_res_blocks=4, attn_resolutions=(16,), dropout=0.13,
    div_pool="mlp",
)


def build_net(cfg: ModelConfig, data_shape: tuple[int, ...], div_head: bool, flow_map: bool = True) -> FlowMapNet:
    """The network of ``cfg`` for data of ``data_shape``; ``flow_map=False`` (an instantaneous field)
    lets 'ddpmpp' drop its step embedding, as the authors' flow-matching network has none."""
    if cfg.arch != "ddpmpp" and (cfg.attn_resolutions or cfg.dropout):
        raise ConfigError(f"model.attn_resolutions and model.dropout apply to arch 'ddpmpp' only, not {cfg.arch!r}")
    if cfg.arch == "mlp":
        if len(data_shape) != 1:
            raise ConfigError(f"model.arch 'mlp' needs flat data, got shape {data_shape}; use 'unet'")
        return MLPNet(data_shape[0], cfg.hidden, cfg.depth, div_head, cfg.x_frequencies, cfg.x_scale, cfg.t_frequencies)
    if cfg.arch == "unet":
        from f2d2.unet import UNetNet

        return UNetNet(data_shape, cfg.channels, cfg.channel_mult, cfg.num_res_blocks, div_head, cfg.div_pool)
    if cfg.arch == "ddpmpp":
        from f2d2.ddpmpp import DDPMppNet

        try:
            return DDPMppNet(
                data_shape, cfg.channels, cfg.channel_mult, cfg.num_res_blocks, cfg.attn_resolutions, cfg.dropout,
                div_head, cfg.div_pool, step_input=flow_map,
            )
        except ValueError as err:
            raise ConfigError(f"model: {err}") from None
    raise ConfigError(f"unknown model.arch {cfg.arch!r}; valid: {', '.join(ARCHS)}")


def build_model(
    cfg: ModelConfig,
    data_shape: tuple[int, ...],
    capabilities: Capabilities,
    *,
    kappa: float,
    sigma_0: float,
    meta: dict | None = None,
) -> FlowMap:
    net = build_net(cfg, tuple(data_shape), capabilities.divergence_head, capabilities.flow_map)
    return FlowMap(net, capabilities, kappa=kappa, sigma_0=sigma_0, meta=meta)
