"""Checkpoints that cannot run code: weights in safetensors, metadata in JSON beside them.

Layout of a checkpoint directory::

    weights-<sha256[:16]>.safetensors   model/*, ema/*, best/* weights; optim/* Adam state; rng/*
    checkpoint.json                     method, dataset, data shape, capabilities, kappa, sigma_0,
                                        configs, step, completeness, versions, git commit, and the
                                        name and sha256 of its weights file

The weights file is named by its content and written before the metadata that points to it; the
previous weights are deleted only after the new metadata is in place. An interruption at any moment
therefore leaves a consistent pair (the old one or the new one). Loading never unpickles: it parses
JSON, checks field types, verifies the weights against the recorded sha256 (a truncated or swapped
file is refused), rebuilds the network from the recorded configs and loads tensors by name with
strict shape checks. Every failure is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from bench.config import ConfigError, ModelConfig, from_dict
from bench.env import git_commit, package_version
from bench.io import write_json, write_with
from f2d2.model import Capabilities, FlowMap

FORMAT_VERSION = 2
LEGACY_WEIGHTS = {1: "checkpoint.safetensors"}  # format 1 used one fixed weights file name
META = "checkpoint.json"
WEIGHTS_PREFIX, WEIGHTS_SUFFIX = "weights-", ".safetensors"
# required metadata fields and the JSON types they must have
REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format_version": int, "method": str, "dataset": str, "data_shape": list, "capabilities": dict,
    "kappa": (int, float), "sigma_0": (int, float), "model": dict, "step": int, "complete": bool,
    "sha256": str, "weights_file": str,
}


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged or does not match what was asked for."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_weights(name: str) -> bool:
    return name.startswith(WEIGHTS_PREFIX) and name.endswith(WEIGHTS_SUFFIX)


def checkpoint_dir(path: str | Path) -> Path:
    """Accept the directory or either of its files."""
    path = Path(path)
    return path.parent if path.name == META or _is_weights(path.name) or path.name in LEGACY_WEIGHTS.values() else path


def save_checkpoint(directory: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Content-named weights, then the metadata pointing to them, then removal of older weights."""
    from safetensors.torch import save_file

    directory = Path(directory)
    meta = {
        **meta,
        "format_version": FORMAT_VERSION,
        "package_version": package_version(),
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    flat = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    staged = directory / f"{WEIGHTS_PREFIX}staged{WEIGHTS_SUFFIX}.part"
    write_with(staged, lambda tmp: save_file(flat, str(tmp)))
    digest = sha256_file(staged)
    weights = directory / f"{WEIGHTS_PREFIX}{digest[:16]}{WEIGHTS_SUFFIX}"
    os.replace(staged, weights)
    write_json(directory / META, {**meta, "sha256": digest, "weights_file": weights.name})
    for old in directory.iterdir():
        if (_is_weights(old.name) or old.name in LEGACY_WEIGHTS.values()) and old.name != weights.name:
            old.unlink()


def read_meta(path: str | Path) -> dict[str, Any]:
    """The validated metadata of a checkpoint (no weights read beyond the hash check)."""
    directory = checkpoint_dir(path)
    meta_path = directory / META
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: checkpoint metadata not found")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: expected a JSON object")
    if meta.get("format_version") in LEGACY_WEIGHTS and "weights_file" not in meta:
        meta["weights_file"] = LEGACY_WEIGHTS[meta["format_version"]]
    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise CheckpointError(f"{meta_path}: missing metadata field(s) {', '.join(missing)}")
    for key, kind in REQUIRED.items():
        value = meta[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise CheckpointError(f"{meta_path}: field {key!r} has the wrong type ({type(value).__name__})")
    if meta["format_version"] not in (FORMAT_VERSION, *LEGACY_WEIGHTS):
        raise CheckpointError(f"{meta_path}: format_version {meta['format_version']}, expected {FORMAT_VERSION}")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in meta["data_shape"]):
        raise CheckpointError(f"{meta_path}: data_shape must be a list of positive integers, got {meta['data_shape']}")
    if meta["kappa"] <= 0 or meta["sigma_0"] <= 0:
        raise CheckpointError(f"{meta_path}: kappa and sigma_0 must be positive")
    legacy = meta["weights_file"] == LEGACY_WEIGHTS.get(meta["format_version"])
    if not (_is_weights(meta["weights_file"]) or legacy) or "/" in meta["weights_file"]:
        raise CheckpointError(f"{meta_path}: weights_file {meta['weights_file']!r} is not a weights file name")
    return meta


