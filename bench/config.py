"""Configuration: the frozen dataclasses of a sweep (model, training, evaluation) and their checks;
parsing from YAML/dicts and stable hashing live in bench/config_parse.py (re-exported here).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Any

from bench.config_parse import (  # noqa: F401 - re-exported: callers import these from bench.config
    ConfigError,
    apply_sweep_yaml,
    from_dict,
    key_dict,
    merge,
    read_sweep_yaml,
    stable_hash,
    to_dict,
)
from f2d2.divergence import parse_estimator


@dataclass(frozen=True)
class ModelConfig:
    """Network architecture: 'mlp' for 2D data; 'unet' or 'ddpmpp' (the authors' DDPM++, see
    f2d2/ddpmpp.py) for images (see bench/images.py); 'adm' for OpenAI's ADM UNet as TorchCFM ships
    it (an instantaneous field for flow matching, e.g. an imported TorchCFM teacher; f2d2/adm.py);
    or a user network "package.module:factory" (see bench/models.py and the protocol in f2d2/model.py).

    Attributes:
        hidden, depth: MLP width and number of hidden layers.
        x_frequencies, x_scale: Fourier features sin/cos(2^k pi x / x_scale) of the input, k < x_frequencies.
        t_frequencies: Fourier features sin/cos(2^k pi t) of t and of s - t, k < t_frequencies.
        channels, channel_mult, num_res_blocks, div_pool: UNet, DDPM++ and ADM widths and depth
            (div_pool: the divergence head's pooling, UNet and DDPM++).
        attn_resolutions, dropout: DDPM++ and ADM: image sizes whose blocks use self-attention
            (e.g. (16,) for 32 x 32 images), and the dropout probability inside each residual block.
        num_heads, num_head_channels: ADM's attention heads (TorchCFM's CIFAR-10 values: heads of
            64 channels).
        arch_options: extra keyword arguments of a user factory (JSON-like values).
    """

    arch: str = "mlp"
    hidden: int = 128
    depth: int = 4
    x_frequencies: int = 4
    x_scale: float = 8.0
    t_frequencies: int = 4
    channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    div_pool: str = "mlp"
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    num_heads: int = 4
    num_head_channels: int = 64
    arch_options: dict[str, Any] = field(default_factory=dict)

    # Added after checkpoints existed: left out of cache keys while at their default.
    KEY_OMITS_DEFAULT: typing.ClassVar[tuple[str, ...]] = (
        "attn_resolutions", "dropout", "num_heads", "num_head_channels", "arch_options",
    )

    def __post_init__(self) -> None:
        for name in ("hidden", "depth", "channels", "num_res_blocks", "num_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ConfigError(f"model.channel_mult must be a non-empty list of integers >= 1, got {list(self.channel_mult)}")
        if self.x_frequencies < 0 or self.t_frequencies < 0 or self.x_scale <= 0:
            raise ConfigError("model.x_frequencies and model.t_frequencies must be >= 0 and model.x_scale > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must lie in [0, 1), got {self.dropout}")
        if self.num_head_channels < 1 and self.num_head_channels != -1:
            raise ConfigError(f"model.num_head_channels must be >= 1 (or -1: num_heads heads), got {self.num_head_channels}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: optimizer, learning-rate schedule, EMA, gradient hygiene, precision, warm start.

    Defaults are the harness's own recipe: Adam, linear warm-up over ``warmup_steps`` then cosine
    decay to ``lr * final_lr_ratio``, EMA with decay ``ema_decay`` (ramped up over the first steps),
    gradient clipping at ``grad_clip``, non-finite steps skipped. The paper profile sets the
    authors' recipe through the fields below (bench/profiles.py); every one of them leaves today's
    behaviour unchanged at its default and is left out of cache keys there.

    Validation ("when to stop"): every ``validate_every`` steps (0: never) the EMA model is scored on
    a fixed validation batch of ``num_validation`` points; ``select`` keeps the weights that minimise
    one criterion: 'val_nll_gap' (|few-step NLL - exact NLL| averaged over the sweep's NFEs),
    'val_quality' (1-step sample distance), 'val_ref_nll' (exact NLL) or 'last' (no selection).

    Attributes (the authors' recipe; "images" are rows drawn, ``batch_size`` per step):
        optimizer: 'adam' or 'radam' (torch.optim.RAdam, Liu et al., arXiv:1908.03265), with
            ``betas``, ``eps`` and (coupled, L2) ``weight_decay``.
        lr_schedule: 'cosine' (warm-up + cosine, above) or 'edm': EDM's ramp
            lr * min(step * batch_size / lr_rampup_images, 1), constant afterwards (the first step
            has lr 0, as in EDM; lr_rampup_images 0: constant lr) (Karras et al., arXiv:2206.00364).
        ema_halflife_images: if > 0, EMA decay 0.5 ** (batch_size / h) with h this half-life in
            images, capped at ``ema_rampup_ratio`` * images seen so far when that ratio is > 0
            (EDM's ema_halflife_kimg and ema_rampup_ratio); 0: ``ema_decay``.
        loss_scale: multiplies the mean loss before backward (the gradient; logged losses are
            unscaled). Matches another code's loss normalisation, e.g. a per-element mean.
        grad_nan_to_num: replace non-finite gradient entries (NaN -> 0, +-inf -> +-1e5) before
            clipping instead of skipping the step (the authors' hygiene); a non-finite loss still
            skips the step, and under fp16 the gradient scaler's rule applies instead (a step with
            non-finite gradients is skipped and the scale lowered).
        precision: 'fp32', 'bf16' or 'fp16' autocast of the training step's network calls (fp16
            with a gradient scaler). Divergence targets, JVPs, likelihoods and every evaluation
            stay in float32 (bench/precision.py).
        tf32: TF32 matmuls and cuDNN convolutions on CUDA (True/False); None leaves PyTorch's
            defaults. CUDA only; no effect on CPU.
        compile: torch.compile the network being trained (not the EMA or the teacher).
        init_from: warm start from a method of the same sweep (its trained checkpoint, which the
            sweep trains first) or from a checkpoint path; parameters the source has are copied,
            new ones (a divergence head, a step path) keep their fresh initialisation.
        init_weights: which weights of the source: 'ema' (default) or 'model' (the raw weights).
    """

    steps: int = 4000
    batch_size: int = 2048
    lr: float = 2e-3
    warmup_steps: int = 100
    final_lr_ratio: float = 0.05
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    max_nonfinite: int = 20
    log_every: int = 100
    checkpoint_every: int = 1000
    validate_every: int = 0
    num_validation: int = 512
    select: str = "last"
    optimizer: str = "adam"
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    lr_rampup_images: int = 0
    ema_halflife_images: float = 0.0
    ema_rampup_ratio: float = 0.0
    loss_scale: float = 1.0
    grad_nan_to_num: bool = False
    precision: str = "fp32"
    tf32: bool | None = None
    compile: bool = False
    init_from: str | None = None
    init_weights: str = "ema"

    # Fields that do not change the trained weights, hence not part of a checkpoint's cache key.
    # compile changes the rounding of the same computation, as the world size does.
    BOOKKEEPING: typing.ClassVar[tuple[str, ...]] = ("log_every", "checkpoint_every", "compile")
    CRITERIA: typing.ClassVar[tuple[str, ...]] = ("last", "val_nll_gap", "val_quality", "val_ref_nll")
    OPTIMIZERS: typing.ClassVar[tuple[str, ...]] = ("adam", "radam")
    LR_SCHEDULES: typing.ClassVar[tuple[str, ...]] = ("cosine", "edm")
    PRECISIONS: typing.ClassVar[tuple[str, ...]] = ("fp32", "bf16", "fp16")
    KEY_OMITS_DEFAULT: typing.ClassVar[tuple[str, ...]] = (
        "optimizer", "betas", "eps", "weight_decay", "lr_schedule", "lr_rampup_images", "ema_halflife_images",
        "ema_rampup_ratio", "loss_scale", "grad_nan_to_num", "precision", "tf32", "compile", "init_from",
        "init_weights",
    )

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "warmup_steps", "log_every", "checkpoint_every", "num_validation"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.validate_every < 0:
            raise ConfigError(f"train.validate_every must be >= 0 (0: off), got {self.validate_every}")
        if self.select not in self.CRITERIA:
            raise ConfigError(f"train.select must be one of {', '.join(self.CRITERIA)}, got {self.select!r}")
        if self.select != "last" and self.validate_every == 0:
            raise ConfigError(f"train.select {self.select!r} needs train.validate_every > 0")
        if self.lr <= 0 or not 0 <= self.ema_decay < 1:
            raise ConfigError(f"need train.lr > 0 and 0 <= train.ema_decay < 1, got {self.lr}, {self.ema_decay}")
        if self.steps > MAX_TRAIN_STEPS or self.batch_size > MAX_POINTS:
            raise ConfigError(f"train.steps must be at most {MAX_TRAIN_STEPS:,} and train.batch_size at most {MAX_POINTS:,}")
        if self.grad_clip <= 0:  # 0 would clip every gradient to nothing: training that silently never moves
            raise ConfigError(f"train.grad_clip must be > 0, got {self.grad_clip}")
        self._check_recipe()

    def _check_recipe(self) -> None:
        choices = {"optimizer": self.OPTIMIZERS, "lr_schedule": self.LR_SCHEDULES, "precision": self.PRECISIONS,
                   "init_weights": ("ema", "model")}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ConfigError(f"train.{name} must be one of {', '.join(valid)}, got {getattr(self, name)!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.eps <= 0 or self.weight_decay < 0 or self.loss_scale <= 0:
            raise ConfigError(
                f"need train.eps > 0, train.weight_decay >= 0 and train.loss_scale > 0, "
                f"got {self.eps}, {self.weight_decay}, {self.loss_scale}"
            )
        if self.lr_rampup_images < 0 or self.ema_halflife_images < 0 or self.ema_rampup_ratio < 0:
            raise ConfigError("train.lr_rampup_images, train.ema_halflife_images and train.ema_rampup_ratio must be >= 0")
        if self.lr_rampup_images and self.lr_schedule != "edm":
            raise ConfigError("train.lr_rampup_images applies to train.lr_schedule 'edm' only (cosine uses warmup_steps)")
        if self.ema_rampup_ratio and not self.ema_halflife_images:
            raise ConfigError("train.ema_rampup_ratio needs train.ema_halflife_images > 0 (it caps that half-life)")
        if self.init_from is not None and not self.init_from.strip():
            raise ConfigError("train.init_from must name a method or a checkpoint path (or be left out)")


MAX_NFE = 4096  # network evaluations per few-step estimate: 4x the paper's 1024-step reference
MAX_POINTS = 10_000_000  # test points / samples / repeats: a sanity bound, far above CIFAR-10's 50,000
MAX_GUIDANCE_STEPS = 1000
MAX_EULER_STEPS = 100_000  # a fixed-step reference: ~100x the paper's 1024
MAX_TRAIN_STEPS = 100_000_000  # optimizer steps of one model: far beyond the authors' longest run
MAX_FID_SEEDS = 100  # disjoint seed ranges of the sample-quality metrics (EDM reports the minimum of 3)

# Metric groups a sweep can compute (eval.metrics / --metrics). What each group writes:
#   nll          few-step NLL (F2D2 or naive), own and teacher exact-ODE references, paired gaps and
#                their decomposition into map and head parts, true entropy, reference NFEs
#   calibration  per-point agreement of few-step and exact NLLs, with the reference's noise floor
#   quality      sample quality: energy distance and support share (2D), FD / FID / KID (images)
#   timing       wall-clock of sampling, few-step likelihood and reference, and the speed-up
#   mass         total mass of each few-step density (2D grid quadrature; images: importance sampling)
#   guidance     self-guided sampling (needs eval.guidance_etas; `f2d2-bench guide` sets them)
METRIC_GROUPS = ("nll", "calibration", "quality", "timing", "mass", "guidance")


def metric_group(metric: str, method: str = "") -> str:
    """The metric group that writes rows named ``metric`` (of ``method``), see METRIC_GROUPS."""
    if "+guided@" in method or metric.startswith("network_calls_"):
        return "guidance"
    if metric.endswith("_wall_s") or metric == "nll_speedup":
        return "timing"
    if metric.startswith("calib_"):
        return "calibration"
    if metric == "mass":
        return "mass"
    if metric.startswith(("nll_", "entropy_", "ref_")):
        return "nll"
    return "quality"


def measured_groups(cfg: "EvalConfig") -> frozenset[str]:
    """The metric groups a sweep with this evaluation config computes: ``cfg.metrics``, or every
    group when it is empty ('guidance' only when ``cfg.guidance_etas`` are set). Every registered
    dataset supports the other groups (2D data: energy distance and grid mass; images: FD/FID and
    importance-sampled mass)."""
    if cfg.metrics:
        return frozenset(cfg.metrics)
    return frozenset(g for g in METRIC_GROUPS if g != "guidance" or cfg.guidance_etas)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation protocol (METHOD.md Sec. 4).

    Attributes:
        num_test: held-out points for likelihoods. num_samples: samples for sample quality.
        reference_solver: 'dopri5' (adaptive) or 'euler:N' (the paper's protocol).
        reference_estimator, naive_estimator: 'exact' or 'hutchinson:P'.
        backward: 'auto' (trained backward maps if the method has them), 'first_order' or 'trained'.
        num_repeats: wall-clock repeats (median reported). batch_size: evaluation chunk size.
        use_ema: evaluate the EMA weights.
        use_best: evaluate the weights selected by train.select (if training kept any), else the last.
        guidance_etas: self-guidance step sizes; for each, models with a divergence head also sample
            from guided noise (rows of method NAME+guided@ETA). guidance_prior: keep -log p_0 in the
            objective. guidance_steps: Adam steps on the noise (the paper: 1).
        teacher_steps: if > 0, also the teacher's sample quality with this many Euler steps (the
            many-step yardstick of the guidance comparison).
        metrics: the metric groups to compute (see :data:`METRIC_GROUPS`); empty: every group the
            dataset supports ('guidance' only when guidance_etas are set).
        num_mass: samples of the importance-sampled total mass of a few-step density (images).
        mass_estimator: divergence estimator of the mass's proposal density (the exact ODE from
            prior noise): 'exact' (default) or 'hutchinson:P', whose Monte-Carlo noise in log q
            biases the importance weights upwards (Jensen), so it is reported as biased.
        fid_seeds: image sample quality (FID, KID, FD) on this many disjoint seed ranges of
            num_samples samples each (repeat r uses per-sample seeds r num_samples ... (r + 1)
            num_samples - 1); with more than one, rows M_mean, M_std and M_min join the first
            range's M (see bench/fid.py). 1: one range, no extra rows.
    """

    KEY_OMITS_DEFAULT: typing.ClassVar[tuple[str, ...]] = ("metrics", "num_mass", "fid_seeds", "mass_estimator")

    num_test: int = 2000
    num_samples: int = 2000
    reference_solver: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    reference_estimator: str = "exact"
    naive_estimator: str = "exact"
    backward: str = "auto"
    num_repeats: int = 5
    batch_size: int = 2000
    seed: int = 0
    use_ema: bool = True
    use_best: bool = True
    guidance_etas: tuple[float, ...] = ()
    guidance_prior: bool = True
    guidance_steps: int = 1
    teacher_steps: int = 0
    metrics: tuple[str, ...] = ()
    num_mass: int = 1000
    fid_seeds: int = 1
    mass_estimator: str = "exact"

    def __post_init__(self) -> None:
        if not all(math.isfinite(eta) and eta > 0 for eta in self.guidance_etas):
            raise ConfigError(f"eval.guidance_etas (--eta) must be finite numbers > 0, got {list(self.guidance_etas)}")
        if not 1 <= self.guidance_steps <= MAX_GUIDANCE_STEPS or not 0 <= self.teacher_steps <= MAX_NFE:
            raise ConfigError(
                f"need 1 <= eval.guidance_steps <= {MAX_GUIDANCE_STEPS} and 0 <= eval.teacher_steps <= {MAX_NFE}, "
                f"got {self.guidance_steps}, {self.teacher_steps}"
            )
        unknown = [m for m in self.metrics if m not in METRIC_GROUPS]
        if unknown or len(set(self.metrics)) != len(self.metrics):
            what = f"unknown metric group(s) {', '.join(map(repr, unknown))}" if unknown else f"duplicated metric groups {list(self.metrics)}"
            raise ConfigError(f"eval.metrics: {what}; valid: {', '.join(METRIC_GROUPS)}")
        if "guidance" in self.metrics and not self.guidance_etas:
            raise ConfigError("eval.metrics: 'guidance' needs eval.guidance_etas (f2d2-bench guide sets them)")
        if not 1 <= self.fid_seeds <= MAX_FID_SEEDS:
            raise ConfigError(f"eval.fid_seeds must lie in [1, {MAX_FID_SEEDS}], got {self.fid_seeds}")
        for name in ("num_test", "num_samples", "num_repeats", "batch_size", "num_mass"):
            if not 1 <= getattr(self, name) <= MAX_POINTS:
                raise ConfigError(f"eval.{name} must lie in [1, {MAX_POINTS:,}], got {getattr(self, name)}")
        if self.backward not in ("auto", "first_order", "trained"):
            raise ConfigError(f"eval.backward must be auto, first_order or trained, got {self.backward!r}")
        if self.num_mass < 2:
            raise ConfigError(f"eval.num_mass must be >= 2 (a mean and its standard error), got {self.num_mass}")
        if not (0 < self.rtol < 1 and 0 < self.atol < 1):
            raise ConfigError(f"eval.rtol and eval.atol must lie in (0, 1), got {self.rtol}, {self.atol}")
        self._check_solver()
        for name in ("reference_estimator", "naive_estimator", "mass_estimator"):
            try:
                parse_estimator(getattr(self, name))
            except ValueError as err:
                raise ConfigError(f"eval.{name}: {err}") from None

    def _check_solver(self) -> None:
        from f2d2.likelihood import Solver

        try:
            steps = Solver.parse(self.reference_solver).num_steps
        except ValueError as err:
            raise ConfigError(f"eval.reference_solver: {err}") from None
        if steps is not None and steps > MAX_EULER_STEPS:
            raise ConfigError(f"eval.reference_solver: at most {MAX_EULER_STEPS} Euler steps, got {steps}")


@dataclass(frozen=True)
class SweepConfig:
    """One sweep: a dataset, methods, NFEs, and how to train and evaluate them.

    Attributes:
        kappa, sigma_0: override the dataset's divergence and prior scales (None: dataset default).
        teacher_train: training budget of the flow-matching teacher (the reference of every row).
        method_options: method name -> overrides of its config (see ``f2d2-bench methods``).
        train_overrides: method name -> overrides of ``train`` for that method.
        checkpoints: method name -> a trained checkpoint to evaluate instead of training one.
        figures: draw the figures (PNG and PDF) beside the results.
    """

    dataset: str = "checkerboard"
    methods: tuple[str, ...] = ("flow-matching", "meanflow", "meanflow-f2d2")
    nfe: tuple[int, ...] = (1, 2, 4, 8)
    kappa: float | None = None
    sigma_0: float | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher_train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method_options: dict[str, dict] = field(default_factory=dict)
    train_overrides: dict[str, dict] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)
    figures: bool = True

    def __post_init__(self) -> None:
        validate_nfe(self.nfe)
        if not self.methods:
            raise ConfigError("methods must name at least one method")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods has duplicates: {list(self.methods)}")

    def train_for(self, method: str) -> TrainConfig:
        return merge(self.train, self.train_overrides.get(method, {}), f"train_overrides.{method}")

    def options_for(self, method: str) -> dict:
        """``method_options`` of a method; NAME-fwd inherits NAME's options (its own win)."""
        base = method.removesuffix("-fwd")
        return {**self.method_options.get(base, {}), **self.method_options.get(method, {})}


