"""Build a :class:`~f2d2.model.FlowMap` network from a :class:`~bench.config.ModelConfig`."""

from __future__ import annotations

from f2d2.model import Capabilities, FlowMap, FlowMapNet
from f2d2.nets import MLPNet

from bench.config import ConfigError, ModelConfig


def build_net(cfg: ModelConfig, data_shape: tuple[int, ...], div_head: bool) -> FlowMapNet:
    if cfg.arch == "mlp":
        if len(data_shape) != 1:
            raise ConfigError(f"model.arch 'mlp' needs flat data, got shape {data_shape}; use 'unet'")
        return MLPNet(data_shape[0], cfg.hidden, cfg.depth, div_head, cfg.x_frequencies, cfg.x_scale, cfg.t_frequencies)
    if cfg.arch == "unet":
        from f2d2.unet import UNetNet

        return UNetNet(data_shape, cfg.channels, cfg.channel_mult, cfg.num_res_blocks, div_head, cfg.div_pool)
    raise ConfigError(f"unknown model.arch {cfg.arch!r}; valid: mlp, unet")


def build_model(
    cfg: ModelConfig,
    data_shape: tuple[int, ...],
    capabilities: Capabilities,
    *,
    kappa: float,
    sigma_0: float,
    meta: dict | None = None,
) -> FlowMap:
    net = build_net(cfg, tuple(data_shape), capabilities.divergence_head)
    return FlowMap(net, capabilities, kappa=kappa, sigma_0=sigma_0, meta=meta)
