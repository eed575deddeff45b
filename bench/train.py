"""One training loop for every method: Adam, warm-up + cosine learning rate, EMA, gradient
clipping, and non-finite steps skipped, counted, and fatal only in a long run."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bench.config import TrainConfig
from f2d2.method import Method
from f2d2.model import FlowMap

EMA_WARMUP = 10  # EMA decay ramps as (1 + step) / (EMA_WARMUP + step) before reaching its target
RUNNING_DECAY = 0.98  # smoothing of the logged loss terms


class TrainingDiverged(RuntimeError):
    """Raised after more than ``max_nonfinite`` consecutive non-finite steps."""


@dataclass
class TrainState:
    """Everything needed to resume: model, EMA, optimizer and the data/noise generator."""

    model: FlowMap
    ema: FlowMap
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int = 0
    num_skipped: int = 0
    history: list[dict] = field(default_factory=list)
    running: dict = field(default_factory=dict)  # exponential moving average of the logged terms
    wall_s: float = 0.0
    validation: list[dict] = field(default_factory=list)
    best: dict | None = None  # {"step", "value", "state"}: the EMA weights selected by the criterion


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``lr * final_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.final_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def init_state(model: FlowMap, cfg: TrainConfig) -> TrainState:
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ema = copy.deepcopy(model).requires_grad_(False)
    return TrainState(model, ema, optimizer, generator)


@torch.no_grad()
def update_ema(ema: FlowMap, model: FlowMap, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def train_step(
    state: TrainState,
    method: Method,
    batch: Callable[[int, torch.Generator], Tensor],
    cfg: TrainConfig,
    teacher: FlowMap | None,
) -> dict | None:
    """One optimizer step; returns the logged terms, or None when the step was skipped."""
    model, opt = state.model, state.optimizer
    for group in opt.param_groups:
        group["lr"] = learning_rate(cfg, state.step)
    x1 = batch(cfg.batch_size, state.generator)
    loss = method.loss(model, x1, generator=state.generator, teacher=teacher, ema=state.ema)
    total = loss.total.mean()
    opt.zero_grad(set_to_none=True)
    finite = bool(torch.isfinite(total))
    if finite:
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        finite = bool(torch.isfinite(grad_norm))
    state.step += 1
    if not finite:
        opt.zero_grad(set_to_none=True)
        state.num_skipped += 1
        return None
    opt.step()
    update_ema(state.ema, model, min(cfg.ema_decay, (1 + state.step) / (EMA_WARMUP + state.step)))
    terms = {name: value.mean().item() for name, value in loss.terms.items()}
    return {"step": state.step, "loss": total.item(), "grad_norm": grad_norm.item(), **terms}


def validate(state: TrainState, scorer: Callable[[TrainState], dict], cfg: TrainConfig) -> None:
    """Score the EMA model, record it, and keep a copy of its weights if it is the best so far."""
    record = {"step": state.step, **scorer(state)}
    state.validation.append(record)
    value = record.get(cfg.select)
    if cfg.select != "last" and value is not None and math.isfinite(value):
        if state.best is None or value < state.best["value"]:
            weights = {k: v.detach().clone() for k, v in state.ema.state_dict().items()}
            state.best = {"step": state.step, "value": value, "state": weights}


def train(
    state: TrainState,
    method: Method,
    batch: Callable[[int, torch.Generator], Tensor],
    cfg: TrainConfig,
    *,
    teacher: FlowMap | None = None,
    progress: Callable[[int, dict], None] | None = None,
    until: int | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    on_validate: Callable[[TrainState], dict] | None = None,
) -> TrainState:
    """Train ``state`` up to step ``until`` (default ``cfg.steps``), calling ``progress(step, log)``
    after each step, ``on_validate(state)`` every ``cfg.validate_every`` steps (its record is kept
    and the best EMA weights by ``cfg.select`` are copied) and ``on_checkpoint(state)`` every
    ``cfg.checkpoint_every`` steps.

    Raises :class:`TrainingDiverged` after ``cfg.max_nonfinite`` consecutive skipped steps; the
    state then still holds the last good parameters.
    """
    until = cfg.steps if until is None else until
    consecutive = 0
    start = time.perf_counter()
    state.model.train()
    while state.step < until:
        log = train_step(state, method, batch, cfg, teacher)
        if log is None:
            consecutive += 1
            if consecutive > cfg.max_nonfinite:
                state.wall_s += time.perf_counter() - start
                raise TrainingDiverged(
                    f"{consecutive} consecutive non-finite steps at step {state.step} "
                    f"({state.num_skipped} skipped in total); last good parameters kept"
                )
            continue
        consecutive = 0
        state.running = {k: RUNNING_DECAY * state.running.get(k, v) + (1 - RUNNING_DECAY) * v for k, v in log.items()}
        if state.step % cfg.log_every == 0 or state.step == until:
            state.history.append({**state.running, "step": state.step, "num_skipped": state.num_skipped})
        if progress is not None:
            progress(state.step, state.running)
        if on_validate is not None and cfg.validate_every and state.step % cfg.validate_every == 0:
            validate(state, on_validate, cfg)
        if on_checkpoint is not None and state.step % cfg.checkpoint_every == 0 and state.step < cfg.steps:
            state.wall_s += time.perf_counter() - start
            start = time.perf_counter()
            on_checkpoint(state)
    state.wall_s += time.perf_counter() - start
    state.model.eval()
    return state
