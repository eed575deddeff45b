"""Build a :class:`~f2d2.model.FlowMap` network from a :class:`~bench.config.ModelConfig`.

Built-in architectures: 'mlp', 'unet', 'ddpmpp' (the authors' DDPM++) and 'adm' (TorchCFM's UNet). Any other network is named by
``model.arch: "package.module:factory"``: the module is imported (so loading a checkpoint of such a
model imports the user's module, which must be importable, and runs its code) and the factory is
called as ``factory(data_shape=(...), div_head=bool, **model.arch_options)``. Its result is checked
against the network protocol of :mod:`f2d2.model` on a probe batch, every time it is built (for
training or when a checkpoint is loaded); a violation is a :class:`ConfigError` naming what is wrong.
"""

from __future__ import annotations

import importlib

from f2d2.model import Capabilities, FlowMap, FlowMapNet, ProtocolError, check_flow_map_net
from f2d2.nets import MLPNet

from bench.config import ConfigError, ModelConfig

BUILT_IN = ("mlp", "unet", "ddpmpp", "adm")

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
    if ":" in cfg.arch:
        return user_net(cfg, data_shape, div_head)
    if cfg.arch_options:
        raise ConfigError(f"model.arch_options are the options of a user factory; model.arch {cfg.arch!r} takes none")
    if cfg.arch not in ("ddpmpp", "adm") and (cfg.attn_resolutions or cfg.dropout):
        raise ConfigError(f"model.attn_resolutions and model.dropout apply to arch 'ddpmpp' and 'adm' only, not {cfg.arch!r}")
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
    if cfg.arch == "adm":
        return adm_net(cfg, data_shape, div_head)
    raise ConfigError(f"unknown model.arch {cfg.arch!r}; valid: {', '.join(BUILT_IN)} or 'package.module:factory'")


def adm_net(cfg: ModelConfig, data_shape: tuple[int, ...], div_head: bool) -> FlowMapNet:
    from f2d2.adm import ADMNet

    if div_head:
        raise ConfigError("model.arch 'adm' has no divergence head: it serves flow-matching (e.g. an imported teacher)")
    try:
        return ADMNet(
            data_shape, cfg.channels, cfg.channel_mult, cfg.num_res_blocks, cfg.attn_resolutions,
            cfg.num_heads, cfg.num_head_channels, cfg.dropout,
        )
    except ValueError as err:
        raise ConfigError(f"model.arch 'adm': {err}") from None


def load_factory(arch: str):
    """The callable named by 'package.module:factory' (a ConfigError if it cannot be found)."""
    module_name, _, attr = arch.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"model.arch {arch!r}: a user network is named 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - ImportError, or whatever the module's own code raised
        raise ConfigError(
            f"model.arch {arch!r}: cannot import module {module_name!r} ({type(err).__name__}: {err}); is it on PYTHONPATH?"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"model.arch {arch!r}: module {module_name!r} has no callable {attr!r}")
    return factory


def user_net(cfg: ModelConfig, data_shape: tuple[int, ...], div_head: bool) -> FlowMapNet:
    """Call the user's factory and check its network against the protocol."""
    factory = load_factory(cfg.arch)
    try:
        net = factory(data_shape=tuple(data_shape), div_head=div_head, **cfg.arch_options)
    except Exception as err:  # noqa: BLE001 - the user's code: report whatever it raised, on one line
        raise ConfigError(f"model.arch {cfg.arch!r}: the factory raised {type(err).__name__}: {err}") from None
    try:
        check_flow_map_net(net, data_shape, div_head)
    except ProtocolError as err:
        raise ConfigError(f"model.arch {cfg.arch!r}: {err}") from None
    return net


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
    if capabilities.flow_map and not getattr(net, "uses_step", True):
        raise ConfigError(
            f"model.arch {cfg.arch!r} is an instantaneous field v(x, t) that ignores s: it serves flow-matching "
            "(no flow map), not a flow-map method"
        )
    return FlowMap(net, capabilities, kappa=kappa, sigma_0=sigma_0, meta=meta)
