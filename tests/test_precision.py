"""Mixed precision and speed levers on CPU: bf16 and fp16 (with a gradient scaler) training steps of
each method family, float32 targets under autocast, TF32 switching, torch.compile."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from baselines import get_method
from bench.config import ConfigError, ModelConfig, TrainConfig
from bench.datasets import Checkerboard
from bench.models import build_model
from bench.precision import check_precision, tf32_mode
from bench.train import init_state, train, train_step
from f2d2.divergence_loss import diagonal_divergence_target
from f2d2.method import Loss

SMALL = ModelConfig(hidden=16, depth=2, x_frequencies=2, t_frequencies=2)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# |loss(autocast) / loss(fp32) - 1| on one batch of 256 checkerboard points, MLP with O(1) outputs.
# Measured worst over seeds 0-9 (CPU, torch 2.14): bf16 2.2e-4 (flow-matching), 1.9e-4 (shortcut-f2d2),
# 6.1e-3 (shortcut-distill-f2d2: its teacher's velocity target is bf16), 3.3e-4 (meanflow-f2d2),
# 4.3e-4 (lsd-f2d2); fp16 3.1e-5, 3.4e-5, 6.1e-4, 7.5e-5, 3.3e-5. Tolerances: about 5x those.
TOLERANCE = {
    "flow-matching": {"bf16": 1e-3, "fp16": 2e-4},
    "shortcut-f2d2": {"bf16": 1e-3, "fp16": 2e-4},
    "shortcut-distill-f2d2": {"bf16": 3e-2, "fp16": 3e-3},
    "meanflow-f2d2": {"bf16": 2e-3, "fp16": 4e-4},
    "lsd-f2d2": {"bf16": 2e-3, "fp16": 2e-4},
}


def nontrivial(method_name: str, seed: int = 0, caps=None):
    """A small MLP whose outputs are O(1) (a fresh one's are small, which would hide rounding)."""
    torch.manual_seed(seed)
    caps = caps or get_method(method_name).build().capabilities
    model = build_model(SMALL, (2,), caps, kappa=10.0, sigma_0=2.31)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, p[0].numel() ** -0.5 if p.ndim > 1 else 0.1)
    return model


def setup(name: str):
    method = get_method(name).build()
    model = nontrivial(name)
    teacher = None
    if method.needs_teacher:
        teacher = nontrivial("flow-matching", 1).eval().requires_grad_(False)
    return method, model, teacher


def loss_of(method, model, teacher, precision: str | None) -> float:
    x1 = Checkerboard().train_batch(256, torch.Generator().manual_seed(100))
    gen = torch.Generator().manual_seed(0)
    if precision is None:
        return method.loss(model, x1, generator=gen, teacher=teacher, ema=model).total.mean().item()
    with torch.autocast("cpu", dtype=DTYPES[precision]):
        return method.loss(model, x1, generator=gen, teacher=teacher, ema=model).total.float().mean().item()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", list(TOLERANCE))
def test_a_reduced_precision_step_runs_and_its_loss_is_close_to_fp32(name, precision):
    method, model, teacher = setup(name)
    reference, reduced = loss_of(method, model, teacher, None), loss_of(method, model, teacher, precision)
    assert reduced != reference  # autocast changed something ...
    assert abs(reduced / reference - 1) <= TOLERANCE[name][precision]  # ... within the measured rounding
    cfg = TrainConfig(steps=20, batch_size=64, warmup_steps=1, precision=precision)
    state = init_state(model, cfg)
    before = [p.detach().clone() for p in state.model.parameters()]
    seen: Counter = Counter()
    state.model.net.register_forward_hook(lambda mod, args, out: seen.update([out.u.dtype]))
    log = None
    while log is None and state.step < cfg.steps:  # fp16: the first steps may overflow while the scale settles
        log = train_step(state, method, Checkerboard().train_batch, cfg, teacher)
    assert log is not None and all(torch.isfinite(torch.tensor(v)) for v in log.values())
    assert seen[DTYPES[precision]] >= 1  # the training step's predictions ran under autocast
    assert all(p.dtype == torch.float32 for p in state.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, state.model.parameters()))
    if precision == "fp16":  # each skipped step halved the scale from its initial 2^16
        assert state.scaler.get_scale() == 2.0 ** (16 - state.num_skipped)
    else:
        assert state.scaler is None and state.num_skipped == 0


# Output dtypes of the network calls of one bf16 loss: predictions (with gradients) in bf16, every
# target and every JVP in float32. Calls per loss: see the comments.
CALLS = {
    "flow-matching": {torch.bfloat16: 1},  # the prediction
    "shortcut-f2d2": {torch.bfloat16: 2, torch.float32: 3},  # 2 predictions; divergence target, 2 half jumps
    "shortcut-distill-f2d2": {torch.bfloat16: 2, torch.float32: 2},  # 2 predictions; 2 half jumps
    "meanflow-f2d2": {torch.bfloat16: 1, torch.float32: 2},  # the prediction; the JVP, the divergence target
    "lsd-f2d2": {torch.bfloat16: 1, torch.float32: 3},  # diagonal prediction; divergence target, JVP, endpoint
}


