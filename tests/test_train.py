"""The training loop: learning-rate schedule, non-finite steps, resumption, determinism."""

from __future__ import annotations

import json
import math

import pytest
import torch

from baselines import get_method
from bench.config import ModelConfig, TrainConfig
from bench.datasets import Checkerboard
from bench.jobs import Job, run_job
from bench.checkpoint import load_checkpoint, read_meta
from bench.models import build_model
from bench.train import TrainingDiverged, init_state, learning_rate, train
from f2d2.method import Loss

SMALL = ModelConfig(hidden=16, depth=2, x_frequencies=2, t_frequencies=2)


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=1000, warmup_steps=100, lr=1e-3, final_lr_ratio=0.1)
    assert learning_rate(cfg, 0) == pytest.approx(1e-5)
    assert learning_rate(cfg, 99) == pytest.approx(1e-3)
    assert learning_rate(cfg, 550) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert learning_rate(cfg, 1000) == pytest.approx(1e-4)


class Poisoned:
    """Wraps a method; returns a NaN loss on the listed call numbers."""

    def __init__(self, method, bad_calls):
        self.method, self.bad_calls, self.calls = method, set(bad_calls), 0

    def loss(self, model, x1, **kw) -> Loss:
        self.calls += 1
        loss = self.method.loss(model, x1, **kw)
        if self.calls in self.bad_calls:
            return Loss(loss.total * math.nan, loss.terms)
        return loss


def small_state(cfg: TrainConfig, name: str = "flow-matching"):
    method = get_method(name).build()
    torch.manual_seed(cfg.seed)
    model = build_model(SMALL, (2,), method.capabilities, kappa=10.0, sigma_0=2.31)
    return method, init_state(model, cfg)


def test_non_finite_steps_are_skipped_and_counted():
    cfg = TrainConfig(steps=20, batch_size=64, warmup_steps=1, log_every=5)
    method, state = small_state(cfg)
    before = [p.clone() for p in state.model.parameters()]
    poisoned = Poisoned(method, bad_calls={3, 4, 10})
    train(state, poisoned, Checkerboard().train_batch, cfg)
    assert state.num_skipped == 3 and state.step == 20
    assert state.history[-1]["num_skipped"] == 3
    assert all(torch.isfinite(p).all() for p in state.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, state.model.parameters()))


def test_a_run_of_non_finite_steps_stops_training_with_last_good_weights():
    cfg = TrainConfig(steps=50, batch_size=64, warmup_steps=1, max_nonfinite=4)
    method, state = small_state(cfg)
    poisoned = Poisoned(method, bad_calls=range(6, 100))
    with pytest.raises(TrainingDiverged, match="5 consecutive non-finite steps"):
        train(state, poisoned, Checkerboard().train_batch, cfg)
    assert all(torch.isfinite(p).all() for p in state.model.parameters())


