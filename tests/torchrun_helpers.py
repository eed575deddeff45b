"""Helpers for the multi-process tests: start N ranks through the real launcher, and the
one-process reference of a data-parallel training run.

:func:`torchrun` runs ``python -m torch.distributed.run --nproc_per_node N --master_port P
tests/torchrun_entry.py ...`` on a free localhost port, one torch/OMP thread per rank, so that
the torchrun path of the command line (environment detection, process group, teardown) is what
is tested.

:func:`reference_train` is the single process that a W-rank run must match: its batch is the
concatenation of what ranks 0 .. W-1 draw (each from its own generator seeded by (seed, rank), in
the same order: data, then the loss's noise and times), its loss the mean over that batch, which is
the mean of the ranks' mean losses because the shares are equal. Both runs then clip, step and
update the EMA with the same averaged gradient; they differ only in the order of the floating-point
sums (backward over 2B/W rows and an all-reduce, against backward over B rows), so they agree to a
float tolerance, not bit for bit.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from baselines import get_method
from bench.config import ModelConfig, TrainConfig
from bench.datasets import Checkerboard
from bench.models import build_model
from bench.train import init_state, stream_seed, train
from f2d2.method import Loss

ROOT = Path(__file__).resolve().parent.parent
ENTRY = Path(__file__).resolve().parent / "torchrun_entry.py"
NUM_RANKS = 2

SMALL = ModelConfig(hidden=16, depth=2, x_frequencies=2, t_frequencies=2)
KAPPA, SIGMA_0 = 10.0, 2.31  # the checkerboard's scales
TEACHER_SEED = 11
# 50 steps at global batch 64 (32 per rank); flow-matching also validates every 10 steps, selects
# by val_nll_gap, and has rank 1's loss poisoned (NaN) on three of its calls: all ranks must skip.
CASES: dict[str, dict] = {
    "flow-matching": {"validate": True, "poison_rank1": (5, 6, 33)},
    "meanflow-f2d2": {},
    "shortcut-distill-f2d2": {},
    "lsd-f2d2": {},
}
VALIDATION_NFE = (1, 2)


def train_config(name: str) -> TrainConfig:
    validate = CASES[name].get("validate", False)
    return TrainConfig(
        steps=50, batch_size=64, warmup_steps=5, log_every=5, seed=3,
        validate_every=10 if validate else 0, num_validation=32, select="val_nll_gap" if validate else "last",
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(args: list[str], nproc: int = NUM_RANKS) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(ENTRY), *map(str, args),
    ]


def torchrun_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def torchrun(args: list[str], *, nproc: int = NUM_RANKS, timeout_s: float = 120, **env: str) -> subprocess.CompletedProcess:
    """Run the entry script on ``nproc`` local ranks and wait (text output captured)."""
    return subprocess.run(
        torchrun_command(args, nproc), env=torchrun_env(**env), capture_output=True, text=True, timeout=timeout_s
    )


# The training cases, shared by the ranks (tests/torchrun_entry.py) and the reference ----------


class Poisoned:
    """A method whose loss is NaN on the given (1-based) call numbers."""

    def __init__(self, method, bad_calls) -> None:
        self.method, self.bad_calls, self.calls = method, set(bad_calls), 0

    def loss(self, model, x1, **kw) -> Loss:
        self.calls += 1
        loss = self.method.loss(model, x1, **kw)
        return Loss(loss.total * math.nan, loss.terms) if self.calls in self.bad_calls else loss


def build_case(name: str):
    """(method, fresh TrainState, teacher or None, config) exactly as every rank builds them."""
    cfg = train_config(name)
    spec = get_method(name)
    method = spec.build()
    teacher = None
    if method.needs_teacher:
        torch.manual_seed(TEACHER_SEED)
        fm = get_method("flow-matching").build()
        teacher = build_model(SMALL, (2,), fm.capabilities, kappa=KAPPA, sigma_0=SIGMA_0).requires_grad_(False)
    torch.manual_seed(cfg.seed)
    model = build_model(SMALL, (2,), method.capabilities, kappa=KAPPA, sigma_0=SIGMA_0)
    return method, init_state(model, cfg), teacher, cfg


def scorer():
    from bench.validation import Scorer

    return Scorer(Checkerboard(), 32, VALIDATION_NFE, torch.device("cpu"))


class RankSplit:
    """The reference's loss: rank r's share of the batch with rank r's generator, concatenated."""

    def __init__(self, method, generators, poison_rank1=()) -> None:
        self.parts = [method] + [Poisoned(method, poison_rank1) for _ in generators[1:]]
        self.generators = generators

    def loss(self, model, x1, *, generator, teacher=None, ema=None) -> Loss:
        chunks = x1.chunk(len(self.generators))
        losses = [
            part.loss(model, chunk, generator=gen, teacher=teacher, ema=ema)
            for part, chunk, gen in zip(self.parts, chunks, self.generators)
        ]
        terms = {name: torch.cat([loss.terms[name] for loss in losses]) for name in losses[0].terms}
        return Loss(torch.cat([loss.total for loss in losses]), terms)


def reference_train(name: str, world: int = NUM_RANKS, seeds_of: tuple[int, ...] | None = None):
    """One process training ``name`` on the concatenation of ``world`` ranks' shares."""
    method, state, teacher, cfg = build_case(name)
    ranks = seeds_of if seeds_of is not None else tuple(range(world))
    generators = [torch.Generator().manual_seed(stream_seed(cfg.seed, r)) for r in ranks]
    data = Checkerboard()

    def batch(num: int, _generator: torch.Generator) -> torch.Tensor:
        return torch.cat([data.train_batch(num // world, gen) for gen in generators])

    split = RankSplit(method, generators, CASES[name].get("poison_rank1", ()))
    on_validate = scorer() if cfg.validate_every else None
    train(state, split, batch, cfg, teacher=teacher, on_validate=on_validate)
    return state


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])
