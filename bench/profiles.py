"""Default sweep settings per dataset, the tiny 'ci' profile used by regression tracking, and the
'paper' profile: the authors' CIFAR-10 recipe (bench/paper.py).

The defaults were chosen by measurement on a 2-core CPU (see README.md, "Choosing the budgets"):
the teacher gets large batches (its reference NLL is every row's yardstick), flow-map methods get
many small steps, which converged faster per second than fewer large ones.
"""

from __future__ import annotations

from dataclasses import replace

from baselines import METHODS
from bench.config import ConfigError, EvalConfig, ModelConfig, SweepConfig, TrainConfig

PROFILES = ("default", "ci", "paper", "smoke")
PAPER_DATASETS = ("cifar10",)  # the datasets the paper profile covers (the authors' public code: CIFAR-10)

# MeanFlow's published recipe (logit-normal times, adaptive weight) targets images; on 2D data it
# left the diagonal field far from converged in our budget (reference NLL 4.26 vs 3.62 nats with
# uniform times and no adaptive weight, 12k steps), so 2D sweeps record this override.
_MEANFLOW_2D = {"time_sampler": "uniform", "adaptive_power": 0.0}

TOY_2D = SweepConfig(
    model=ModelConfig(arch="mlp", hidden=128, depth=4, x_frequencies=4, x_scale=8.0, t_frequencies=4),
    teacher_train=TrainConfig(steps=6000, batch_size=4096, lr=2e-3),
    train=TrainConfig(steps=12000, batch_size=512, lr=2e-3),
    eval=EvalConfig(num_test=2000, num_samples=2000, batch_size=2000),
    method_options={"meanflow": _MEANFLOW_2D, "meanflow-f2d2": _MEANFLOW_2D},
)

# Images on a 2-core CPU: a small UNet (channels 16) and few thousand steps; Hutchinson divergence for
# the F2D2 training targets (the exact 64-dim trace made an F2D2 step ~40x slower) and for the
# reference (2 fixed probes per point, standard error reported, calibration floors beside it). The
# exact trace is 64 VJPs per field call: `f2d2-bench reference-accuracy` (results/reference_accuracy)
# measured 76-132 s for 16 digits at rtol 1e-6 / 1e-5 against 7-11 s with two probes (next to a
# training job), i.e. ~20-40 min per model for the 297 test digits and 3-6 h for the nine methods on
# this CPU, while rtol 1e-5 with the exact trace leaves at most 1.8e-4 bits/dim per image. So
# `eval.reference_estimator: exact` at the default rtol buys an unfloored calibration on a machine
# that can afford it; the committed digits job does (results/digits.yaml); the profile stays
# quick. The mass group's proposal must be exact (a Hutchinson log q biases the weights,
# bench/mass.py), so it uses few samples here: 32 exact forward solves per model (about a minute
# per model on this CPU), with their effective sample size.
_F2D2_VARIANTS = ("shortcut-f2d2", "shortcut-distill-f2d2", "meanflow-f2d2", "lsd-f2d2")
_HUTCHINSON_TRAINING = {"divergence": {"estimator": "hutchinson:1"}}

DIGITS = SweepConfig(
    model=ModelConfig(arch="unet", channels=16, channel_mult=(1, 2), num_res_blocks=1, div_pool="mlp"),
    teacher_train=TrainConfig(steps=3000, batch_size=128, lr=2e-3),
    train=TrainConfig(steps=3000, batch_size=128, lr=2e-3),
    eval=EvalConfig(
        num_test=297, num_samples=1000, batch_size=500, num_repeats=3, num_mass=32,
        reference_estimator="hutchinson:2", naive_estimator="hutchinson:1",
    ),
    method_options={
        **{name: _HUTCHINSON_TRAINING for name in _F2D2_VARIANTS},
        "meanflow": _MEANFLOW_2D,
        "meanflow-f2d2": {**_MEANFLOW_2D, **_HUTCHINSON_TRAINING},
    },
)

