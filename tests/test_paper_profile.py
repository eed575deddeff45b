"""The 'paper' profile against the authors' launch scripts (Keely-Ai/F2D2 run_fm.sh, run_sc.sh,
run_ll.sh, train.py, training/experimental/{training_loop,loss}.py): the numbers below are read off
those files by hand, not imported from bench/paper.py."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from baselines import get_method
from bench.cli import app
from bench.config import ConfigError
from bench.models import AUTHORS_CIFAR10_MODEL
from bench.profiles import default_config


@pytest.fixture(scope="module")
def paper():
    return default_config("cifar10", "paper")


def test_three_stages_with_the_authors_batches_and_durations(paper):
    assert paper.methods == ("flow-matching", "shortcut-distill", "shortcut-distill-f2d2-fwd")
    stages = {"fm": paper.teacher_train, "sc": paper.train_for("shortcut-distill"),
              "ll": paper.train_for("shortcut-distill-f2d2-fwd")}
    # their --batch 512 / 512 / 256 images, --duration 300 / 300 / 30 Mimg; their loop stops at the
    # first step whose image count reaches the duration: ceil(duration / batch) steps
    assert [stages[s].steps for s in ("fm", "sc", "ll")] == [585_938, 585_938, 117_188]
    assert math.ceil(300e6 / 512) == 585_938 and math.ceil(30e6 / 256) == 117_188
    # Shortcut rows: one flow row and one bootstrap row per image of theirs
    assert [stages[s].batch_size for s in ("fm", "sc", "ll")] == [512, 1024, 512]
    for stage, images_per_step in (("fm", 512), ("sc", 512), ("ll", 256)):
        cfg = stages[stage]
        assert (cfg.optimizer, cfg.lr, tuple(cfg.betas), cfg.eps, cfg.weight_decay) == ("radam", 1e-4, (0.9, 0.999), 1e-8, 0.0)
        assert (cfg.lr_schedule, cfg.grad_clip, cfg.grad_nan_to_num, cfg.ema_rampup_ratio) == ("edm", 0.01, True, 0.05)
        # --lr_rampup 10 Mimg and --ema 50 Mimg span the same steps as theirs
        assert cfg.lr_rampup_images / cfg.batch_size == pytest.approx(10e6 / images_per_step)
        assert cfg.ema_halflife_images / cfg.batch_size == pytest.approx(50e6 / images_per_step)
        assert cfg.precision == "fp32" and cfg.tf32 is False and cfg.select == "last"  # --fp16 False, --tf32 False
    # loss normalisation: theirs averages the velocity MSE over 3072 pixels and sums the row kinds
    assert stages["fm"].loss_scale == pytest.approx(1 / 3072)
    assert stages["sc"].loss_scale == stages["ll"].loss_scale == pytest.approx(2 / 3072)
    assert stages["ll"].init_from == "shortcut-distill" and stages["ll"].init_weights == "ema"
    assert paper.train_for("shortcut-distill-f2d2").init_from == "shortcut-distill"  # our bidirectional variant too
    assert stages["sc"].init_from is None and stages["fm"].init_from is None


def test_network_kappa_and_method_options_are_the_authors(paper):
    assert paper.model == AUTHORS_CIFAR10_MODEL and paper.kappa == 2e4 and paper.nfe == (1, 2, 4, 8)
    teacher = paper.options_for("flow-matching")
    assert teacher == {"time_sampler": "logit_normal", "logit_mean": 1.2, "logit_std": 1.2}  # sigma = exp(N(-1.2, 1.2))
    f2d2 = paper.options_for("shortcut-distill-f2d2-fwd")
    assert f2d2["bootstrap_fraction"] == 0.5 and f2d2["num_levels"] == 7 and f2d2["euler_smallest"] is False
    assert f2d2["divergence"] == {"estimator": "hutchinson:1", "weight_diag": 3072.0, "weight_offdiag": 3072.0}
    assert not get_method("shortcut-distill-f2d2-fwd").config.bidirectional  # their bootstrap rows run forward only


def test_the_paper_profile_covers_cifar10_only():
    for dataset in ("mnist", "checkerboard", "digits"):
        with pytest.raises(ConfigError, match="covers cifar10 only"):
            default_config(dataset, "paper")
    result = CliRunner().invoke(app, ["plan", "--dataset", "mnist", "--profile", "paper", "--quiet"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: the 'paper' profile is the authors' CIFAR-10 recipe and covers cifar10 only, not 'mnist'; use --profile default"
    ]


def test_plan_accepts_the_paper_profile(tmp_path):
    """The full-size networks on the meta device: about 10 s."""
    result = CliRunner().invoke(app, ["plan", "--dataset", "cifar10", "--profile", "paper", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    rows = [line.split(" | ") for line in result.output.splitlines() if line.startswith("| flow-matching") or line.startswith("| shortcut")]
    assert [(r[0].strip("| "), r[3], r[4]) for r in rows] == [
        ("flow-matching", "585,938", "512"), ("shortcut-distill", "585,938", "1024"), ("shortcut-distill-f2d2-fwd", "117,188", "512")
    ]
    assert [r[2] for r in rows] == ["55.7 M", "60.4 M", "94 M"]  # tests/test_ddpmpp.py's hand counts
    assert list(tmp_path.iterdir()) == []
