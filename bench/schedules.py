"""The optimizer, the learning-rate schedule and the EMA decay of a :class:`~bench.config.TrainConfig`.

Two recipes share these functions: the harness's own (Adam, linear warm-up then cosine decay, EMA
decay ``ema_decay`` ramped up as (1 + k) / (10 + k)), which the defaults reproduce bit for bit, and
EDM's (Karras et al., arXiv:2206.00364, NVlabs/edm training/training_loop.py), which the authors of
F2D2 train with: a learning rate ramped linearly in images, then constant, and an EMA whose
half-life is given in images and capped at a fixed share of the images seen so far.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from bench.config import TrainConfig

EMA_WARMUP = 10  # EMA decay ramps as (1 + step) / (EMA_WARMUP + step) before reaching its target
EMA_MIN_HALFLIFE_IMAGES = 1e-8  # EDM's floor of the half-life: decay 0 (a copy) on the first step


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam or RAdam with ``cfg``'s lr, betas, eps and weight decay (coupled L2, PyTorch's default)."""
    cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[cfg.optimizer]
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of step ``step`` (0-based: the number of steps taken before it).

    'cosine': linear warm-up over ``warmup_steps``, then cosine decay to ``lr * final_lr_ratio``.
    'edm': lr * min(images / lr_rampup_images, 1) with images = step * batch_size seen before this
    step (EDM's ``cur_nimg / (lr_rampup_kimg * 1000)``; its first step has lr 0), constant when
    ``lr_rampup_images`` is 0.
    """
    if cfg.lr_schedule == "edm":
        if cfg.lr_rampup_images == 0:
            return cfg.lr
        return cfg.lr * min(step * cfg.batch_size / cfg.lr_rampup_images, 1.0)
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.final_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def ema_decay(cfg: TrainConfig, steps_done: int) -> float:
    """Decay of the EMA update that follows optimizer step number ``steps_done`` (1-based).

    Default: min(ema_decay, (1 + k) / (EMA_WARMUP + k)) with k = steps_done.
    With ``ema_halflife_images`` H > 0 (EDM): 0.5 ** (batch_size / h), h = min(H, r * images) when the
    ramp-up ratio r > 0, where images = (k - 1) * batch_size were seen before this step (EDM updates
    its EMA before counting the current batch), so the first update copies the weights (h -> 1e-8).
    With the ramp-up active, 0.5 ** (1 / (r (k - 1))) does not depend on the batch size.
    """
    if cfg.ema_halflife_images == 0:
        return min(cfg.ema_decay, (1 + steps_done) / (EMA_WARMUP + steps_done))
    halflife = cfg.ema_halflife_images
    if cfg.ema_rampup_ratio > 0:
        halflife = min(halflife, cfg.ema_rampup_ratio * (steps_done - 1) * cfg.batch_size)
    return 0.5 ** (cfg.batch_size / max(halflife, EMA_MIN_HALFLIFE_IMAGES))


NAN_TO_NUM_POSINF = 1e5  # the authors' replacement for +inf gradient entries (-1e5 for -inf; NaN -> 0)


@torch.no_grad()
def sanitize_gradients(params: Iterable[torch.nn.Parameter]) -> bool:
    """Replace non-finite gradient entries in place (NaN -> 0, +-inf -> +-1e5), as the authors'
    training loop does before clipping; return True if any entry was replaced."""
    replaced = False
    for p in params:
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            torch.nan_to_num(p.grad, nan=0.0, posinf=NAN_TO_NUM_POSINF, neginf=-NAN_TO_NUM_POSINF, out=p.grad)
            replaced = True
    return replaced