def read_tensors(path: str | Path, meta: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, after checking the file against its recorded sha256."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = checkpoint_dir(path)
    meta = read_meta(directory) if meta is None else meta
    weights = directory / meta["weights_file"]
    if not weights.is_file():
        raise CheckpointError(f"{weights}: checkpoint weights not found")
    if sha256_file(weights) != meta["sha256"]:
        raise CheckpointError(f"{weights}: sha256 does not match {META} (truncated or replaced file)")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({err})") from None


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}


def check_expected(meta: dict[str, Any], where: Path, **expected: Any) -> None:
    for key, value in expected.items():
        if value is not None and meta.get(key) != value:
            raise CheckpointError(f"{where}: checkpoint is for {key} {meta.get(key)!r}, expected {value!r}")


def load_checkpoint(
    path: str | Path,
    *,
    ema: bool = True,
    best: bool = True,
    device: str | torch.device = "cpu",
    method: str | None = None,
    dataset: str | None = None,
) -> FlowMap:
    """Load a trained model for evaluation from Python, without the CLI.

    Args:
        path: checkpoint directory (or its .json / .safetensors file).
        ema: load the EMA weights (what the harness evaluates) instead of the raw ones.
        best: if training selected weights by a validation criterion (``train.select``), load
            those (``meta['best_step']``) instead of the last EMA weights.
        device: where to put the model.
        method, dataset: if given, refuse a checkpoint of another method or dataset.

    Returns:
        A :class:`~f2d2.model.FlowMap` in eval mode: ``model.velocity(x, t)`` is the instantaneous
        velocity, ``model.phi(x, t, s)`` the flow map, ``model(x, t, s).div`` the divergence head
        (None without one), ``model.kappa`` / ``model.sigma_0`` its scales and ``model.meta`` the
        checkpoint metadata (method, dataset, configs, training step, versions).

    Example:
        >>> model = load_checkpoint("results/checkpoints/checkerboard/meanflow-f2d2-1a2b3c4d5e6f")
        >>> from f2d2 import few_step_log_prob
        >>> log_p = few_step_log_prob(model, x, num_steps=1).log_p
    """
    from bench.models import build_model

    directory = checkpoint_dir(path)
    meta = read_meta(directory)
    check_expected(meta, directory / META, method=method, dataset=dataset)
    tensors = read_tensors(directory, meta)
    try:
        caps = Capabilities(**meta["capabilities"])
        model_cfg = from_dict(ModelConfig, meta["model"], "model")
        if not all(isinstance(v, bool) for v in meta["capabilities"].values()):
            raise TypeError("capabilities must be booleans")
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{directory / META}: invalid model description ({err})") from None
    try:  # a user architecture ("module:factory") is imported and checked against the protocol here
        model = build_model(
            model_cfg, tuple(meta["data_shape"]), caps, kappa=meta["kappa"], sigma_0=meta["sigma_0"], meta=meta
        )
    except ConfigError as err:
        raise CheckpointError(f"{directory / META}: {err}") from None
    selected = best and ema and meta.get("best_step") is not None
    prefix = "best/" if selected else ("ema/" if ema else "model/")
    state = prefixed(tensors, prefix)
    if not state:  # imported checkpoints carry their EMA weights only
        raise CheckpointError(f"{directory / meta['weights_file']}: no {prefix!r} weights in this checkpoint (load with ema=True)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise CheckpointError(f"{directory / meta['weights_file']}: weights do not fit the recorded model ({first[0]} ...)") from None
    return model.to(device).eval()
