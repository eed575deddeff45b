"""Checkpoint files: content-named weights, metadata types, and the legacy (format 1) layout."""

from __future__ import annotations

import json

import pytest
import torch

from baselines import get_method
from bench.checkpoint import META, CheckpointError, load_checkpoint, read_meta
from bench.config import ModelConfig, TrainConfig
from bench.jobs import Job, _save
from bench.models import build_model
from bench.train import init_state

SMALL = ModelConfig(hidden=8, depth=1, x_frequencies=1, t_frequencies=1)


def saved(tmp_path, steps: int = 1):
    spec = get_method("meanflow-f2d2")
    job = Job("meanflow-f2d2", spec.config, SMALL, TrainConfig(steps=5), "checkerboard", None, 10.0, 2.0, None, str(tmp_path))
    model = build_model(SMALL, (2,), spec.build().capabilities, kappa=10.0, sigma_0=2.0)
    state = init_state(model, TrainConfig(steps=5))
    state.step = steps
    _save(job, state, complete=False)
    return job, state


def test_weights_are_content_named_and_old_ones_removed(tmp_path):
    job, state = saved(tmp_path)
    first = read_meta(job.directory)["weights_file"]
    assert first.startswith("weights-") and (job.directory / first).is_file()
    with torch.no_grad():
        next(state.model.parameters()).add_(1.0)
    _save(job, state, complete=True)
    second = read_meta(job.directory)["weights_file"]
    assert second != first and not (job.directory / first).exists()
    assert sorted(p.name for p in job.directory.iterdir()) == sorted([META, second])


def test_legacy_format_one_checkpoints_still_load(tmp_path):
    job, state = saved(tmp_path)
    meta = json.loads((job.directory / META).read_text())
    (job.directory / meta.pop("weights_file")).rename(job.directory / "checkpoint.safetensors")
    meta["format_version"] = 1
    (job.directory / META).write_text(json.dumps(meta))
    loaded = load_checkpoint(job.directory, ema=False)
    x = torch.randn(4, 2)
    torch.testing.assert_close(loaded(x, 0.1, 0.6).u, state.model(x, 0.1, 0.6).u, rtol=0, atol=0)


@pytest.mark.parametrize("field,value", [("kappa", "big"), ("data_shape", None), ("complete", 1), ("step", True), ("kappa", -1.0)])
def test_wrongly_typed_metadata_is_refused_naming_the_file(tmp_path, field, value):
    job, _ = saved(tmp_path)
    meta = json.loads((job.directory / META).read_text())
    meta[field] = value
    (job.directory / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="checkpoint.json"):
        load_checkpoint(job.directory)
