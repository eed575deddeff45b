"""The authors' training recipe: RAdam, EDM's learning-rate ramp and EMA half-life, gradient
hygiene, loss scaling, and the 'paper' profile built from their launch scripts."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from baselines import get_method
from baselines.shortcut import ShortcutConfig
from bench.config import ConfigError, ModelConfig, TrainConfig
from bench.datasets import Checkerboard
from bench.models import build_model
from bench.schedules import ema_decay, learning_rate
from bench.train import init_state, train, train_step

SMALL = ModelConfig(hidden=16, depth=2, x_frequencies=2, t_frequencies=2)
EDM = dict(optimizer="radam", lr_schedule="edm", lr=1e-3, grad_clip=0.01, grad_nan_to_num=True)


def test_edm_learning_rate_ramps_in_images_from_zero_then_stays():
    cfg = TrainConfig(lr=1e-4, batch_size=512, lr_schedule="edm", lr_rampup_images=10_000_000)
    # 10^7 / 512 = 19531.25: step 19531 has seen 9,999,872 images, step 19532 10,000,384
    assert learning_rate(cfg, 0) == 0.0
    assert learning_rate(cfg, 1) == pytest.approx(1e-4 * 512 / 1e7)
    assert learning_rate(cfg, 19531) == pytest.approx(1e-4 * 9_999_872 / 1e7) and learning_rate(cfg, 19531) < 1e-4
    assert learning_rate(cfg, 19532) == 1e-4 and learning_rate(cfg, 500_000) == 1e-4
    assert learning_rate(TrainConfig(lr=3e-4, lr_schedule="edm"), 0) == 3e-4  # no ramp: constant


def test_default_schedules_are_the_old_formulas():
    cfg = TrainConfig(steps=1000, warmup_steps=100, lr=1e-3, final_lr_ratio=0.1)
    for k in (1, 2, 9, 10, 50, 5000):
        assert ema_decay(cfg, k) == min(0.999, (1 + k) / (10 + k))
    assert learning_rate(cfg, 0) == pytest.approx(1e-5) and learning_rate(cfg, 1000) == pytest.approx(1e-4)


def test_ema_half_life_in_images_and_its_ramp_up():
    cfg = TrainConfig(batch_size=100, ema_halflife_images=1e6)
    # a half-life of 10^6 images is 10^4 updates of 100 images: the old average keeps weight 1/2
    assert ema_decay(cfg, 7) ** 10_000 == pytest.approx(0.5, rel=1e-9)
    ramp = TrainConfig(batch_size=100, ema_halflife_images=1e6, ema_rampup_ratio=0.05)
    assert ema_decay(ramp, 1) == 0.0  # no image seen before the first update: a copy (EDM)
    # before the cap: h = 0.05 (k - 1) 100 images, decay 0.5 ** (1 / (0.05 (k - 1))), batch-free
    assert ema_decay(ramp, 11) == pytest.approx(0.5 ** (1 / 0.5))
    other_batch = TrainConfig(batch_size=400, ema_halflife_images=1e6, ema_rampup_ratio=0.05)
    assert ema_decay(other_batch, 11) == pytest.approx(ema_decay(ramp, 11))
    # the cap 0.05 (k - 1) 100 >= 10^6 takes over from k - 1 = 200,000 on
    assert ema_decay(ramp, 200_000) < ema_decay(cfg, 1) == ema_decay(ramp, 200_001) == ema_decay(ramp, 10**7)


@pytest.mark.parametrize("bad, message", [
    (dict(optimizer="sgd"), "train.optimizer must be one of adam, radam"),
    (dict(lr_rampup_images=1000), "applies to train.lr_schedule 'edm' only"),
    (dict(ema_rampup_ratio=0.05), "needs train.ema_halflife_images > 0"),
    (dict(betas=(0.9,)), "train.betas must be two numbers"),
    (dict(loss_scale=0.0), "train.loss_scale > 0"),
    (dict(precision="fp8"), "train.precision must be one of fp32, bf16, fp16"),
    (dict(init_from=" "), "train.init_from must name a method"),
    (dict(init_weights="best"), "train.init_weights must be one of ema, model"),
])
def test_recipe_fields_are_validated(bad, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**bad)


def _state(cfg: TrainConfig, name: str = "flow-matching"):
    method = get_method(name).build()
    torch.manual_seed(cfg.seed)
    model = build_model(SMALL, (2,), method.capabilities, kappa=10.0, sigma_0=2.31)
    return method, init_state(model, cfg)


def test_training_loop_equals_the_authors_loop_written_out():
    """Our loop with the paper's fields against EDM's/the authors' loop (training_loop.py) written
    out by hand on the same losses: lr from the images seen before the step, nan_to_num, clip,
    RAdam, then EMA with the half-life capped by the ramp-up, then count the images."""
    cfg = TrainConfig(steps=12, batch_size=64, lr_rampup_images=320, ema_halflife_images=5000.0,
                      ema_rampup_ratio=0.05, betas=(0.9, 0.99), eps=1e-7, **EDM)
    method, state = _state(cfg)
    net, ema = copy.deepcopy(state.model), copy.deepcopy(state.model)
    opt = torch.optim.RAdam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.99), eps=1e-7)
    gen, nimg = torch.Generator().manual_seed(cfg.seed), 0
    for _ in range(cfg.steps):
        loss = method.loss(net, Checkerboard().train_batch(64, gen), generator=gen, ema=ema).total.mean()
        opt.zero_grad()
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(nimg / 320, 1)
        for p in net.parameters():
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.01)
        opt.step()
        beta = 0.5 ** (64 / max(min(5000.0, nimg * 0.05), 1e-8))
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.copy_(pn.detach().lerp(pe, beta))
        nimg += 64
    train(state, method, Checkerboard().train_batch, cfg)
    for ours, theirs in ((state.model, net), (state.ema, ema)):
        for a, b in zip(ours.parameters(), theirs.parameters()):
            # the same operations; only lerp's direction differs (e + (1-b)(p - e) vs p + b(e - p))
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert isinstance(state.optimizer, torch.optim.RAdam)


class NaNGradient:
    """A parameter hook that turns the gradient of one entry into NaN (and another into inf) while on."""

    def __init__(self, param: torch.nn.Parameter) -> None:
        self.on = False
        param.register_hook(self)

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        if not self.on:
            return grad
        grad = grad.clone()
        grad.view(-1)[0], grad.view(-1)[1] = math.nan, math.inf
        return grad


@pytest.mark.parametrize("sanitize", [False, True])
def test_non_finite_gradients_are_sanitized_or_skip_the_step(sanitize):
    cfg = TrainConfig(steps=3, batch_size=32, warmup_steps=1, grad_nan_to_num=sanitize)
    method, state = _state(cfg)
    param = next(state.model.parameters())
    poison = NaNGradient(param)
    train_step(state, method, Checkerboard().train_batch, cfg, None)
    before = param.detach().clone()
    poison.on = True
    log = train_step(state, method, Checkerboard().train_batch, cfg, None)
    assert torch.isfinite(param).all()
    if sanitize:  # the step is taken with the entries replaced: NaN -> 0, inf -> 1e5 (then clipped)
        assert log is not None and state.num_sanitized == 1 and state.num_skipped == 0
        assert not torch.equal(before, param.detach())
    else:
        assert log is None and state.num_skipped == 1 and state.num_sanitized == 0
        assert torch.equal(before, param.detach())


def test_loss_scale_scales_the_gradient_not_the_logged_loss():
    logs = []
    for scale in (1.0, 0.25):
        cfg = TrainConfig(steps=1, batch_size=32, warmup_steps=1, grad_clip=1e9, loss_scale=scale)
        method, state = _state(cfg)
        logs.append(train_step(state, method, Checkerboard().train_batch, cfg, None))
    assert logs[1]["loss"] == pytest.approx(logs[0]["loss"], rel=1e-7)
    assert logs[1]["grad_norm"] == pytest.approx(0.25 * logs[0]["grad_norm"], rel=1e-6)


def test_the_ema_network_is_in_eval_mode_and_the_trained_one_in_train_mode():
    cfg = TrainConfig(steps=2, batch_size=16, warmup_steps=1)
    method = get_method("shortcut").build()
    model = build_model(ModelConfig(arch="ddpmpp", channels=8, channel_mult=(1,), num_res_blocks=1, dropout=0.5),
                        (1, 4, 4), method.capabilities, kappa=10.0, sigma_0=1.0)
    state = init_state(model, cfg)
    seen = []
    state.model.net.register_forward_pre_hook(lambda mod, args: seen.append(("model", mod.training)))
    state.ema.net.register_forward_pre_hook(lambda mod, args: seen.append(("ema", mod.training)))
    ema_method = get_method("shortcut").build(ShortcutConfig(target_model="ema"))
    train(state, ema_method, lambda n, g: torch.rand(n, 1, 4, 4, generator=g) * 2 - 1, cfg)
    assert ("ema", False) in seen and ("model", True) in seen
    assert all(mode is False for who, mode in seen if who == "ema")
    assert all(mode is True for who, mode in seen if who == "model")


def test_flow_matching_times_uniform_by_default_and_the_authors_logit_normal():
    from baselines.flow_matching import FlowMatchingConfig

    like = torch.zeros(1)
    uniform = get_method("flow-matching").build().sample_times(5, torch.Generator().manual_seed(3), like)
    torch.testing.assert_close(uniform, torch.rand(5, generator=torch.Generator().manual_seed(3)), rtol=0, atol=0)
    fm = get_method("flow-matching").build(FlowMatchingConfig(time_sampler="logit_normal", logit_mean=1.2, logit_std=1.2))
    t = fm.sample_times(200_000, torch.Generator().manual_seed(4), like)
    # the authors' t = 1 / (1 + sigma), sigma = exp(N(-1.2, 1.2^2)): P(t > 1/2) = P(log sigma < 0) = Phi(1) = 0.8413
    # and P(t > 1 / (1 + e^-1.2)) = 1/2; binomial standard error sqrt(p (1 - p) / n) < 1.2e-3, bound 5 of them
    assert abs((t > 0.5).double().mean().item() - 0.841345) < 6e-3
    assert abs((t > 1 / (1 + math.exp(-1.2))).double().mean().item() - 0.5) < 6e-3
    with pytest.raises(ValueError, match="time_sampler"):
        FlowMatchingConfig(time_sampler="beta")
