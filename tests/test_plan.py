"""The cost plan (bench/plan.py, `f2d2-bench plan`, `sweep --dry-run`): FLOP counts against hand
counts, steps and disk against what a sweep then trains, no data files needed, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import bench.plan as plan
from baselines import get_method
from bench.cli import app
from bench.config import ModelConfig
from bench.plan import flop_batch, make_plan, net_cost, train_flops_per_step

MLP = ModelConfig(arch="mlp", hidden=16, depth=3, x_frequencies=2, t_frequencies=3)


def mlp_sums(cfg: ModelConfig, dims: int) -> tuple[int, int]:
    """(S, W): S = sum over linear layers of in x out (multiply-adds per sample of one forward),
    W = in x out of the first layer. Input width: x and its Fourier features, dims (1 + 2 xf), plus
    t and s - t with 2 tf + 1 features each (f2d2/nets.py)."""
    width_in = dims * (1 + 2 * cfg.x_frequencies) + 2 * (2 * cfg.t_frequencies + 1)
    first = width_in * cfg.hidden
    return first + (cfg.depth - 1) * cfg.hidden**2 + cfg.hidden * dims, first


def test_training_flops_of_the_2d_mlp_match_the_hand_count():
    """Flow matching: one forward (2 S per sample: a multiply and an add per weight), the weight
    gradients (2 S) and the input gradients of every layer but the first, whose input (data and
    time features) needs none (2 (S - W)): 2 B (3 S - W) per step."""
    batch = 96
    s, w = mlp_sums(MLP, 2)
    expected = 2 * batch * (3 * s - w)
    counted = train_flops_per_step("flow-matching", get_method("flow-matching").config, MLP, (2,), batch)
    assert counted == expected == 2 * 96 * (3 * (24 * 16 + 2 * 256 + 32) - 24 * 16)  # width_in 2 * 5 + 2 * 7


def test_network_costs_of_the_2d_mlp_match_the_hand_count():
    """A forward is 2 S per sample; a VJP w.r.t. x needs every layer's input gradient, 2 S too."""
    s, _ = mlp_sums(MLP, 2)
    cost = net_cost(MLP, (2,), get_method("flow-matching").build().capabilities)
    assert (cost.forward, cost.vjp) == (2 * s, 2 * s)
    assert cost.params == s + MLP.depth * 16 + 2  # weights plus one bias per unit (3 hidden layers, 2 outputs)


def test_the_meta_device_counts_what_the_cpu_computes(monkeypatch):
    """The plan counts on the meta device (shapes only); the CPU fallback must give the same."""
    cfg = get_method("meanflow-f2d2").config
    on_meta = train_flops_per_step("meanflow-f2d2", cfg, MLP, (2,), 8)
    monkeypatch.setattr(plan, "measured", lambda fn: fn("cpu"))
    assert train_flops_per_step("meanflow-f2d2", cfg, MLP, (2,), 8) == on_meta > 0


def test_small_batches_split_rows_exactly_like_the_configured_batch(monkeypatch):
    shortcut = get_method("shortcut").config  # bootstrap_fraction 1/4
    assert flop_batch(shortcut, 256) == 4  # 64 of 256 rows, 1 of 4
    assert flop_batch(shortcut, 6) == 3  # round(1.5) = 2 of 6 rows: a third, as round(0.75) = 1 of 3
    assert flop_batch(get_method("flow-matching").config, 256) == 2  # no row shares
    assert flop_batch(shortcut, 1) == 1
    scaled = train_flops_per_step("shortcut", shortcut, MLP, (2,), 24)
    monkeypatch.setattr(plan, "flop_batch", lambda cfg, batch: batch)  # count the whole batch instead
    assert train_flops_per_step("shortcut", shortcut, MLP, (2,), 24) == scaled