def test_training_is_deterministic_on_cpu():
    cfg = TrainConfig(steps=15, batch_size=64, warmup_steps=2)
    results = []
    for _ in range(2):
        method, state = small_state(cfg, "meanflow-f2d2")
        train(state, method, Checkerboard().train_batch, cfg)
        results.append(torch.cat([p.flatten() for p in state.ema.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["flow-matching", "meanflow-f2d2"])
def test_resumed_training_equals_uninterrupted(name, tmp_path):
    spec = get_method(name)
    cfg = TrainConfig(steps=12, batch_size=64, warmup_steps=2, checkpoint_every=5, log_every=2)

    def job(root):
        return Job(name, spec.config, SMALL, cfg, "checkerboard", None, 10.0, 2.31, None, str(root))

    full = job(tmp_path / "full")
    run_job(full)
    # interrupted run: stop after the step-10 checkpoint, then resume from it
    cut = job(tmp_path / "cut")
    method = spec.build()
    torch.manual_seed(cfg.seed)
    model = build_model(SMALL, (2,), method.capabilities, kappa=10.0, sigma_0=2.31)
    state = init_state(model, cfg)
    from bench.jobs import _save

    train(state, method, Checkerboard().train_batch, cfg, until=10, on_checkpoint=lambda s: _save(cut, s, False))
    assert read_meta(cut.directory)["step"] == 10 and not read_meta(cut.directory)["complete"]
    run_job(cut)
    a, b = load_checkpoint(full.directory), load_checkpoint(cut.directory)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert read_meta(full.directory)["history"] == read_meta(cut.directory)["history"]


def test_the_checkpoint_records_the_thread_count_it_was_trained_with(tmp_path):
    """A UNet's weights depend on torch's thread count (its reductions): the checkpoint says which,
    segment by segment when a resume changes it, so a reader can reproduce it."""
    from bench.jobs import _save

    spec = get_method("flow-matching")
    cfg = TrainConfig(steps=8, batch_size=32, warmup_steps=1, checkpoint_every=4)
    job = Job("flow-matching", spec.config, SMALL, cfg, "checkerboard", None, 10.0, 2.31, None, str(tmp_path))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        method = spec.build()
        torch.manual_seed(cfg.seed)
        state = init_state(build_model(SMALL, (2,), method.capabilities, kappa=10.0, sigma_0=2.31), cfg)
        state.torch_threads.append({"from_step": 0, "threads": 1})
        train(state, method, Checkerboard().train_batch, cfg, until=4, on_checkpoint=lambda s: _save(job, s, False))
        assert read_meta(job.directory)["torch_threads"] == [{"from_step": 0, "threads": 1}]
        run_job(job, threads=2)  # resumed with another count: a second segment
    finally:
        torch.set_num_threads(before)
    meta = read_meta(job.directory)
    assert meta["complete"] and meta["torch_threads"] == [{"from_step": 0, "threads": 1}, {"from_step": 4, "threads": 2}]

    fresh = Job("flow-matching", spec.config, SMALL, cfg, "checkerboard", None, 10.0, 2.31, None, str(tmp_path / "fresh"))
    try:
        run_job(fresh, threads=1)  # a fresh run records its count from step 0
    finally:
        torch.set_num_threads(before)
    assert read_meta(fresh.directory)["torch_threads"] == [{"from_step": 0, "threads": 1}]


def test_a_checkpoint_from_before_the_thread_record_resumes_with_an_unknown_first_segment(tmp_path):
    from bench.checkpoint import META
    from bench.jobs import _save

    spec = get_method("flow-matching")
    cfg = TrainConfig(steps=8, batch_size=32, warmup_steps=1, checkpoint_every=4)
    job = Job("flow-matching", spec.config, SMALL, cfg, "checkerboard", None, 10.0, 2.31, None, str(tmp_path))
    method = spec.build()
    torch.manual_seed(cfg.seed)
    state = init_state(build_model(SMALL, (2,), method.capabilities, kappa=10.0, sigma_0=2.31), cfg)
    train(state, method, Checkerboard().train_batch, cfg, until=4, on_checkpoint=lambda s: _save(job, s, False))
    path = job.directory / META
    meta = json.loads(path.read_text())
    del meta["torch_threads"]  # as written before the field existed
    path.write_text(json.dumps(meta))
    before = torch.get_num_threads()
    try:
        run_job(job, threads=1)
    finally:
        torch.set_num_threads(before)
    assert read_meta(job.directory)["torch_threads"] == [{"from_step": 0, "threads": None}, {"from_step": 4, "threads": 1}]


def test_validation_keeps_the_best_weights_by_the_criterion(tmp_path):
    spec = get_method("meanflow-f2d2")
    cfg = TrainConfig(steps=12, batch_size=64, warmup_steps=2, validate_every=3, num_validation=64, select="val_nll_gap")
    job = Job("meanflow-f2d2", spec.config, SMALL, cfg, "checkerboard", None, 10.0, 2.31, None, str(tmp_path), (1, 2))
    run_job(job)
    meta = read_meta(job.directory)
    records = meta["validation"]
    assert [r["step"] for r in records] == [3, 6, 9, 12]
    for r in records:
        assert set(r) >= {"val_ref_nll", "val_nll_gap", "val_quality", "val_nll@1", "val_nll@2"}
        expected_gap = (abs(r["val_nll@1"] - r["val_ref_nll"]) + abs(r["val_nll@2"] - r["val_ref_nll"])) / 2
        assert r["val_nll_gap"] == pytest.approx(expected_gap, abs=1e-5)
    best = min(records, key=lambda r: r["val_nll_gap"])
    assert meta["best_step"] == best["step"] and meta["best_value"] == pytest.approx(best["val_nll_gap"])
    selected, last = load_checkpoint(job.directory), load_checkpoint(job.directory, best=False)
    same = all(torch.equal(a, b) for a, b in zip(selected.parameters(), last.parameters()))
    assert same == (best["step"] == 12)


def test_select_needs_validation():
    from bench.config import ConfigError

    with pytest.raises(ConfigError, match="validate_every"):
        TrainConfig(select="val_quality")
