"""One training loop for every method: optimizer, learning-rate schedule and EMA of the config
(bench/schedules.py: Adam with warm-up + cosine by default, or the authors' RAdam with EDM's ramp and
EMA half-life), gradient clipping, optional sanitising of non-finite gradients, autocast precision
(bench/precision.py), and non-finite steps skipped, counted, and fatal only in a long run.

Modes of the networks: the model being trained is in train mode (dropout on) for its predictions
and for targets it builds itself (Shortcut's half jumps with ``target_model: model``, divergence
targets of ``target: self``), as in the authors' code, where targets come from the same module in
train mode. The EMA network is always in eval mode (dropout off), also when it builds Shortcut
targets (``target_model: ema``), as EDM's EMA copy; a teacher loaded from a checkpoint is in eval mode.

Data-parallel at any world size (bench/dist.py; torchrun). ``train.batch_size`` is the global
batch: each of the W ranks draws ``batch_size / W`` points, their noise and times from its own
generator, seeded by (seed, rank) (:func:`stream_seed`), and computes the mean loss of its share;
after backward the gradients are averaged over ranks, so that every rank clips and steps the same
averaged gradient as one process whose batch is the concatenation of the ranks' shares. Parameters,
Adam state and EMA stay identical on all ranks; a step is skipped on every rank if any rank's loss
is non-finite; logged terms are means over ranks. At world size 1 all of this is the one-process
loop, bit for bit.

No DistributedDataParallel wrapper: MeanFlow and LSD (and their F2D2 variants) differentiate the
network with torch.func.jvp, which does not run through DDP (pytorch/pytorch#102197, #182661), and
every loss calls the network several times per step (targets from the EMA, a teacher or two half
jumps of the model itself), which DDP supports only with static-graph or unused-parameter modes.
One explicit all-reduce of the flattened gradients after backward (:func:`bench.dist.average_gradients`)
is exact for every loss and leaves the model unwrapped for EMA and checkpoints; what it gives up is
DDP's overlap of communication with the backward pass.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bench import dist
from bench.config import ConfigError, TrainConfig
from bench.precision import autocast, compile_network, make_scaler, tf32_mode
from bench.schedules import build_optimizer, ema_decay, learning_rate, sanitize_gradients
from bench.shards import hashed_seed
from f2d2.method import Method
from f2d2.model import FlowMap

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
    world_sizes: list[dict] = field(default_factory=list)  # [{"from_step", "world_size"}]: who trained when
    # [{"from_step", "threads"}]: torch's intra-op threads per process; a convolutional network's
    # reductions (so its trained weights) depend on them, so they are part of reproducing a checkpoint
    torch_threads: list[dict] = field(default_factory=list)
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    num_sanitized: int = 0  # steps whose gradients had non-finite entries replaced (train.grad_nan_to_num)
    init: dict | None = None  # the warm start's record (bench/warmstart.py), None for a fresh start


def stream_seed(seed: int, rank: int, step: int = 0) -> int:
    """Seed of rank ``rank``'s data/noise/time generator for a run that starts at ``step`` (0, or
    the step where a resumed run changed its world size and so could not continue the saved
    streams). (seed, 0, 0) is ``seed`` itself: one process draws exactly what it always drew. Other
    pairs hash to 63-bit seeds, so that ranks and restarts draw unrelated streams."""
    if rank == 0 and step == 0:
        return seed
    return hashed_seed("train", seed, rank, step)


def rank_batch_size(batch_size: int) -> int:
    """This rank's share of the global ``train.batch_size``; it must split evenly across ranks."""
    if batch_size % dist.world_size():
        raise ConfigError(
            f"train.batch_size {batch_size} is the global batch and must be a multiple of the world size "
            f"{dist.world_size()} (every rank draws an equal share)"
        )
    return batch_size // dist.world_size()


def init_state(model: FlowMap, cfg: TrainConfig) -> TrainState:
    """Fresh state; the parameters are rank 0's on every rank, each rank's generator its own."""
    device = next(model.parameters()).device
    dist.broadcast_tensors_(model.parameters())
    generator = torch.Generator(device=device).manual_seed(stream_seed(cfg.seed, dist.rank()))
    optimizer = build_optimizer(model.parameters(), cfg)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # eval mode for good (see the module docstring)
    return TrainState(model, ema, optimizer, generator, scaler=make_scaler(cfg, device))


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
    """One optimizer step on this rank's share of the batch, with gradients averaged over ranks;
    returns the logged terms (means over ranks), or None when the step was skipped (on every rank)."""
    model, opt, scaler = state.model, state.optimizer, state.scaler
    for group in opt.param_groups:
        group["lr"] = learning_rate(cfg, state.step)
    x1 = batch(rank_batch_size(cfg.batch_size), state.generator)
    with autocast(cfg, x1.device):
        loss = method.loss(model, x1, generator=state.generator, teacher=teacher, ema=state.ema)
    total = loss.total.float().mean()
    opt.zero_grad(set_to_none=True)
    finite = bool(torch.isfinite(total))
    if finite:
        scaled = total if cfg.loss_scale == 1.0 else total * cfg.loss_scale
        (scaled if scaler is None else scaler.scale(scaled)).backward()
    finite = dist.average_gradients(model.parameters(), finite)  # before clipping; all ranks agree
    unscaled = finite and scaler is not None
    if finite:
        if unscaled:  # fp16: true gradients before clipping; an overflow shows in the norm below
            scaler.unscale_(opt)
        elif cfg.grad_nan_to_num and sanitize_gradients(model.parameters()):
            state.num_sanitized += 1
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        finite = bool(torch.isfinite(grad_norm))  # equal on every rank, as the averaged gradients are
    state.step += 1
    if not finite:
        if unscaled:
            scaler.update()  # lowers the scale after an overflow (unscale_ recorded it)
        opt.zero_grad(set_to_none=True)
        state.num_skipped += 1
        return None
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    update_ema(state.ema, model, ema_decay(cfg, state.step))
    logged = dist.mean_scalars({"loss": total, **{name: value.float().mean() for name, value in loss.terms.items()}})
    return {"step": state.step, "loss": logged.pop("loss"), "grad_norm": grad_norm.item(), **logged}


def scored_on_main(make_scorer: Callable[[], Callable[[TrainState], dict]]) -> Callable[[TrainState], dict]:
    """A validation scorer for any world size: rank 0 alone builds it (for images it loads a
    feature network and may write its caches) and scores the EMA model; every rank receives the
    record, so that all keep the same best-weight copy (their EMA weights are identical)."""
    if dist.is_main():
        with dist.alone():  # the scorer's evaluation code must not wait for the other ranks
            scorer = make_scorer()
    else:
        scorer = None

    def score(state: TrainState) -> dict:
        if scorer is None:
            return dist.broadcast_object(None)
        with dist.alone():
            record = scorer(state)
        return dist.broadcast_object(record)

    return score


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
    rank_batch_size(cfg.batch_size)  # an uneven split fails before the first step
    if cfg.compile:
        compile_network(state.model)
    consecutive = 0
    start = time.perf_counter()
    state.model.train()
    while state.step < until:
        with tf32_mode(cfg.tf32):  # the step only: validation stays in full float32
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
            sanitized = {"num_sanitized": state.num_sanitized} if cfg.grad_nan_to_num else {}
            state.history.append({**state.running, "step": state.step, "num_skipped": state.num_skipped, **sanitized})
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
