"""Train-or-load: checkpoints cached under a hash of everything that determines the weights.

A job is one method to train for one sweep. Its directory is
``<cache>/<dataset>/<method>-<key>/``; a complete checkpoint there is reused, a partial one
(written every ``train.checkpoint_every`` steps) is resumed bit for bit, nothing else is trusted.
Jobs are plain dataclasses so that independent ones can train in parallel worker processes.

Under torchrun every rank runs the same job (bench/train.py trains it data-parallel). Rank 0 alone
writes checkpoints; the others wait at a barrier after each save, so that a checkpoint (say, the
teacher's) is complete before any rank reads it. The cache directory must be one that every rank
sees (a shared filesystem on several nodes). A checkpoint records the world size it was saved at,
every rank's generator state and the world-size history (``world_sizes``). Resuming at the same
world size restores each rank's generator, so the run continues exactly as if never stopped;
at another world size each rank re-seeds from (seed, rank, step) (:func:`bench.train.stream_seed`),
deterministic but a different data order. The cache key leaves the world size out: weights trained
at one world size are reused at any other.

A job with a warm start (``train.init_from``, bench/warmstart.py) holds its source: another Job of
the sweep (keyed by that job's cache key, so the source must be trained first) or a checkpoint
directory (keyed by its weights' sha256). A fresh run copies the source's weights before the first
step; a resumed run takes everything from its own checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from baselines import get_method
from bench import dist
from bench.checkpoint import CheckpointError, load_checkpoint, prefixed, read_meta, read_tensors, save_checkpoint
from bench.config import ModelConfig, TrainConfig, key_dict, stable_hash, to_dict
from bench.datasets import get_dataset
from bench.io import remove_stale_temporaries
from bench.models import build_model
from bench.train import TrainState, init_state, scored_on_main, stream_seed, train
from bench.warmstart import source_identity, warm_start
from f2d2.method import MethodConfig

CACHE_VERSION = 1  # bump when a code change makes old checkpoints unusable

Progress = Callable[[str, int, int, dict], None]  # (job name, step, total steps, running log)


@dataclass(frozen=True)
class Job:
    """Everything needed to train one method, picklable for worker processes."""

    method: str
    method_config: MethodConfig
    model: ModelConfig
    train: TrainConfig
    dataset: str
    data_dir: str | None
    kappa: float
    sigma_0: float
    teacher_dir: str | None
    cache_root: str
    validation_nfe: tuple[int, ...] = (1, 2, 4, 8)
    validation_estimator: str = "exact"
    init_source: Job | str | None = None  # warm start: a Job of the sweep or a checkpoint directory

    def identity(self) -> dict:
        """What determines the trained weights (bookkeeping fields excluded). A warm start enters as
        its source's identity (cache key or sha256) and weights, not as the name or path given."""
        omit = (*TrainConfig.BOOKKEEPING, "init_from", "init_weights")
        train = {k: v for k, v in key_dict(self.train).items() if k not in omit}
        teacher = read_meta(self.teacher_dir)["cache_key"] if self.teacher_dir else None
        if self.train.validate_every:
            train["validation_nfe"] = list(self.validation_nfe)
            train["validation_estimator"] = self.validation_estimator
        identity = {
            "version": CACHE_VERSION,
            "dataset": self.dataset,
            "method": self.method,
            "method_config": key_dict(self.method_config),
            "model": key_dict(self.model),
            "train": train,
            "kappa": self.kappa,
            "sigma_0": self.sigma_0,
            "teacher": teacher,
        }
        if self.init_source is not None:
            source = {"cache_key": self.init_source.key} if isinstance(self.init_source, Job) else source_identity(Path(self.init_source))
            identity["init_from"] = {**source, "weights": self.train.init_weights}
        return identity

    @property
    def init_dir(self) -> Path | None:
        """The checkpoint directory a fresh run warm-starts from (None: no warm start)."""
        if self.init_source is None:
            return None
        return self.init_source.directory if isinstance(self.init_source, Job) else Path(self.init_source)

    @property
    def key(self) -> str:
        return stable_hash(self.identity())

    @property
    def directory(self) -> Path:
        return Path(self.cache_root) / self.dataset / f"{self.method}-{self.key}"

    def status(self) -> str:
        """'complete', 'partial' (resumable) or 'missing'."""
        try:
            return "complete" if read_meta(self.directory)["complete"] else "partial"
        except CheckpointError:
            return "missing"


