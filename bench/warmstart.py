"""Warm starts (``train.init_from``): a new model begins from another trained checkpoint's weights.

The source is a method of the same sweep (bench/sweep.py trains it first and keys the new model by
its cache key) or a checkpoint path (keyed by its weights' sha256). Parameters and buffers that
exist in the source under the same name are copied (EMA weights by default, ``train.init_weights``);
those the source lacks keep the fresh initialisation of ``train.seed`` (e.g. F2D2's divergence head
when starting from Shortcut-Distill, or the step path when starting from the flow-matching teacher,
whose network has none); source tensors the new network lacks are ignored. The record of what was
loaded is saved in the checkpoint metadata (``init_from``). A name present in both with another
shape is an error: the networks are not the same architecture.

Planning (bench/sweep.py plan_jobs): :func:`warm_start_order` puts every source before the methods
that start from it (adding sources that are not among the sweep's methods; they are trained but
not evaluated, like the teacher) and refuses cycles; :func:`warm_start_source` resolves a name or a
path. The teacher trains before everything else, so its own ``init_from`` must be a path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from baselines import get_method
from bench.checkpoint import META, CheckpointError, checkpoint_dir, prefixed, read_meta, read_tensors
from bench.config import ConfigError, SweepConfig
from f2d2.model import FlowMap

WEIGHT_PREFIX = {"ema": "ema/", "model": "model/"}


def source_identity(directory: Path) -> dict:
    """What a warm start from the checkpoint at ``directory`` adds to a cache key: its weights' sha256."""
    return {"sha256": read_meta(directory)["sha256"]}


def _match(directory: Path, target: dict[str, tuple], source: dict[str, tuple]) -> list[str]:
    """Names in both (in the target's order); a shape mismatch or nothing in common is an error."""
    where = directory / META
    shared = [name for name in target if name in source]
    wrong = [f"{n} {source[n]} there, {target[n]} here" for n in shared if tuple(source[n]) != tuple(target[n])]
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise CheckpointError(f"{where}: cannot warm-start, shapes differ: {'; '.join(wrong[:3])}{more}")
    if not shared:
        raise CheckpointError(f"{where}: cannot warm-start, the networks share no parameter name")
    return shared


def warm_start(model: FlowMap, directory: str | Path, weights: str = "ema") -> dict:
    """Copy the shared parameters and buffers of the checkpoint at ``directory`` into ``model``.

    Returns the record stored in the new checkpoint's metadata: the source (directory, method,
    cache key, sha256, step), which weights, and the names loaded (``loaded``), kept fresh
    (``fresh``) and ignored (``unused``, in the source only).
    """
    directory = Path(directory)
    meta = read_meta(directory)
    where = directory / META
    if not meta["complete"]:
        raise CheckpointError(f"{where}: cannot warm-start from an unfinished checkpoint (step {meta['step']})")
    if tuple(meta["data_shape"]) != tuple(model.data_shape):
        raise CheckpointError(
            f"{where}: cannot warm-start a model of data shape {tuple(model.data_shape)} from one of {tuple(meta['data_shape'])}"
        )
    source = prefixed(read_tensors(directory, meta), WEIGHT_PREFIX[weights])
    target = model.state_dict()
    shared = _match(directory, {n: tuple(v.shape) for n, v in target.items()}, {n: tuple(v.shape) for n, v in source.items()})
    with torch.no_grad():
        for name in shared:
            target[name].copy_(source[name])
    return {
        "source": str(directory),
        "method": meta["method"],
        "cache_key": meta.get("cache_key"),
        "sha256": meta["sha256"],
        "step": meta["step"],
        "weights": weights,
        "loaded": shared,
        "fresh": [name for name in target if name not in source],
        "unused": [name for name in source if name not in target],
    }


def check_warm_start(model: FlowMap, directory: str | Path, weights: str = "ema") -> None:
    """Before any training: the shapes :func:`warm_start` would copy agree (read from the weights
    file's header; ``model`` may live on the meta device)."""
    from safetensors import safe_open

    directory = Path(directory)
    meta = read_meta(directory)
    prefix = WEIGHT_PREFIX[weights]
    with safe_open(str(directory / meta["weights_file"]), framework="pt") as handle:
        source = {k[len(prefix):]: tuple(handle.get_slice(k).get_shape()) for k in handle.keys() if k.startswith(prefix)}
    _match(directory, {n: tuple(v.shape) for n, v in model.state_dict().items()}, source)


def check_job_source(job: Any, data_shape: tuple[int, ...]) -> None:
    """:func:`check_warm_start` for a job whose source is a checkpoint path (sources trained in the
    same sweep share the sweep's model config, so their shapes agree by construction)."""
    from bench.models import build_model

    caps = get_method(job.method).build(job.method_config).capabilities
    with torch.device("meta"):
        model = build_model(job.model, tuple(data_shape), caps, kappa=job.kappa, sigma_0=job.sigma_0)
    check_warm_start(model, job.init_source, job.train.init_weights)


# Planning: which model starts from which, and in what order the sweep trains them -------------


def _init_from(cfg: SweepConfig, name: str, teacher: str) -> str | None:
    """``train.init_from`` of ``name`` (None for a provided checkpoint, which is not trained)."""
    if name in cfg.checkpoints:
        return None
    return (cfg.teacher_train if name == teacher else cfg.train_for(name)).init_from


def _names_a_method(spec: str) -> bool:
    try:
        get_method(spec)
    except KeyError:
        return False
    return True


def warm_start_order(cfg: SweepConfig, names: list[str], teacher: str) -> list[str]:
    """``names`` with the methods they warm-start from inserted before them (depth first); a cycle
    is a :class:`ConfigError` naming it."""
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in chain:
            raise ConfigError(f"train.init_from forms a cycle: {' -> '.join((*chain[chain.index(name):], name))}")
        spec = _init_from(cfg, name, teacher)
        if spec is not None and _names_a_method(spec) and spec != teacher:
            visit(spec, (*chain, name))
        order.append(name)

    for name in names:
        visit(name, ())
    return order


def warm_start_source(cfg: SweepConfig, name: str, teacher: str, sources: dict, dataset) -> Any:
    """What ``name`` warm-starts from: the Job of a method trained in this sweep (already in
    ``sources``, see :func:`warm_start_order`), or a checkpoint directory (a path, or a method given
    by --checkpoint); None without a warm start."""
    from bench.jobs import Job
    from bench.loaders import UserModel

    spec = _init_from(cfg, name, teacher)
    if spec is None:
        return None
    where = f"train.init_from {spec!r} of {name}"
    if _names_a_method(spec):
        if name == teacher:
            raise ConfigError(f"teacher_train.init_from must be a checkpoint path: the teacher ({teacher}) trains before every other model")
        source = sources[spec]
        if isinstance(source, UserModel):
            raise ConfigError(f"{where}: {spec} is given by a loader ({source.spec}); warm starts need a checkpoint")
        return source if isinstance(source, Job) else str(source.directory)
    directory = checkpoint_dir(spec)
    try:
        meta = read_meta(directory)
    except CheckpointError as err:
        raise ConfigError(f"{where} is neither a method name nor a readable checkpoint ({err})") from None
    if tuple(meta["data_shape"]) != tuple(dataset.data_shape) or not meta["complete"]:
        raise ConfigError(
            f"{where}: the checkpoint is {'complete' if meta['complete'] else 'unfinished'}, data shape "
            f"{tuple(meta['data_shape'])}; need a complete one of {dataset.name} {tuple(dataset.data_shape)}"
        )
    return str(directory)