@pytest.mark.parametrize("name", list(CALLS))
def test_under_bf16_targets_and_jvps_run_in_float32(name):
    method, model, teacher = setup(name)
    seen: Counter = Counter()
    model.net.register_forward_hook(lambda mod, args, out: seen.update([out.u.dtype]))
    teacher_seen: Counter = Counter()
    if teacher is not None:
        teacher.net.register_forward_hook(lambda mod, args, out: teacher_seen.update([out.u.dtype]))
    loss_of(method, model, teacher, "bf16")
    assert dict(seen) == CALLS[name]
    if teacher is not None:  # its velocity target in bf16, its divergence (the F2D2 target) in float32
        assert dict(teacher_seen) == {torch.bfloat16: 1, torch.float32: 1}


def test_the_divergence_target_is_the_same_under_autocast():
    model = nontrivial("flow-matching")
    x, t = torch.randn(64, 2, generator=torch.Generator().manual_seed(3)), torch.rand(64, generator=torch.Generator().manual_seed(4))
    reference = diagonal_divergence_target(model, x, t, 10.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        target = diagonal_divergence_target(model, x, t, 10.0)
    assert target.dtype == torch.float32
    torch.testing.assert_close(target, reference, rtol=0, atol=0)


class Overflow:
    """Wraps a method: at the given step numbers its loss is multiplied by 1e30, finite in float32
    but overflowing the float16 backward pass once the gradient scaler multiplies it further."""

    def __init__(self, method, state_of, steps) -> None:
        self.method, self.state_of, self.steps = method, state_of, set(steps)

    def loss(self, model, x1, **kw) -> Loss:
        loss = self.method.loss(model, x1, **kw)
        return Loss(loss.total * 1e30, loss.terms) if self.state_of().step in self.steps else loss


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    cfg = TrainConfig(steps=3, batch_size=64, warmup_steps=1, precision="fp16")
    method = get_method("flow-matching").build()
    state = init_state(nontrivial("flow-matching"), cfg)
    wrapped = Overflow(method, lambda: state, steps={1})
    assert train_step(state, wrapped, Checkerboard().train_batch, cfg, None) is not None
    assert state.scaler.get_scale() == 65536.0 and state.num_skipped == 0
    before = [p.detach().clone() for p in state.model.parameters()]
    assert train_step(state, wrapped, Checkerboard().train_batch, cfg, None) is None  # step 1 overflows
    assert state.scaler.get_scale() == 32768.0 and state.num_skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, state.model.parameters()))
    assert train_step(state, wrapped, Checkerboard().train_batch, cfg, None) is not None


def test_fp16_resumes_with_its_gradient_scale(tmp_path):
    from bench.jobs import Job, _restore, _save

    cfg = TrainConfig(steps=8, batch_size=64, warmup_steps=1, precision="fp16", checkpoint_every=4)
    method = get_method("flow-matching").build()
    job = Job("flow-matching", get_method("flow-matching").config, SMALL, cfg, "checkerboard", None, 10.0, 2.31, None, str(tmp_path))

    def fresh():
        torch.manual_seed(cfg.seed)
        return init_state(build_model(SMALL, (2,), method.capabilities, kappa=10.0, sigma_0=2.31), cfg)

    full = fresh()
    train(full, Overflow(method, lambda: full, {2}), Checkerboard().train_batch, cfg)
    cut = fresh()
    train(cut, Overflow(method, lambda: cut, {2}), Checkerboard().train_batch, cfg, until=4, on_checkpoint=lambda s: _save(job, s, False))
    resumed = fresh()
    _restore(job, resumed)
    # the planted overflow at step 2 (and any while the scale settles) lowered the scale below 2^16
    assert resumed.step == 4 and resumed.scaler.get_scale() == cut.scaler.get_scale() < 2.0**16
    train(resumed, Overflow(method, lambda: resumed, {2}), Checkerboard().train_batch, cfg)
    assert resumed.scaler.get_scale() == full.scaler.get_scale() and resumed.num_skipped == full.num_skipped
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("setting", [True, False, None])
def test_tf32_is_switched_for_training_and_restored(setting):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with tf32_mode(setting):
        inside = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    assert inside == (before if setting is None else (setting, setting))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_precision_needs_autocast_on_the_device():
    check_precision(TrainConfig(precision="bf16"), torch.device("cpu"))
    check_precision(TrainConfig(precision="fp32"), torch.device("meta"))
    with pytest.raises(ConfigError, match="no autocast on device 'meta'"):
        check_precision(TrainConfig(precision="fp16"), torch.device("meta"))


def test_compile_trains_the_mlp_on_cpu_like_eager():
    """torch.compile (inductor, C++ on CPU) of the network: the same steps as eager up to rounding.
    Flow matching and MeanFlow-F2D2 (whose loss differentiates the compiled network by torch.func.jvp)."""
    for name in ("flow-matching", "meanflow-f2d2"):
        method = get_method(name).build()
        weights = []
        for compiled in (False, True):
            cfg = TrainConfig(steps=3, batch_size=64, warmup_steps=1, compile=compiled)
            torch.manual_seed(0)
            state = init_state(build_model(SMALL, (2,), method.capabilities, kappa=10.0, sigma_0=2.31), cfg)
            train(state, method, Checkerboard().train_batch, cfg)
            weights.append(torch.cat([p.detach().flatten() for p in state.model.parameters()]))
            assert compiled == (state.model.net._compiled_call_impl is not None)
            assert list(state.model.state_dict()) == list(state.ema.state_dict())  # checkpoint names unchanged
        # measured max |difference| after 3 steps: 1.5e-8 (flow matching: fused kernels round differently),
        # 0 (MeanFlow-F2D2, whose network calls all run inside torch.func.jvp / vjp)
        torch.testing.assert_close(weights[1], weights[0], rtol=0, atol=1e-5)