def validate_nfe(nfe: tuple[int, ...]) -> None:
    if not nfe:
        raise ConfigError("nfe must list at least one number of steps")
    if any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in nfe):
        raise ConfigError(f"nfe values must be integers >= 1, got {list(nfe)}")
    if max(nfe) > MAX_NFE:
        raise ConfigError(f"nfe values must be at most {MAX_NFE} network evaluations, got {max(nfe)}")
    if len(set(nfe)) != len(nfe):
        raise ConfigError(f"nfe has duplicated values: {list(nfe)}")


def parse_nfe(text: str) -> tuple[int, ...]:
    """'1,2,4,8' -> (1, 2, 4, 8); anything else is a :class:`ConfigError` naming the bad item."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise ConfigError(f"--nfe must be a comma-separated list of integers >= 1, got {text!r}")
    values = []
    for item in items:
        if not item.lstrip("-").isascii() or not item.lstrip("-").isdigit():
            raise ConfigError(f"--nfe value {item!r} is not an integer")
        if len(item.lstrip("-+0")) > len(str(MAX_NFE)):  # also spares int() a number of thousands of digits
            raise ConfigError(f"nfe values must be at most {MAX_NFE} network evaluations, got {item}")
        values.append(int(item))
    nfe = tuple(values)
    validate_nfe(nfe)
    return nfe
