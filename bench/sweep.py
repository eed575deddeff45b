"""The main job: train what is missing, evaluate every method at every NFE, write the tables.

Outputs under ``<out>/<dataset>/`` (each written atomically):
``results.csv`` (tidy rows, the public interface), ``results.md`` (the wide table),
``config.yaml`` (resolved config), ``env.json`` (versions, device, git commit, stage times),
``training.json`` (loss curves and skipped steps per method) and ``cells/`` (resumable cells).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from baselines import get_method
from bench import dist
from bench.api import QUALITY_GROUPS, evaluate, prepare, resolve_groups, rows_from_frame
from bench.cells import Row, rows_from_json, rows_to_json
from bench.checkpoint import CheckpointError, check_expected, checkpoint_dir, load_checkpoint, read_meta
from bench.config import SweepConfig, key_dict, merge, stable_hash, to_dict
from bench.datasets import get_dataset
from bench.env import environment
from bench.io import write_json, write_text, write_with
from bench.jobs import Job, run_job, train_in_workers
from bench.loaders import UserModel, is_loader_spec
from bench.precision import check_precision
from bench.train import rank_batch_size
from bench.warmstart import check_job_source, warm_start_order, warm_start_source

TEACHER = "flow-matching"

class Reporter:
    """Hooks for progress output; the CLI plugs rich in, tests use the silent default."""

    def stage(self, text: str) -> None: ...

    def train_progress(self, name: str, step: int, total: int, log: dict) -> None: ...

    def drain(self) -> None: ...

    def queue(self):  # a multiprocessing queue for worker progress, or None
        return None

@dataclass
class SweepOutcome:
    rows: list[Row]
    out_dir: Path
    stage_s: dict[str, float] = field(default_factory=dict)
    trained: list[str] = field(default_factory=list)
    reused_cells: list[str] = field(default_factory=list)
    quality_floor: dict = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)

def check_writable(path: Path, what: str = "output directory") -> None:
    """Fail early (before any training) if directory ``path`` cannot be created or written."""
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise PermissionError(f"{what} {path} is not a directory" + ("" if probe == Path(path) else f" ({probe} is a file)"))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path} is not writable")

@dataclass(frozen=True)
class Provided:
    """A trained checkpoint given by the user (``--checkpoint METHOD=PATH``) instead of a training job."""

    method: str
    path: str

    @property
    def directory(self) -> Path:
        return checkpoint_dir(self.path)

    def status(self) -> str:
        return "provided"


Source = Job | Provided | UserModel


def plan_jobs(cfg: SweepConfig, dataset, data_dir: str | None, cache_dir: Path, kappa: float, sigma_0: float) -> dict[str, Source]:
    """Teacher first, then every method, each preceded by the warm-start source it names
    (``train.init_from``; a source outside ``methods`` is trained but not evaluated, like the
    teacher): a provided checkpoint (checked now, before anything is trained or written) or a
    training job; distill variants point at the teacher."""

    def source(name: str, teacher_dir: str | None, init: Job | str | None) -> Source:
        if name in cfg.checkpoints and is_loader_spec(cfg.checkpoints[name]):
            user = UserModel(name, cfg.checkpoints[name])
            user.load(dataset.data_shape)  # fails now, before anything is trained or written
            return user
        if name in cfg.checkpoints:
            return check_provided(Provided(name, cfg.checkpoints[name]), dataset)
        spec = get_method(name)
        method_cfg = merge(spec.config, cfg.options_for(name), f"method_options.{name}")
        train_cfg = cfg.teacher_train if name == TEACHER else cfg.train_for(name)
        needs_teacher = spec.build(method_cfg).needs_teacher
        if needs_teacher and teacher_dir is None and name != TEACHER:
            raise CheckpointError(
                f"{name} trains from a teacher checkpoint; a teacher given by a loader "
                f"({cfg.checkpoints[TEACHER]}) can be evaluated but not distilled from"
            )
        job = Job(
            name, method_cfg, cfg.model, train_cfg, dataset.name, data_dir, kappa, sigma_0,
            teacher_dir if needs_teacher else None, str(cache_dir), cfg.nfe, cfg.eval.reference_estimator, init,
        )
        if isinstance(init, str):  # a checkpoint path: its shapes are checked now, before any training
            check_job_source(job, dataset.data_shape)
        return job

    sources: dict[str, Source] = {}
    sources[TEACHER] = teacher = source(TEACHER, None, warm_start_source(cfg, TEACHER, TEACHER, sources, dataset))
    teacher_dir = None if isinstance(teacher, UserModel) else str(teacher.directory)
    for name in warm_start_order(cfg, [m for m in cfg.methods if m != TEACHER], TEACHER):
        sources[name] = source(name, teacher_dir, warm_start_source(cfg, name, TEACHER, sources, dataset))
    return sources


def check_provided(provided: Provided, dataset) -> Provided:
    """Refuse a missing, damaged or mismatched checkpoint with one message naming the file."""
    meta = read_meta(provided.directory)
    check_expected(meta, provided.directory / "checkpoint.json", method=provided.method, dataset=dataset.name)
    if tuple(meta["data_shape"]) != tuple(dataset.data_shape):
        raise CheckpointError(
            f"{provided.directory / 'checkpoint.json'}: checkpoint data shape {tuple(meta['data_shape'])} does not match "
            f"{dataset.name} {tuple(dataset.data_shape)}"
        )
    load_checkpoint(provided.directory, method=provided.method, dataset=dataset.name)  # hash and weights
    return provided


def train_all(sources: dict[str, Source], device: torch.device, jobs: int, reporter: Reporter) -> list[str]:
    """Train missing checkpoints: the teacher first, then the rest in waves, each wave the jobs whose
    warm-start source (``train.init_from``) is trained (one wave without warm starts), in parallel
    if ``jobs`` > 1. Under torchrun every rank trains each job together with the others (``jobs`` is
    then 1)."""
    status = dist.broadcast_object({n: j.status() for n, j in sources.items()})  # rank 0's view on every rank
    todo = [j for n, j in sources.items() if isinstance(j, Job) and status[n] != "complete"]
    for job in todo:  # a global batch that does not split across the ranks fails before any training
        rank_batch_size(job.train.batch_size)
        check_precision(job.train, device)
    teacher = sources[TEACHER]
    if teacher in todo:
        run_job(teacher, str(device), reporter.train_progress)
    rest = [j for j in todo if j is not teacher]
    while rest:
        wave = [j for j in rest if not any(j.init_source is other for other in rest)]
        if not wave:  # plan_jobs refuses cycles; this guards against a source list built elsewhere
            raise RuntimeError(f"warm starts form a cycle among {', '.join(j.method for j in rest)}")
        rest = [j for j in rest if all(j is not w for w in wave)]
        _train_wave(wave, device, jobs, reporter)
    return [j.method for j in todo]


def _train_wave(wave: list[Job], device: torch.device, jobs: int, reporter: Reporter) -> None:
    """Independent jobs: one after the other, or in ``jobs`` CPU worker processes."""
    if jobs <= 1 or len(wave) <= 1 or device.type != "cpu":
        for j in wave:
            run_job(j, str(device), reporter.train_progress)
        return
    threads = max(1, torch.get_num_threads() // jobs)
    queue = reporter.queue()
    forward = _QueueProgress(queue) if queue is not None else None
    train_in_workers(wave, jobs, threads, forward, reporter.drain)


class _QueueProgress:
    """Picklable progress callback that forwards (name, step, total, log) through a queue."""

    REPORT_EVERY = 50

    def __init__(self, queue) -> None:
        self.queue = queue

    def __call__(self, name: str, step: int, total: int, log: dict) -> None:
        if step % self.REPORT_EVERY == 0 or step == total:
            self.queue.put((name, step, total, {"loss": log.get("loss", float("nan"))}))

def run_sweep(
    cfg: SweepConfig,
    out_root: Path,
    *,
    cache_dir: Path | None = None,
    data_dir: str | None = None,
    device: torch.device = torch.device("cpu"),
    jobs: int = 1,
    reporter: Reporter | None = None,
    inception_weights: str | None = None,
) -> SweepOutcome:
    """Run a sweep end to end and write its outputs; returns the rows and where they went."""
    reporter = reporter or Reporter()
    dataset = get_dataset(cfg.dataset, data_dir)
    from bench.fid import resolve_inception_weights, uses_inception

    groups = resolve_groups(cfg.eval)
    if uses_inception(dataset) and groups & QUALITY_GROUPS:  # a missing weights file fails now, not after hours of training
        resolve_inception_weights(inception_weights)
    out_dir = out_root / dataset.name
    check_writable(out_root)
    cache_dir = cache_dir or out_root / "checkpoints"
    check_writable(cache_dir, "checkpoint cache")
    kappa = cfg.kappa if cfg.kappa is not None else dataset.kappa
    sigma_0 = cfg.sigma_0 if cfg.sigma_0 is not None else dataset.sigma_0
    outcome = SweepOutcome([], out_dir)

    start = time.perf_counter()
    sources = plan_jobs(cfg, dataset, data_dir, cache_dir, kappa, sigma_0)
    reporter.stage(f"training ({dataset.name}): {', '.join(f'{n} [{j.status()}]' for n, j in sources.items())}")
    outcome.trained = train_all(sources, device, jobs, reporter)
    outcome.stage_s["train"] = time.perf_counter() - start

    start = time.perf_counter()  # every rank evaluates its share of every batch (bench/shards.py)
    arrays = evaluate_all(cfg, dataset, sources, outcome, device, cache_dir, inception_weights, reporter)
    outcome.stage_s["evaluate"] = time.perf_counter() - start
    if not dist.is_main():  # rank 0 holds the same rows and writes them
        return outcome
    write_outputs(cfg, outcome, list(sources.values()), device)
    if cfg.figures:
        start = time.perf_counter()
        reporter.stage("figures")
        from bench.report import write_figures

        outcome.figures = write_figures(outcome, dataset, sources, arrays, cfg, device)
        outcome.stage_s["figures"] = time.perf_counter() - start
        write_outputs(cfg, outcome, list(sources.values()), device)  # env.json with the figure stage
    return outcome


def evaluate_all(
    cfg: SweepConfig,
    dataset,
    sources: dict[str, Source],
    outcome: SweepOutcome,
    device: torch.device,
    cache_dir: Path,
    inception_weights: str | None,
    reporter: Reporter,
) -> dict[str, dict[str, Tensor]]:
    """Every method's cell, reused when its key matches; the context (teacher reference, image
    features) is built only if some cell must be computed. Returns per-point NLL arrays."""
    teacher_job = sources[TEACHER]
    cells_dir = outcome.out_dir / "cells"
    ctx = None
    arrays: dict[str, dict[str, Tensor]] = {}
    for name in cfg.methods:
        job = sources[name]
        key = _cell_key(cfg, job, teacher_job)
        cached = None if key is None else _read_cell(cells_dir / f"{name}.json", cells_dir / f"{name}.npz", key)
        cached = dist.broadcast_object(cached)  # rank 0's view: every rank reuses the cell, or every rank computes it
        if cached is not None:
            rows, arrays[name] = cached
            outcome.rows += rows
            outcome.reused_cells.append(name)
            continue
        if ctx is None:
            reporter.stage("exact-ODE reference of the teacher" + (" and sample-quality features" if dataset.levels else ""))
            teacher = load_source(teacher_job, cfg, dataset, device)
            ctx = prepare(dataset, cfg.eval, teacher=teacher, device=device, cache_dir=cache_dir,
                          inception_weights=inception_weights, teacher_name=TEACHER)
        reporter.stage(f"evaluating {name} at NFE {', '.join(map(str, cfg.nfe))}")
        model = ctx.teacher_model if name == TEACHER else load_source(job, cfg, dataset, device)
        arrays[name] = {}
        rows = rows_from_frame(evaluate(model, name=name, nfe=cfg.nfe, context=ctx, per_point=arrays[name]))
        if key is not None and dist.is_main():
            _write_cell(cells_dir / f"{name}.json", cells_dir / f"{name}.npz", key, rows, arrays[name])
        outcome.rows += rows
    if dataset.levels and resolve_groups(cfg.eval) & QUALITY_GROUPS:
        from bench.fid import quality_for

        quality = ctx.quality if ctx is not None else quality_for(dataset, cache_dir, inception_weights, device)
        outcome.quality_floor = _quality_floor(quality, dataset, cfg.eval.num_samples, cfg.eval.seed)
    return arrays


def _quality_floor(quality, dataset, num: int, seed: int) -> dict:
    """The image metric of held-out test images: ``num`` distinct ones (a fixed random subset)
    when the test split has that many, else all of them. This is roughly what a sampler of the
    true distribution scores with ``num`` samples; with fewer test images than samples it is
    biased upwards (Frechet distances grow as N shrinks) and is no lower bound. Test images are
    never repeated: duplicates inflate the distance. Empty for 2D data."""
    if quality is None:
        return {}
    levels = dataset.test_levels()
    count = min(num, len(levels))
    index = torch.randperm(len(levels), generator=torch.Generator().manual_seed(seed))[:count]
    rows = quality.levels_metrics(levels[index])
    note = f"{count} distinct test images" + (f" (fewer than the {num} samples: biased upwards)" if count < num else "")
    return {metric: {"value": v, "stderr": se, "estimator": f"{est}; {note}"} for metric, v, se, est in rows}

EVAL_VERSION = 5  # bump when evaluation code changes numbers, so cached cells are recomputed


def load_source(source: Source, cfg: SweepConfig, dataset, device: torch.device):
    """The FlowMap to evaluate: a checkpoint's EMA (or selected) weights, or a user loader's model."""
    if isinstance(source, UserModel):
        return source.load(dataset.data_shape, device)
    return load_checkpoint(source.directory, ema=cfg.eval.use_ema, best=cfg.eval.use_best, device=device)


def _cell_key(cfg: SweepConfig, job: Source, teacher_job: Source) -> str | None:
    """The cache key of an evaluation cell; None (never cached) for models behind a user loader."""
    if isinstance(job, UserModel) or isinstance(teacher_job, UserModel):
        return None
    return stable_hash({
        "version": EVAL_VERSION,
        "checkpoint": read_meta(job.directory)["sha256"],
        "teacher": read_meta(teacher_job.directory)["sha256"],
        "eval": key_dict(cfg.eval),
        "nfe": list(cfg.nfe),
    })

def _write_cell(path: Path, arrays_path: Path, key: str, rows: list[Row], arrays: dict[str, Tensor]) -> None:
    """Arrays first, rows last: a cell counts as done only once its JSON exists."""
    import numpy as np

    payload = {name: value.double().numpy() for name, value in arrays.items()} | {"key": np.array(key)}

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **payload)

    write_with(arrays_path, save)
    write_json(path, {"key": key, "rows": rows_to_json(rows)})


def _read_cell(path: Path, arrays_path: Path, key: str) -> tuple[list[Row], dict[str, Tensor]] | None:
    """A finished cell with this key, or None (missing, stale or unreadable cells are recomputed)."""
    import numpy as np

    try:
        data = json.loads(path.read_text())
        with np.load(arrays_path, allow_pickle=False) as npz:
            if data.get("key") != key or str(npz["key"]) != key:
                return None
            arrays = {name: torch.from_numpy(npz[name]) for name in npz.files if name != "key"}
        return rows_from_json(data["rows"]), arrays
    except (OSError, ValueError, KeyError, TypeError):
        return None

def write_outputs(cfg: SweepConfig, outcome: SweepOutcome, jobs: list[Source], device: torch.device) -> None:
    """results.csv, results.md, config.yaml, env.json and training.json, each atomically."""
    import yaml

    from bench.tables import rows_frame, wide_markdown

    out = outcome.out_dir
    frame = rows_frame(outcome.rows)
    write_text(out / "results.csv", frame.to_csv(index=False))
    write_text(out / "results.md", wide_markdown(frame, title=f"f2d2-bench sweep: {cfg.dataset}"))
    write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    env = environment(device) | {
        "world_size": dist.world_size(),
        "backend": dist.backend(),
        "stage_s": outcome.stage_s,
        "trained": outcome.trained,
        "reused_cells": outcome.reused_cells,
        "sample_quality_of_test_data": outcome.quality_floor,
        "figures": outcome.figures,
    }
    write_json(out / "env.json", env)
    training = {}
    for job in jobs:
        if isinstance(job, UserModel):
            training[job.method] = {"loader": job.spec}
            continue
        meta = read_meta(job.directory)
        training[job.method] = {
            "checkpoint": str(job.directory),
            "steps": meta["step"],
            "num_skipped": meta.get("num_skipped"),
            "train_wall_s": meta.get("train_wall_s"),
            "world_sizes": meta.get("world_sizes"),
            "torch_threads": meta.get("torch_threads"),
            "history": meta.get("history", []),
            "validation": meta.get("validation", []),
            "best_step": meta.get("best_step"),
        }
    write_json(out / "training.json", training)