RANK_GENERATOR = "rng/generator/rank{}"  # ranks >= 1; rank 0's stays "rng/generator" (one-process name)


def _state_tensors(state: TrainState, generators: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {f"model/{k}": v for k, v in state.model.state_dict().items()}
    tensors |= {f"ema/{k}": v for k, v in state.ema.state_dict().items()}
    opt = state.optimizer.state_dict()
    for idx, slots in opt["state"].items():
        tensors |= {f"optim/{idx}/{name}": torch.as_tensor(v) for name, v in slots.items()}
    tensors["rng/generator"] = generators[0]
    tensors |= {RANK_GENERATOR.format(r): g for r, g in enumerate(generators[1:], start=1)}
    if state.best is not None:
        tensors |= {f"best/{k}": v for k, v in state.best["state"].items()}
    return tensors


def _save(job: Job, state: TrainState, complete: bool) -> None:
    """Every rank calls this: the generator states are gathered, rank 0 writes, all meet after."""
    generators = dist.all_gather_objects(state.generator.get_state())
    if dist.is_main():
        _write(job, state, complete, generators)
    dist.barrier()


def _write(job: Job, state: TrainState, complete: bool, generators: list[torch.Tensor]) -> None:
    caps = state.model.capabilities
    meta = {
        "method": job.method,
        "dataset": job.dataset,
        "data_shape": list(state.model.data_shape),
        "capabilities": dataclasses.asdict(caps),
        "kappa": job.kappa,
        "sigma_0": job.sigma_0,
        "model": to_dict(job.model),
        "method_config": to_dict(job.method_config),
        "train": to_dict(job.train),
        "cache_key": job.key,
        "identity": job.identity(),
        "teacher_dir": job.teacher_dir,
        "step": state.step,
        "complete": complete,
        "ema": True,
        "num_skipped": state.num_skipped,
        "train_wall_s": state.wall_s,
        "optimizer_param_groups": state.optimizer.state_dict()["param_groups"],
        "running": state.running,
        "history": state.history,
        "validation": state.validation,
        "select": job.train.select,
        "best_step": state.best["step"] if state.best else None,
        "best_value": state.best["value"] if state.best else None,
        "world_size": len(generators),
        "world_sizes": state.world_sizes,
        "torch_threads": state.torch_threads,
    }
    if state.scaler is not None:
        meta["grad_scaler"] = state.scaler.state_dict()
    if job.train.grad_nan_to_num:
        meta["num_sanitized"] = state.num_sanitized
    if state.init is not None:
        meta["init_from"] = state.init
    save_checkpoint(job.directory, _state_tensors(state, generators), meta)


def _restore(job: Job, state: TrainState) -> None:
    meta = read_meta(job.directory)
    tensors = read_tensors(job.directory, meta)
    state.model.load_state_dict(prefixed(tensors, "model/"))
    state.ema.load_state_dict(prefixed(tensors, "ema/"))
    slots: dict[int, dict] = {}
    for name, value in prefixed(tensors, "optim/").items():
        idx, slot = name.split("/")
        slots.setdefault(int(idx), {})[slot] = value
    state.optimizer.load_state_dict({"state": slots, "param_groups": meta["optimizer_param_groups"]})
    state.step, state.num_skipped = meta["step"], meta["num_skipped"]
    if meta.get("world_size", 1) == dist.world_size():  # continue every rank's own stream
        rank = dist.rank()
        state.generator.set_state(tensors["rng/generator" if rank == 0 else RANK_GENERATOR.format(rank)])
    else:  # the saved streams belong to another split of the batch: start fresh, reproducible ones
        state.generator.manual_seed(stream_seed(job.train.seed, dist.rank(), state.step))
    state.world_sizes = meta.get("world_sizes", [{"from_step": 0, "world_size": 1}])
    # not recorded before 2026-12: the steps trained so far ran with an unknown count
    state.torch_threads = meta.get("torch_threads", [{"from_step": 0, "threads": None}])
    state.history, state.running, state.wall_s = meta["history"], meta["running"], meta["train_wall_s"]
    state.validation = meta.get("validation", [])
    if state.scaler is not None and "grad_scaler" in meta:
        state.scaler.load_state_dict(meta["grad_scaler"])
    state.num_sanitized, state.init = meta.get("num_sanitized", 0), meta.get("init_from")
    best = prefixed(tensors, "best/")
    if best:
        state.best = {"step": meta["best_step"], "value": meta["best_value"], "state": best}


def run_job(job: Job, device: str = "cpu", progress: Progress | None = None, threads: int | None = None) -> Path:
    """Train ``job`` (resuming a partial checkpoint) unless a complete one exists; return its directory."""
    if threads is not None:
        torch.set_num_threads(threads)
    status = dist.broadcast_object(job.status())  # rank 0's view: every rank takes the same path
    if status == "complete":
        return job.directory
    if dist.is_main():
        remove_stale_temporaries(job.directory)  # left by a run killed while it saved
    spec = get_method(job.method)
    method = spec.build(job.method_config)
    dataset = get_dataset(job.dataset, job.data_dir)
    teacher = load_checkpoint(job.teacher_dir, device=device).requires_grad_(False) if job.teacher_dir else None
    torch.manual_seed(job.train.seed)  # parameter initialisation
    model = build_model(
        job.model, dataset.data_shape, method.capabilities, kappa=job.kappa, sigma_0=job.sigma_0
    ).to(device)
    init = warm_start(model, job.init_dir, job.train.init_weights) if job.init_dir and status == "missing" else None
    state = init_state(model, job.train)  # after the warm start: the EMA starts from the loaded weights
    state.init = init
    if status == "partial":
        _restore(job, state)
    if not state.world_sizes or state.world_sizes[-1]["world_size"] != dist.world_size():
        state.world_sizes.append({"from_step": state.step, "world_size": dist.world_size()})
    if not state.torch_threads or state.torch_threads[-1]["threads"] != torch.get_num_threads():
        state.torch_threads.append({"from_step": state.step, "threads": torch.get_num_threads()})
    report = (lambda step, log: progress(job.method, step, job.train.steps, log)) if progress else None
    scorer = None
    if job.train.validate_every:
        from bench.validation import Scorer, image_quality

        dev = torch.device(device)

        def make_scorer() -> Scorer:
            quality = image_quality(dataset, job.cache_root, dev)
            return Scorer(dataset, job.train.num_validation, job.validation_nfe, dev, quality, job.validation_estimator)

        scorer = scored_on_main(make_scorer)
    train(
        state, method, dataset.train_batch, job.train, teacher=teacher, progress=report,
        on_checkpoint=lambda s: _save(job, s, False), on_validate=scorer,
    )
    _save(job, state, True)
    return job.directory


def worker_init() -> None:
    """Training workers ignore SIGINT: a Ctrl-C reaches the whole process group, and the parent
    alone decides what happens (see :func:`train_in_workers`). Otherwise an interrupted worker
    would report the interrupt as its job's result and start the next queued job."""
    import signal

    from bench.env import quiet_known_warnings

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    quiet_known_warnings()


def train_in_workers(jobs: list[Job], workers: int, threads: int, progress: Progress | None, drain: Callable[[], None]) -> None:
    """Train independent jobs in ``workers`` spawned processes. A job that fails lets the others
    finish (their checkpoints are cached) before its error is raised. If the parent is stopped
    (Ctrl-C, SIGTERM), queued jobs are cancelled and running ones terminated at once: their last
    periodic checkpoint stays valid (every save is a rename) and the next run resumes from it;
    temporary files of a save cut short are removed."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=worker_init)
    try:
        futures = {pool.submit(run_job, j, "cpu", progress, threads): j for j in jobs}
        wait_for(futures, drain)
    except BaseException:
        # Before Python 3.14 (terminate_workers) the executor cannot stop running calls, so its
        # worker processes are terminated directly.
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in processes:
            proc.terminate()
        for proc in processes:
            proc.join()
        for job in jobs:
            remove_stale_temporaries(job.directory)
        raise
    pool.shutdown()


def wait_for(futures: dict, drain: Callable[[], None], poll_s: float = 0.2) -> None:
    """Block until every future is done, calling ``drain`` (progress updates) meanwhile."""
    pending = set(futures)
    while pending:
        drain()
        pending = {f for f in pending if not f.done()}
        time.sleep(poll_s if pending else 0)
    drain()
    for future in futures:
        future.result()  # re-raise a worker's exception here
