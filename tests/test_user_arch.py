"""A user's own network through ``model.arch: "package.module:factory"``: the protocol checks name
what is wrong, and a user network trains with two methods and round-trips through its checkpoint."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from bench.checkpoint import CheckpointError, load_checkpoint
from bench.cli import app
from bench.config import ConfigError, ModelConfig
from bench.models import build_model
from f2d2.model import Capabilities, check_flow_map_net

ARCH = "tests.user_nets:"
NO_HEAD = Capabilities(flow_map=True, divergence_head=False)
HEAD = Capabilities(flow_map=True, divergence_head=True)
FIELD = Capabilities(flow_map=False, divergence_head=False)


def build(arch: str, caps: Capabilities = NO_HEAD, **options):
    return build_model(ModelConfig(arch=arch, arch_options=options), (2,), caps, kappa=10.0, sigma_0=1.0)


@pytest.mark.parametrize(
    "arch,caps,options,message",
    [
        (ARCH + "not_a_module", NO_HEAD, {}, "the factory returned dict, not a torch.nn.Module"),
        (ARCH + "no_attributes", NO_HEAD, {}, "needs attributes data_shape"),
        (ARCH + "wrong_data_shape", NO_HEAD, {}, "network data_shape (3,) does not match the data's (2,)"),
        (ARCH + "always_a_head", NO_HEAD, {}, "has_div_head is True but div_head=False was asked"),
        (ARCH + "never_a_head", HEAD, {}, "has_div_head is False but div_head=True was asked: the method needs one"),
        (ARCH + "returns_tuple", NO_HEAD, {}, "forward must return f2d2.model.FlowMapOutput(u, div), got tuple"),
        (ARCH + "div_column", HEAD, {}, "div must have shape (B,) = (3,), got (3, 1)"),
        (ARCH + "flat_u", NO_HEAD, {}, "u must have x's shape (3, 2)"),
        (ARCH + "mixes_batch", NO_HEAD, {}, "samples interact: sample 0 alone"),
        (ARCH + "mixes_batch", NO_HEAD, {"amount": 1e-3}, "samples interact"),
        (ARCH + "crashes", NO_HEAD, {}, "forward(x, t, s) with x (3, 2), t and s (3,) raised RuntimeError"),
        (ARCH + "with_batch_norm", NO_HEAD, {}, "BatchNorm1d normalises over the batch"),
        (ARCH + "ignores_step", NO_HEAD, {}, "is an instantaneous field v(x, t) that ignores s"),
        (ARCH + "factory", NO_HEAD, {"depth": 3}, "the factory raised TypeError"),
        (ARCH + "NOT_CALLABLE", NO_HEAD, {}, "module 'tests.user_nets' has no callable 'NOT_CALLABLE'"),
        (ARCH + "nope", NO_HEAD, {}, "has no callable 'nope'"),
        ("tests.no_such_module:factory", NO_HEAD, {}, "cannot import module 'tests.no_such_module'"),
        ("tests.user_nets:", NO_HEAD, {}, "a user network is named 'package.module:factory'"),
        ("tests.user_nets", NO_HEAD, {}, "unknown model.arch 'tests.user_nets'"),
        ("mlp", NO_HEAD, {"width": 3}, "model.arch 'mlp' takes none"),
    ],
)
def test_each_protocol_violation_is_named(arch, caps, options, message):
    with pytest.raises(ConfigError) as err:
        build(arch, caps, **options)
    assert message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "arch,caps,options",
    [
        (ARCH + "factory", NO_HEAD, {}),
        (ARCH + "factory", HEAD, {"width": 16}),
        (ARCH + "ignores_step", FIELD, {}),  # an instantaneous field serves flow matching
        (ARCH + "mixes_batch", NO_HEAD, {"amount": 1e-9}),  # below float32 noise: the tolerance's other side
    ],
)
def test_networks_that_follow_the_protocol_build(arch, caps, options):
    model = build(arch, caps, **options)
    out = model(torch.randn(5, 2), 0.2, 0.7)
    assert out.u.shape == (5, 2) and (out.div is not None) == caps.divergence_head
    if "width" in options:
        assert model.net.u.in_features == options["width"]


def test_the_probe_leaves_mode_and_random_state_alone():
    from tests.user_nets import factory

    net = factory((2,), True).train()
    state = torch.get_rng_state()
    check_flow_map_net(net, (2,), True)
    assert net.training and torch.equal(torch.get_rng_state(), state)
    net.eval()
    check_flow_map_net(net, (2,), True)
    assert not net.training


TINY = """
methods: [flow-matching, meanflow-f2d2]
model: {arch: "tests.user_nets:factory", arch_options: {width: 48}}
teacher_train: {steps: 60, batch_size: 256, warmup_steps: 10, checkpoint_every: 100}
train: {steps: 60, batch_size: 128, warmup_steps: 10, checkpoint_every: 100}
eval: {num_test: 100, num_samples: 100, batch_size: 100, num_repeats: 1}
figures: false
"""


@pytest.fixture(scope="module")
def user_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    (root / "sweep.yaml").write_text(TINY)
    out = root / "results"
    args = ["sweep", "--dataset", "checkerboard", "--nfe", "1", "--config", str(root / "sweep.yaml"),
            "--out", str(out), "--jobs", "1", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + str(result.exception)
    return out, pd.read_csv(out / "checkerboard" / "results.csv")


def test_a_user_network_trains_with_two_methods_and_round_trips(user_sweep):
    from bench.datasets import get_dataset
    from f2d2 import few_step_log_prob

    out, frame = user_sweep
    training = json.loads((out / "checkerboard" / "training.json").read_text())
    assert set(training) == {"flow-matching", "meanflow-f2d2"}
    test_set = get_dataset("checkerboard").test_set(100)
    for method, caps in (("flow-matching", FIELD), ("meanflow-f2d2", Capabilities(True, True, True))):
        model = load_checkpoint(training[method]["checkpoint"], method=method)
        assert type(model.net).__name__ == "TwoTimeMLP" and model.net.u.in_features == 48
        assert model.meta["model"]["arch"] == "tests.user_nets:factory" and model.capabilities == caps
        assert training[method]["steps"] == 60
    # the sweep's 1-step F2D2 NLL is the loaded checkpoint's: the same network and weights
    rows = frame[(frame.method == "meanflow-f2d2") & (frame.nfe == 1) & (frame.metric == "nll_nats")]
    with torch.no_grad():
        nll = -few_step_log_prob(model, test_set, 1).log_p.mean().item()
    assert rows.value.iloc[0] == pytest.approx(nll, rel=1e-5, abs=1e-5)
    ref = frame[(frame.method == "flow-matching") & (frame.nfe == 1) & (frame.metric == "nll_teacher_nats")]
    assert math.log(32) < ref.value.iloc[0] < 8.0  # a barely trained teacher (4.6): above the entropy


def test_a_checkpoint_whose_user_module_is_gone_names_the_file(user_sweep, tmp_path):
    import shutil

    out, _ = user_sweep
    source = json.loads((out / "checkerboard" / "training.json").read_text())["meanflow-f2d2"]["checkpoint"]
    copy = tmp_path / "ckpt"
    shutil.copytree(source, copy)
    meta = json.loads((copy / "checkpoint.json").read_text())
    meta["model"]["arch"] = "tests.gone_module:factory"
    (copy / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"checkpoint\.json: model.arch 'tests.gone_module:factory': cannot import"):
        load_checkpoint(copy)


def adm_config(**changes) -> ModelConfig:
    options = dict(arch="adm", channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                   num_head_channels=16)
    return ModelConfig(**{**options, **changes})


@pytest.mark.parametrize(
    "changes,caps,message",
    [
        ({}, NO_HEAD, "model.arch 'adm' is an instantaneous field v(x, t) that ignores s"),
        ({}, HEAD, "model.arch 'adm' has no divergence head"),
        ({"channels": 48}, FIELD, "channels a multiple of 32"),
        ({"num_head_channels": 24}, FIELD, "64 attention channels are not a multiple of num_head_channels 24"),
    ],
)
def test_adm_serves_flow_matching_only_and_checks_its_options(changes, caps, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_model(adm_config(**changes), (1, 8, 8), caps, kappa=1.0, sigma_0=1.0)


def test_adm_follows_the_protocol_and_its_divergence_is_the_jacobian_trace(float64):
    """Per-sample outputs (the probe), and vmap-of-vjp's exact divergence equals the trace of the
    dense Jacobian: what the exact-ODE reference of an imported teacher relies on."""
    from f2d2.divergence import Exact, divergence

    model = build_model(adm_config(), (1, 8, 8), FIELD, kappa=1.0, sigma_0=1.0)
    with torch.no_grad():
        for param in model.parameters():  # leave the zero initialisation: every path contributes
            param.add_(0.05 * torch.randn_like(param))
    check_flow_map_net(model.net, (1, 8, 8), False)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.8])
    div = divergence(lambda z: model.velocity(z, t), x, Exact()).value
    for b in range(2):
        jac = torch.autograd.functional.jacobian(lambda z: model.velocity(z[None], t[b : b + 1])[0], x[b])
        torch.testing.assert_close(div[b], jac.reshape(64, 64).trace(), rtol=1e-10, atol=1e-10)
    assert model(x, t, t + 0.5).u.equal(model.velocity(x, t))  # s is ignored


def test_the_user_network_evaluates_through_the_api_with_the_sweeps_numbers(user_sweep):
    """bench.evaluate on the user network's checkpoints gives the rows the sweep wrote: one
    evaluation path for the CLI and for Python."""
    import yaml

    import bench
    from bench.config import EvalConfig, from_dict

    out, frame = user_sweep
    training = json.loads((out / "checkerboard" / "training.json").read_text())
    resolved = yaml.safe_load((out / "checkerboard" / "config.yaml").read_text())
    cfg = from_dict(EvalConfig, resolved["eval"], "eval")
    teacher = load_checkpoint(training["flow-matching"]["checkpoint"])
    model = load_checkpoint(training["meanflow-f2d2"]["checkpoint"])
    direct = bench.evaluate(model, dataset="checkerboard", nfe=(1,), teacher=teacher, eval=cfg, metrics=["nll", "calibration"])
    swept = frame[frame.method == "meanflow-f2d2"].set_index("metric")
    for row in direct.itertuples():
        assert row.value == pytest.approx(swept.loc[row.metric, "value"], rel=1e-9, abs=1e-12), row.metric
