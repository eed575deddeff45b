"""Timing tier (pytest-benchmark): the kernels every sweep spends its time in.

Run with ``make bench`` (saves a run under results/benchmarks/) and compare against the committed
baseline with ``make bench-compare``. Excluded from the default suite by the 'benchmark' marker;
these tests time, they assert only that the timed code produced finite numbers.
"""

from __future__ import annotations

import pytest
import torch

from baselines import METHODS, get_method
from bench.config import ModelConfig, TrainConfig
from bench.datasets import Checkerboard
from bench.models import build_model
from bench.train import init_state, train_step
from f2d2 import Exact, divergence, few_step_log_prob, reference_log_prob

# At least 20 rounds after a warm-up: with the default calibration the slower kernels got 5
# rounds, and their first calls (allocator, autograd graph caches) dominated the median.
pytestmark = pytest.mark.benchmark(min_rounds=20, warmup=True, warmup_iterations=3)

MODEL = ModelConfig(arch="mlp", hidden=128, depth=4, x_frequencies=4, x_scale=8.0, t_frequencies=4)
NUM_POINTS = 2000


@pytest.fixture(scope="module")
def f2d2_model():
    torch.manual_seed(0)
    method = get_method("meanflow-f2d2").build()
    return build_model(MODEL, (2,), method.capabilities, kappa=10.0, sigma_0=2.31).eval()


@pytest.fixture(scope="module")
def points():
    return Checkerboard().test_set(NUM_POINTS)


def test_exact_divergence_mlp_2d(benchmark, f2d2_model, points):
    t = torch.full((NUM_POINTS,), 0.5)
    result = benchmark(lambda: divergence(lambda x: f2d2_model.velocity(x, t), points, Exact()).value)
    assert torch.isfinite(result).all()


@pytest.mark.parametrize("num_steps", [1, 8])
def test_few_step_joint_likelihood(benchmark, f2d2_model, points, num_steps):
    result = benchmark(lambda: few_step_log_prob(f2d2_model, points, num_steps).log_p)
    assert torch.isfinite(result).all()


def test_reference_dopri5_exact(benchmark, f2d2_model, points):
    def solve():
        return reference_log_prob(f2d2_model.velocity, points[:500], prior_log_prob=f2d2_model.prior_log_prob)

    result = benchmark.pedantic(solve, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["nfe"] = result.nfe
    assert torch.isfinite(result.log_p).all()


@pytest.mark.parametrize("name", list(METHODS))
def test_training_step(benchmark, name):
    method = get_method(name).build()
    torch.manual_seed(0)
    model = build_model(MODEL, (2,), method.capabilities, kappa=10.0, sigma_0=2.31)
    teacher = None
    if method.needs_teacher:
        teacher = build_model(MODEL, (2,), get_method("flow-matching").build().capabilities, kappa=10.0, sigma_0=2.31)
    cfg = TrainConfig(steps=10**6, batch_size=512)
    state = init_state(model, cfg)
    log = benchmark(lambda: train_step(state, method, Checkerboard().train_batch, cfg, teacher))
    assert log is not None and torch.isfinite(torch.tensor(log["loss"]))