# GPU scale (not run here): the authors' CIFAR-10 setting is a 35M-parameter UNet trained for
# hundreds of thousands of steps; these defaults are a starting point to be set by --config.
# The mass group is off by default at MNIST / CIFAR-10 size: its unbiased proposal needs the exact
# trace, D = 784 / 3072 VJPs per solver step (`f2d2-bench plan --metrics ...,mass` prices it); opt in
# with --metrics nll,calibration,quality,timing,mass (and, e.g., eval.num_mass: 100).
_IMAGES_GPU_GROUPS = ("nll", "calibration", "quality", "timing")
_IMAGES_GPU_EVAL = EvalConfig(
    num_test=10_000, num_samples=50_000, batch_size=500, num_repeats=3,
    reference_estimator="hutchinson:4", naive_estimator="hutchinson:1", metrics=_IMAGES_GPU_GROUPS,
)
MNIST = replace(
    DIGITS,
    # MeanFlow's published image recipe (logit-normal times, adaptive weight), Hutchinson targets
    method_options={name: _HUTCHINSON_TRAINING for name in _F2D2_VARIANTS},
    model=ModelConfig(arch="unet", channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, div_pool="mlp"),
    teacher_train=TrainConfig(steps=100_000, batch_size=128, lr=2e-4, warmup_steps=2000),
    train=TrainConfig(steps=100_000, batch_size=128, lr=2e-4, warmup_steps=2000),
    eval=_IMAGES_GPU_EVAL,
)
FID_NUM_SAMPLES = 50_000  # the FID protocol people report: 50k samples per cell (clean-fid, EDM)
CIFAR10 = replace(
    MNIST,
    model=ModelConfig(arch="unet", channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, div_pool="mlp"),
    teacher_train=TrainConfig(steps=400_000, batch_size=128, lr=2e-4, warmup_steps=5000),
    train=TrainConfig(steps=400_000, batch_size=128, lr=2e-4, warmup_steps=5000),
    eval=replace(_IMAGES_GPU_EVAL, num_samples=FID_NUM_SAMPLES),
)

# Regression tracking in CI: every method, tiny budgets, fixed seeds (a few minutes on 2 cores).
CI_2D = replace(
    TOY_2D,
    methods=tuple(METHODS),
    teacher_train=TrainConfig(steps=600, batch_size=1024, lr=2e-3, checkpoint_every=200),
    train=TrainConfig(steps=300, batch_size=256, lr=2e-3, checkpoint_every=100),
    eval=EvalConfig(num_test=400, num_samples=400, batch_size=400, num_repeats=2),
    figures=False,
)

# Smoke runs of the image datasets on a CPU: the whole pipeline (data files, training, exact-ODE
# references, few-step NLL, samples) with a tiny UNet in minutes; the numbers say nothing about any
# method. The default profiles' 35M-parameter UNet costs ~5 TFLOP per training step at batch 128
# (`f2d2-bench plan`), tens of seconds on a CPU core, and its Hutchinson references more.
SMOKE_IMAGES = replace(
    DIGITS,
    model=ModelConfig(arch="unet", channels=8, channel_mult=(1, 2), num_res_blocks=1, div_pool="gap"),
    teacher_train=TrainConfig(steps=20, batch_size=16, lr=2e-3, warmup_steps=2, checkpoint_every=10),
    train=TrainConfig(steps=20, batch_size=16, lr=2e-3, warmup_steps=2, checkpoint_every=10),
    eval=EvalConfig(
        num_test=16, num_samples=64, batch_size=16, num_repeats=1, num_mass=16,
        reference_estimator="hutchinson:2", naive_estimator="hutchinson:1", rtol=1e-3, atol=1e-3,
        metrics=_IMAGES_GPU_GROUPS,
    ),
    method_options={name: _HUTCHINSON_TRAINING for name in _F2D2_VARIANTS},
    figures=False,
)

_DEFAULTS = {
    ("digits", "smoke"): SMOKE_IMAGES,
    ("mnist", "smoke"): SMOKE_IMAGES,
    ("cifar10", "smoke"): SMOKE_IMAGES,
    ("checkerboard", "default"): TOY_2D,
    ("8gaussians", "default"): TOY_2D,
    ("checkerboard", "ci"): CI_2D,
    ("8gaussians", "ci"): CI_2D,
    ("digits", "default"): DIGITS,
    ("mnist", "default"): MNIST,
    ("cifar10", "default"): CIFAR10,
}


def default_config(dataset: str, profile: str = "default") -> SweepConfig:
    """The sweep defaults for ``dataset`` under ``profile``."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
    if profile == "paper":
        if dataset not in PAPER_DATASETS:
            raise ConfigError(
                f"the 'paper' profile is the authors' CIFAR-10 recipe and covers {', '.join(PAPER_DATASETS)} only, "
                f"not {dataset!r}; use --profile default"
            )
        from bench.paper import paper_config

        return paper_config(CIFAR10.eval)
    try:
        return replace(_DEFAULTS[(dataset, profile)], dataset=dataset)
    except KeyError:
        raise ConfigError(f"no {profile!r} profile for dataset {dataset!r}") from None