def test_inception_flops_per_image_match_torchvisions_inception_v3():
    import torchvision

    with torch.device("meta"):
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
    net.fc = torch.nn.Identity()  # clean-fid's features are the 2048-d pool output
    with torch.no_grad():
        flops = plan.count_flops(lambda: net(torch.empty(1, 3, 299, 299, device="meta")))
    assert flops == plan.INCEPTION_FLOPS_PER_IMAGE


def test_cli_defaults_are_the_documented_constants():
    import inspect

    from bench.cli import plan as command

    defaults = {name: p.default for name, p in inspect.signature(command).parameters.items()}
    assert (defaults["tflops"], defaults["mfu"], defaults["dopri5_nfe"]) == (plan.DEFAULT_TFLOPS, plan.DEFAULT_MFU, plan.DOPRI5_NFE)


# The plan against a sweep ----------------------------------------------------------------------

TINY = """\
methods: [flow-matching, shortcut-f2d2]
model: {hidden: 64, depth: 2, x_frequencies: 2, t_frequencies: 2}
teacher_train: {steps: 12, batch_size: 64, checkpoint_every: 100}
train: {steps: 8, batch_size: 32, checkpoint_every: 100}
eval: {num_test: 16, num_samples: 16, batch_size: 16, num_repeats: 1}
"""


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_plan_steps_and_disk_match_what_a_ci_sweep_then_trains(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    out = tmp_path / "out"
    args = ["--profile", "ci", "--config", str(tmp_path / "tiny.yaml"), "--out", str(out)]
    planned = run("plan", *args, "--quiet")
    dry = run("sweep", *args, "--dry-run", "--quiet")
    assert planned.exit_code == 0 and dry.exit_code == 0, planned.output + dry.output
    assert dry.output == planned.output and not out.exists()  # the same plan; nothing written
    from bench.cli import _resolve_config

    cfg = _resolve_config(None, "ci", tmp_path / "tiny.yaml", None, None)
    before = {m.method: m for m in make_plan(cfg, out / "checkpoints", None).models}
    assert {m.status for m in before.values()} == {"missing"}
    assert (before["flow-matching"].steps, before["flow-matching"].images) == (12, 12 * 64)
    assert (before["shortcut-f2d2"].steps, before["shortcut-f2d2"].images) == (8, 8 * 32)

    result = run("sweep", *args, "--jobs", "1", "--quiet")
    assert result.exit_code == 0, result.output
    trained = json.loads((out / "checkerboard" / "training.json").read_text())
    for name, model in before.items():
        assert trained[name]["steps"] == model.steps
        directory = Path(trained[name]["checkpoint"])
        weights = [p for p in directory.iterdir() if p.suffix == ".safetensors"]
        size = sum(p.stat().st_size for p in weights)
        # the plan counts tensor bytes; the file adds its JSON header and the generator state (5 kB):
        # 7.6 and 8.3 kB measured here, against 22.5 kB for one copy of the weights
        assert 0 <= size - model.checkpoint_bytes < 10_000, (name, size, model.checkpoint_bytes)
    after = make_plan(cfg, out / "checkpoints", None)
    assert {m.status for m in after.models} == {"complete"} and after.train_flops == 0 and after.new_disk_bytes == 0


def test_plan_for_cifar10_needs_no_data_files(tmp_path):
    (tmp_path / "small.yaml").write_text(
        "methods: [flow-matching, meanflow-f2d2]\n"
        "model: {arch: ddpmpp, channels: 8, channel_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [16]}\n"
    )
    empty = tmp_path / "no-data"
    empty.mkdir()
    args = ["--dataset", "cifar10", "--config", str(tmp_path / "small.yaml"), "--data-dir", str(empty), "--out", str(tmp_path / "out")]
    result = run("plan", *args, "--quiet")
    assert result.exit_code == 0, result.output
    assert "Inception features: 8 cells x 1 seed range(s) x 50000 samples + 50000 training images" in result.output
    assert "| meanflow-f2d2 | missing (train) |" in result.output and "400,000" in result.output
    assert not (tmp_path / "out").exists()
    failed = run("sweep", *args, "--quiet")  # the sweep itself does need them
    assert failed.exit_code == 2 and "CIFAR-10 not found" in failed.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mfu", "0"], "0 < --mfu <= 1"),
        (["--mfu", "1.5"], "0 < --mfu <= 1"),
        (["--tflops", "-1"], "--tflops > 0"),
        (["--dopri5-nfe", "0"], "--dopri5-nfe >= 1"),
        (["--nfe", "0"], "nfe values must be integers >= 1"),
        (["--dataset", "cifar11"], "unknown dataset 'cifar11'"),
        (["--checkpoint", "meanflow=/nowhere"], "/nowhere"),
    ],
)
def test_bad_plan_inputs_give_one_error_line(extra, message, tmp_path):
    result = run("plan", "--profile", "ci", "--out", str(tmp_path / "out"), "--quiet", *extra)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not result.stdout and not (tmp_path / "out").exists()


