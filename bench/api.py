"""The Python evaluation API: the one function that turns a flow model into result rows.

    from bench import evaluate, load_checkpoint
    frame = evaluate(load_checkpoint("runs/checkpoints/digits/meanflow-f2d2-<key>"), dataset="digits", nfe=[1, 2, 4, 8])

:func:`evaluate` takes any :class:`~f2d2.model.FlowMap` (trained here, imported, or built from your
own network) and returns the tidy rows of ``results.csv`` as a pandas DataFrame, with the same
metrics, flags and estimators as a sweep: ``f2d2-bench sweep`` calls this function for every
method (with a shared :class:`~bench.cells.EvalContext` from :func:`prepare`, so that the teacher's
reference and the sample-quality features are computed once).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from bench.cells import EvalContext, Row, evaluate_cell
from bench.config import ConfigError, EvalConfig, measured_groups, merge
from bench.datasets import Dataset, get_dataset
from bench.env import device_name, resolve_device
from bench.measure import per_sample_noise, reference
from f2d2.model import FlowMap

LIKELIHOOD_GROUPS = frozenset({"nll", "calibration", "timing"})
SAMPLE_GROUPS = frozenset({"quality", "timing", "guidance"})
QUALITY_GROUPS = frozenset({"quality", "guidance"})  # need the sample-quality evaluator (FID: Inception)


def resolve_groups(cfg: EvalConfig) -> frozenset[str]:
    """The metric groups a sweep computes (:func:`bench.config.measured_groups`)."""
    return measured_groups(cfg)


def prepare(
    dataset: Dataset,
    cfg: EvalConfig,
    *,
    teacher: FlowMap | None = None,
    device: torch.device | str = "cpu",
    cache_dir: str | Path = "runs/checkpoints",
    inception_weights: str | None = None,
    teacher_name: str = "flow-matching",
) -> EvalContext:
    """What every model of one evaluation shares: test points, sampling noise (per-sample seeds),
    the teacher's exact-ODE reference (with the nll group and a teacher) and the sample-quality
    evaluator (with the quality or guidance group; FID needs the Inception file)."""
    from bench.fid import quality_for

    device = torch.device(device)
    groups = resolve_groups(cfg)
    quality = quality_for(dataset, cache_dir, inception_weights, device) if groups & QUALITY_GROUPS else None
    x_test = dataset.test_set(cfg.num_test).to(device)
    num_noise = cfg.num_samples if groups & SAMPLE_GROUPS else 0
    noise = per_sample_noise(num_noise, dataset.data_shape, cfg.seed, device) if num_noise else x_test.new_zeros((0, *dataset.data_shape))
    teacher_ref = reference(teacher, x_test, cfg, device) if teacher is not None and "nll" in groups else None
    return EvalContext(dataset, x_test, noise, teacher_ref, cfg, device, device_name(device), quality, teacher_name, groups, teacher)


def evaluate(
    model: FlowMap,
    *,
    dataset: str | Dataset = "checkerboard",
    nfe: Iterable[int] = (1, 2, 4, 8),
    name: str | None = None,
    teacher: FlowMap | None = None,
    eval: EvalConfig | Mapping | None = None,
    metrics: Iterable[str] | None = None,
    device: torch.device | str | None = None,
    data_dir: str | None = None,
    cache_dir: str | Path = "runs/checkpoints",
    inception_weights: str | None = None,
    context: EvalContext | None = None,
    per_point: dict[str, Tensor] | None = None,
):
    """Evaluate one flow model at every NFE; returns a DataFrame of result rows (``results.csv``'s
    columns: dataset, method, nfe, metric, value, stderr, flag, estimator, num_points, device).

    Args:
        model: any :class:`~f2d2.model.FlowMap` (its capabilities decide F2D2 or naive likelihoods).
        dataset: a registered dataset name (``f2d2-bench datasets``) or a Dataset instance.
        nfe: numbers of network evaluations.
        name: the row label (default: ``model.meta['method']``, else 'model').
        teacher: a flow-matching teacher whose exact NLL fills the ``nll_teacher_*`` rows.
        eval: an EvalConfig, or overrides (a mapping) of the dataset's default evaluation settings.
        metrics: metric groups (default: every group, see :data:`bench.config.METRIC_GROUPS`).
        device: 'cpu', 'cuda', ... (default: where the model's parameters are, else auto).
        context: a prepared :class:`EvalContext` (from :func:`prepare`); then dataset, teacher,
            eval and metrics come from it.
        per_point: if given, filled with per-point NLLs in nats ('ref', 'nfe<K>'), for figures.

    The model is moved to the evaluation device and put in eval mode (in place, as ``nn.Module.to``
    does). Under torchrun every rank must call this together: batches are sharded (bench/shards.py).
    """
    from bench.config import validate_nfe
    from bench.tables import rows_frame

    nfe = tuple(int(k) for k in nfe)
    validate_nfe(nfe)
    if context is None:
        ds = dataset if isinstance(dataset, Dataset) else get_dataset(dataset, data_dir)
        cfg = _eval_config(ds, eval, metrics)
        dev = torch.device(device) if device is not None else _device_of(model)
        context = prepare(ds, cfg, teacher=teacher, device=dev, cache_dir=cache_dir, inception_weights=inception_weights)
    _check_model(model, context.dataset)
    label = name or str(model.meta.get("method") or "model")
    own_ref = context.teacher_ref if model is context.teacher_model else None
    rows, arrays = evaluate_cell(label, model.to(context.device).eval(), context, nfe, own_ref)
    if per_point is not None:
        per_point.update(arrays)
    return rows_frame(rows)


def rows_from_frame(frame) -> list[Row]:
    """The Row objects of a result DataFrame (inverse of :func:`bench.tables.rows_frame`)."""
    return [
        Row(str(r.dataset), str(r.method), int(r.nfe), str(r.metric), float(r.value), float(r.stderr),
            str(r.flag), str(r.estimator), int(r.num_points), str(r.device))
        for r in frame.itertuples(index=False)
    ]


def _eval_config(dataset: Dataset, overrides: EvalConfig | Mapping | None, metrics: Iterable[str] | None) -> EvalConfig:
    from dataclasses import replace

    from bench.profiles import default_config

    if isinstance(overrides, EvalConfig):
        cfg = overrides
    else:
        try:
            base = default_config(dataset.name).eval
        except ConfigError:  # a dataset without a profile (e.g. your own): the general defaults
            base = EvalConfig()
        cfg = merge(base, dict(overrides or {}), "eval")
    if metrics is not None:
        cfg = replace(cfg, metrics=tuple(metrics))
    return cfg


def _device_of(model: FlowMap) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return resolve_device("auto")


def _check_model(model: FlowMap, dataset: Dataset) -> None:
    if not isinstance(model, FlowMap):
        raise TypeError(f"evaluate() needs an f2d2.model.FlowMap, got {type(model).__name__}")
    if tuple(model.data_shape) != tuple(dataset.data_shape):
        raise ConfigError(f"model data shape {tuple(model.data_shape)} does not match {dataset.name} {tuple(dataset.data_shape)}")
