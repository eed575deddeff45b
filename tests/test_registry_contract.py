"""One contract, generated from the method registry: every method obeys the same interface."""

from __future__ import annotations

import pytest
import torch

from baselines import METHODS, get_method
from bench.checkpoint import load_checkpoint
from bench.config import ModelConfig, TrainConfig
from bench.jobs import Job, _save
from bench.models import build_model
from bench.train import init_state
from f2d2 import few_step_log_prob, naive_log_prob, sample

SMALL = ModelConfig(hidden=16, depth=2, x_frequencies=2, t_frequencies=2)
BATCH = 32
# The authors' DDPM++ (f2d2/ddpmpp.py) at toy size: two levels, attention at 4 x 4 (and in the
# bottleneck, always), dropout on; 4 x 4 images keep exact divergences (48 VJPs) cheap.
TINY_DDPMPP = ModelConfig(arch="ddpmpp", channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)
ARCHS = {"mlp": (SMALL, (2,)), "ddpmpp": (TINY_DDPMPP, (3, 4, 4))}
BATCHES = {"mlp": BATCH, "ddpmpp": 8}


def make(name: str, arch: str = "mlp"):
    cfg, shape = ARCHS[arch]
    method = get_method(name).build()
    torch.manual_seed(0)
    model = build_model(cfg, shape, method.capabilities, kappa=10.0, sigma_0=2.0)
    teacher = None
    if method.needs_teacher:
        teacher = build_model(cfg, shape, get_method("flow-matching").build().capabilities, kappa=10.0, sigma_0=2.0)
    return method, model, teacher


def x1(arch: str = "mlp") -> torch.Tensor:
    shape = ARCHS[arch][1]
    return torch.randn(BATCHES[arch], *shape, generator=torch.Generator().manual_seed(0)) * 2


def per_arch(test):
    """Run ``test`` for every method on every network family."""
    return pytest.mark.parametrize("arch", list(ARCHS))(pytest.mark.parametrize("name", list(METHODS))(test))


@per_arch
def test_loss_shape_finite_and_gradients_reach_every_parameter(name, arch):
    method, model, teacher = make(name, arch)
    loss = method.loss(model, x1(arch), generator=torch.Generator().manual_seed(0), teacher=teacher)
    assert loss.total.shape == (BATCHES[arch],)
    assert torch.isfinite(loss.total).all()
    loss.total.mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"
    if teacher is not None:
        assert all(p.grad is None for p in teacher.parameters()), "the teacher must stay frozen"


@per_arch
def test_capabilities_match_the_network(name, arch):
    method, model, _ = make(name, arch)
    caps = method.capabilities
    assert model.capabilities == caps
    assert (model(x1(arch), 0.2, 0.7).div is not None) == caps.divergence_head
    if caps.divergence_head:
        assert model(x1(arch), 0.2, 0.7).div.shape == (BATCHES[arch],)
        few_step_log_prob(model, x1(arch), 2)
    else:
        with pytest.raises(ValueError, match="divergence head"):
            few_step_log_prob(model, x1(arch), 2)


@per_arch
def test_sampling_is_deterministic_given_noise_and_batch_independent(name, arch):
    _, model, _ = make(name, arch)
    model.eval()  # evaluation mode, as load_checkpoint returns it: dropout off
    batch = BATCHES[arch]
    noise = torch.randn(batch, *ARCHS[arch][1], generator=torch.Generator().manual_seed(5))
    for k in (1, 3):
        a = sample(model, noise, k)
        b = sample(model, noise, k)
        torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
        half = sample(model, noise[: batch // 2], k)
        torch.testing.assert_close(half.x, a.x[: batch // 2])
        assert a.nfe == k


@per_arch
def test_checkpoint_round_trip(name, arch, tmp_path):
    method, model, _ = make(name, arch)
    model.eval()
    job = Job(name, method.config, ARCHS[arch][0], TrainConfig(steps=1), "checkerboard", None, 10.0, 2.0, None, str(tmp_path))
    state = init_state(model, TrainConfig(steps=1))
    with torch.no_grad():
        for p in state.ema.parameters():
            p.add_(0.01)  # make EMA and raw weights differ
    _save(job, state, complete=True)
    for ema, source in ((False, state.model), (True, state.ema)):
        loaded = load_checkpoint(job.directory, ema=ema)
        assert loaded.capabilities == method.capabilities
        assert (loaded.kappa, loaded.sigma_0) == (10.0, 2.0)
        assert loaded.meta["method"] == name
        out_a, out_b = loaded(x1(arch), 0.3, 0.9), source(x1(arch), 0.3, 0.9)
        torch.testing.assert_close(out_a.u, out_b.u, rtol=0, atol=0)
        if out_b.div is not None:
            torch.testing.assert_close(out_a.div, out_b.div, rtol=0, atol=0)
    torch.testing.assert_close(naive_log_prob(load_checkpoint(job.directory), x1(arch), 2).log_p, naive_log_prob(state.ema, x1(arch), 2).log_p)


@per_arch
def test_methods_needing_a_teacher_refuse_to_run_without_one(name, arch):
    from dataclasses import replace

    spec = get_method(name)
    method = spec.build(replace(spec.config, velocity_target="teacher"))
    assert method.needs_teacher
    _, model, _ = make(name, arch)
    with pytest.raises(ValueError, match="teacher"):
        method.loss(model, x1(arch), generator=torch.Generator().manual_seed(0))