def test_the_boundary_values_are_accepted(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    result = run("plan", "--profile", "ci", "--config", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path),
                 "--mfu", "1", "--dopri5-nfe", "1", "--quiet")
    assert result.exit_code == 0 and "x MFU 1 (--mfu" in result.output and "x 1 NFE (dopri5, 1 assumed)" in result.output


def test_plan_output_file_holds_what_it_prints_and_bad_paths_are_one_error_line(tmp_path):
    target = tmp_path / "plans" / "cifar10.md"
    result = CliRunner().invoke(app, ["plan", "--dataset", "cifar10", "--quiet", "--output", str(target)])
    assert result.exit_code == 0, result.output
    assert target.read_text() == result.stdout
    bad = CliRunner().invoke(app, ["plan", "--dataset", "cifar10", "--quiet", "--output", str(tmp_path)])
    assert bad.exit_code == 2 and "is a directory" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_the_plan_prices_only_the_selected_metric_groups():
    runner = CliRunner()
    full = runner.invoke(app, ["plan", "--dataset", "cifar10", "--methods", "flow-matching", "--quiet"])
    nll = runner.invoke(app, ["plan", "--dataset", "cifar10", "--methods", "flow-matching", "--metrics", "nll", "--quiet"])
    mass = runner.invoke(app, ["plan", "--dataset", "cifar10", "--methods", "flow-matching", "--metrics", "nll,mass", "--quiet"])
    assert full.exit_code == nll.exit_code == mass.exit_code == 0, full.output + nll.output + mass.output
    assert "Inception features" in full.stdout and "samples:" in full.stdout and "mass:" not in full.stdout  # profile default
    assert "Inception features" not in nll.stdout and "samples:" not in nll.stdout and "KID" not in nll.stdout
    assert "x 1 run(s)" in nll.stdout and "x 4 run(s)" in full.stdout  # repeats only time things
    assert "mass: 1 methods x 1000 exact-ODE proposal samples" in mass.stdout and "3072 VJP(s), exact" in mass.stdout


def test_the_plan_says_when_training_precision_changes_the_device_peak():
    runner = CliRunner()
    paper = runner.invoke(app, ["plan", "--dataset", "cifar10", "--profile", "paper", "--quiet"])
    default = runner.invoke(app, ["plan", "--dataset", "cifar10", "--quiet"])
    assert paper.exit_code == default.exit_code == 0
    assert "TF32 off: an A100's peak for that is 19.5 TFLOP/s" in paper.stdout and "--tflops 19.5" in paper.stdout
    assert "Device assumption" not in default.stdout  # fp32 with PyTorch's default TF32 convolutions: the assumed peak
    matched = runner.invoke(app, ["plan", "--dataset", "cifar10", "--profile", "paper", "--quiet", "--tflops", "19.5"])
    assert "Device assumption" not in matched.stdout
