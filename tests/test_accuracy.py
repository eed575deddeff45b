"""The reference-accuracy study (bench/accuracy.py): errors against the tightest exact solve."""

from __future__ import annotations

import torch

from bench.accuracy import accuracy_markdown, reference_accuracy
from bench.config import EvalConfig
from f2d2.analytic import gaussian_flow_map

MEAN = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def test_errors_shrink_with_the_tolerance_and_the_truth_is_the_analytic_density():
    model = gaussian_flow_map(MEAN, 0.4, 1.5, 3.0)
    x = MEAN + 0.4 * torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cfg = EvalConfig(num_test=64, batch_size=64)
    rows = reference_accuracy(model, x, cfg, [1e-3, 1e-6, 1e-10], ["exact"], 1.0, torch.device("cpu"))
    by_rtol = {r.rtol: r for r in rows}
    assert by_rtol[1e-10].max_abs_err_nats == 0.0  # the truth row
    assert by_rtol[1e-3].mean_abs_err_nats > by_rtol[1e-6].mean_abs_err_nats > 0
    assert by_rtol[1e-3].nfe < by_rtol[1e-6].nfe < by_rtol[1e-10].nfe
    # the tightest solve is the closed form: the study's yardstick is itself right
    from bench.measure import reference

    tight = reference(model, x, EvalConfig(num_test=64, batch_size=64, rtol=1e-10, atol=1e-10), torch.device("cpu"))
    truth = -model.net.log_prob(x, torch.ones(64, dtype=torch.float64))
    assert (tight.nll - truth).abs().max() < 1e-8
    text = accuracy_markdown(rows, "nats", "toy")
    assert text.count("\n| exact |") == 3 and "(bpd)" not in text


def test_the_truth_is_solved_in_float64_on_a_copy():
    # a float32 state cannot meet rtol ~1e-9: the truth must not be a float32 solve
    from bench.accuracy import float64_copy

    model = gaussian_flow_map(MEAN.float(), 0.4, 1.5, 3.0).float()
    copy64 = float64_copy(model)
    assert all(b.dtype == torch.float64 for b in copy64.buffers())
    assert all(b.dtype == torch.float32 for b in model.buffers())
    x = (MEAN + 0.4 * torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))).float()
    cfg = EvalConfig(num_test=16, batch_size=16)
    rows = {r.rtol: r for r in reference_accuracy(model, x, cfg, [1e-4, 1e-10], ["exact"], 1.0, torch.device("cpu"))}
    # against a float64 truth the float32 solve's error is its own (~1e-4 rtol), not zero by rounding luck
    assert 0 < rows[1e-4].mean_abs_err_nats < 1e-2
