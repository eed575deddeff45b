"""The cost plan of a sweep (``f2d2-bench plan``, ``sweep --dry-run``), before anything runs.

It needs no data files, weights or GPU: networks are built on PyTorch's "meta" device (shapes
only, no memory, no arithmetic) and every FLOP is counted by ``torch.utils.flop_counter``, which
counts matrix products, convolutions and attention (elementwise operations and the optimizer step
are not counted; they are a small share for these networks).

- Training: one step of each method's real loss + backward (teacher and EMA calls included) at a
  small batch b, scaled linearly to the configured batch B. b is the smallest batch whose row
  shares (the methods' ``*_fraction`` options: Shortcut's bootstrap rows, MeanFlow's and LSD's
  diagonal rows) round exactly as B's do, so the scaling is exact.
- Evaluation (as bench/sweep.py and bench/cells.py run it, every cell computed): reference solves
  (NFE per solve: N for euler:N, an assumed ``dopri5_nfe`` for dopri5) times the divergence cost
  (one forward + D VJPs for the exact trace, + P VJPs for hutchinson:P), few-step NLLs, samples
  (timed runs: num_repeats + 1 warm-up; extra seed ranges of eval.fid_seeds), and for FID datasets
  Inception features (INCEPTION_FLOPS_PER_IMAGE) of samples, training images and the test-image
  floor, and KID's Gram matrices.
- GPU-hours = FLOPs / (tflops 10^12 mfu) / 3600.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

from baselines import get_method
from bench.checkpoint import read_meta
from bench.config import ModelConfig, SweepConfig, from_dict
from bench.kid import KID_SUBSET_SIZE, KID_SUBSETS
from bench.models import build_model
from f2d2.divergence import Exact, parse_estimator
from f2d2.likelihood import Solver
from f2d2.model import Capabilities

DEFAULT_TFLOPS = 156.0  # NVIDIA A100 SXM dense TF32 peak (TFLOP/s): what fp32 training uses there
DEFAULT_DEVICE_NAME = "A100 TF32 dense peak"
DEFAULT_MFU = 0.30  # assumed model FLOP utilisation
DOPRI5_NFE = 200  # assumed evaluations per dopri5 solve; measured here: 92 (checkerboard), 104-128 (digits)
# Inception-v3 to its 2048-d pool features at 299 x 299 (the fc layer is not used): convolutions
# measured with FlopCounterMode on torchvision's inception_v3, the architecture of clean-fid's file.
INCEPTION_FLOPS_PER_IMAGE = 11_422_336_192
FEATURE_DIM = 2048
STATE_COPIES = 4  # a checkpoint holds weights, EMA weights and Adam's two moments (one more with select)
BYTES_PER_VALUE = 4  # float32
WARMUP_POINTS = 8  # bench/evaluate.py: an untimed reference solve on 8 points first
SMALL_BATCH_MIN = 2


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker, whose hooks break autograd.grad and
    torch.func.vjp on module inputs (pytorch/pytorch#131753); every FLOP counts as 'Global'."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        return None


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs that ``fn()`` dispatches, counted by torch.utils.flop_counter.FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        fn()
    return counter.get_total_flops()


def flop_batch(method_config, batch: int) -> int:
    """Smallest b in [2, batch] whose row shares round like the batch's: round(f b) / b = round(f B) / B
    for every ``*_fraction`` field f of the method config (b = batch if none is smaller)."""
    shares = [getattr(method_config, f.name) for f in fields(method_config) if f.name.endswith("_fraction")]
    for b in range(min(SMALL_BATCH_MIN, batch), batch + 1):
        if all(round(f * b) * batch == round(f * batch) * b for f in shares):
            return b
    return batch


def _on(device: str, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.device(device):
        return build()


def measured(fn: Callable[[str], int]) -> int:
    """``fn(device)`` on the meta device (no arithmetic); on the CPU if an operation lacks a meta kernel."""
    try:
        return fn("meta")
    except (RuntimeError, NotImplementedError):
        return fn("cpu")


def train_flops_per_step(method_name: str, method_config, model: ModelConfig, shape: tuple[int, ...], batch: int) -> int:
    """FLOPs of one training step (loss + backward) at ``batch``, measured at a small batch and scaled."""
    method = get_method(method_name).build(method_config)
    small = flop_batch(method_config, batch)
    teacher_caps = get_method("flow-matching").build().capabilities

    def step(device: str) -> int:
        net = _on(device, lambda: build_model(model, shape, method.capabilities, kappa=1.0, sigma_0=1.0))
        teacher = None
        if method.needs_teacher:
            teacher = _on(device, lambda: build_model(model, shape, teacher_caps, kappa=1.0, sigma_0=1.0)).requires_grad_(False)
        ema = copy.deepcopy(net).requires_grad_(False)
        x1 = torch.zeros((small, *shape), device=device)
        gen = torch.Generator().manual_seed(0)

        def run() -> None:
            method.loss(net, x1, generator=gen, teacher=teacher, ema=ema).total.mean().backward()

        return count_flops(run)

    return measured(step) * batch // small


@dataclass(frozen=True)
class NetCost:
    """Per-sample FLOPs of one network call (forward) and of one VJP of u(., t, t) w.r.t. x."""

    params: int
    forward: int
    vjp: int


def net_cost(model: ModelConfig, shape: tuple[int, ...], caps: Capabilities) -> NetCost:
    def cost(device: str) -> tuple[int, int, int]:
        net = _on(device, lambda: build_model(model, shape, caps, kappa=1.0, sigma_0=1.0)).eval()
        x, t = torch.zeros((SMALL_BATCH_MIN, *shape), device=device), torch.full((SMALL_BATCH_MIN,), 0.5, device=device)
        forward = count_flops(lambda: net(x, t, t))
        out, vjp_fn = torch.func.vjp(lambda z: net.velocity(z, t), x)
        vjp = count_flops(lambda: vjp_fn(torch.ones_like(out)))
        return sum(p.numel() for p in net.parameters()), forward // SMALL_BATCH_MIN, vjp // SMALL_BATCH_MIN

    try:
        return NetCost(*cost("meta"))
    except (RuntimeError, NotImplementedError):
        return NetCost(*cost("cpu"))


@dataclass(frozen=True)
class ModelPlan:
    """One model of the sweep: cache status, size and its training cost in this run."""

    method: str
    status: str  # complete (reused), partial (resumed), missing (trained), provided (--checkpoint)
    params: int
    steps: int
    done_steps: int
    batch_size: int
    flops_per_step: int | None
    checkpoint_bytes: int

    @property
    def images(self) -> int:
        return self.steps * self.batch_size

    @property
    def train_flops(self) -> int:
        """FLOPs left to spend on this model in this run (0 when reused)."""
        return 0 if self.flops_per_step is None else self.flops_per_step * (self.steps - self.done_steps)


@dataclass(frozen=True)
class EvalItem:
    what: str
    flops: int


@dataclass
class Plan:
    dataset: str
    models: list[ModelPlan]
    evaluation: list[EvalItem]
    tflops: float
    mfu: float
    dopri5_nfe: int
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def train_flops(self) -> int:
        return sum(m.train_flops for m in self.models)

    @property
    def eval_flops(self) -> int:
        return sum(item.flops for item in self.evaluation)

    @property
    def new_disk_bytes(self) -> int:
        return sum(m.checkpoint_bytes for m in self.models if m.status in ("missing", "partial"))

    def gpu_hours(self, flops: int) -> float:
        return flops / (self.tflops * 1e12 * self.mfu) / 3600.0


def checkpoint_bytes(params: int, select: str) -> int:
    """Tensor bytes of a checkpoint: weights, EMA and Adam's two moments (+ best EMA weights)."""
    return params * BYTES_PER_VALUE * (STATE_COPIES + (select != "last"))


def model_plans(
    sources: dict, shape: tuple[int, ...], progress: Callable[[str], None]
) -> tuple[list[ModelPlan], dict[str, tuple[NetCost, Capabilities]]]:
    """Every model the sweep would train or reuse, and the network cost and capabilities of each."""
    from bench.jobs import Job

    plans, nets = [], {}
    for name, source in sources.items():
        progress(f"counting FLOPs: {name}")
        if isinstance(source, Job):
            caps = get_method(name).build(source.method_config).capabilities
            status = source.status()
            done = read_meta(source.directory)["step"] if status != "missing" else 0
            per_step = train_flops_per_step(name, source.method_config, source.model, shape, source.train.batch_size)
            cost = net_cost(source.model, shape, caps)
            steps, batch, select = source.train.steps, source.train.batch_size, source.train.select
        else:
            meta = read_meta(source.directory)
            caps = Capabilities(**meta["capabilities"])
            cost = net_cost(from_dict(ModelConfig, meta["model"], "model"), shape, caps)
            status, per_step, steps, done = "provided", None, meta["step"], meta["step"]
            batch, select = meta["train"]["batch_size"], meta["train"].get("select", "last")
        nets[name] = (cost, caps)
        plans.append(ModelPlan(name, status, cost.params, steps, done, batch, per_step, checkpoint_bytes(cost.params, select)))
    return plans, nets


def num_vjps(spec: str, dims: int) -> int:
    """VJPs per divergence: D for the exact trace, P for hutchinson:P."""
    estimator = parse_estimator(spec)
    return dims if isinstance(estimator, Exact) else estimator.num_probes


def evaluation_items(cfg: SweepConfig, dataset, nets: dict, dopri5_nfe: int, teacher: str) -> tuple[list[EvalItem], list[str]]:
    """Evaluation FLOPs by item for the metric groups the sweep computes, and what is not counted."""
    from bench.config import measured_groups

    groups = measured_groups(cfg.eval)
    items = _likelihood_items(cfg, dataset, nets, dopri5_nfe, teacher, groups)
    items += _sample_items(cfg, dataset, nets, teacher, groups)
    if "mass" in groups:
        items.append(_mass_item(cfg, dataset, nets, dopri5_nfe))
    notes = []
    if len(dataset.data_shape) == 3 and dataset.levels and "quality" in groups and not _inception(dataset):
        notes.append("the classifier features of the Frechet distance (a small CNN) are not counted")
    if "guidance" in groups:
        notes.append("self-guidance (eval.guidance_etas) is not counted")
    if any(cfg.train_for(m).validate_every for m in cfg.methods) or cfg.teacher_train.validate_every:
        notes.append("validation during training (train.validate_every) is not counted")
    return items, notes


def _inception(dataset) -> bool:
    from bench.fid import uses_inception

    return uses_inception(dataset)


def _reference_nfe(ev, dopri5_nfe: int) -> tuple[int, str]:
    steps = Solver.parse(ev.reference_solver).num_steps
    return (steps, ev.reference_solver) if steps else (dopri5_nfe, f"dopri5, {dopri5_nfe} assumed")


def _likelihood_items(cfg: SweepConfig, dataset, nets: dict, dopri5_nfe: int, teacher: str, groups) -> list[EvalItem]:
    """Reference solves and few-step NLLs (groups nll, calibration, timing; repeats only with timing)."""
    if not groups & {"nll", "calibration", "timing"}:
        return []
    ev, dims = cfg.eval, math.prod(dataset.data_shape)
    n_test = min(ev.num_test, getattr(dataset, "num_test_images", None) or ev.num_test)
    runs, num_k = (ev.num_repeats + 1 if "timing" in groups else 1), sum(cfg.nfe)
    nfe_ref, solver = _reference_nfe(ev, dopri5_nfe)
    evaluated = list(dict.fromkeys([teacher, *cfg.methods]))
    ref_vjps, naive_vjps = num_vjps(ev.reference_estimator, dims), num_vjps(ev.naive_estimator, dims)
    ref = sum((n_test + WARMUP_POINTS) * nfe_ref * (nets[m][0].forward + ref_vjps * nets[m][0].vjp) for m in evaluated)
    few = 0
    for m in cfg.methods:
        cost, caps = nets[m]
        if caps.divergence_head:
            passes = 2 if caps.backward and ev.backward != "first_order" and "nll" in groups else 1  # + first-order rows
            few += num_k * cost.forward * n_test * runs * passes
        else:
            few += num_k * (cost.forward + naive_vjps * cost.vjp) * n_test * runs
    return [
        EvalItem(f"reference solves: {len(evaluated)} models x ({n_test} + {WARMUP_POINTS} warm-up) points x {nfe_ref} NFE "
                 f"({solver}) x (1 forward + {ref_vjps} VJP(s), {ev.reference_estimator})", ref),
        EvalItem(f"few-step NLLs: {len(cfg.methods)} methods x NFE {','.join(map(str, cfg.nfe))} x {n_test} points x "
                 f"{runs} run(s); naive: + {naive_vjps} VJP(s) per step", few),
    ]


def _sample_items(cfg: SweepConfig, dataset, nets: dict, teacher: str, groups) -> list[EvalItem]:
    """Samples (groups quality, timing) and, for FID, Inception features and KID (group quality)."""
    if not groups & {"quality", "timing"}:
        return []
    ev = cfg.eval
    n, num_k = ev.num_samples, sum(cfg.nfe)
    images = len(dataset.data_shape) == 3 and bool(dataset.levels)
    seeds = ev.fid_seeds if images and "quality" in groups else 1
    runs = ev.num_repeats + 1 if "timing" in groups else 1
    sampled = sum(num_k * nets[m][0].forward * n * (runs + seeds - 1) for m in cfg.methods)
    cells = len(cfg.methods) * len(cfg.nfe)
    if teacher in cfg.methods and ev.teacher_steps and "quality" in groups:
        sampled += ev.teacher_steps * nets[teacher][0].forward * n * (runs + seeds - 1)
        cells += 1
    items = [EvalItem(f"samples: {n} per cell x NFE x ({runs} run(s) + {seeds - 1} extra seed range(s))", sampled)]
    if _inception(dataset) and "quality" in groups:
        num_train = getattr(dataset, "num_train_images", None) or n
        floor = min(n, getattr(dataset, "num_test_images", None) or n)
        images_scored = cells * seeds * n + num_train + floor
        items.append(EvalItem(f"Inception features: {cells} cells x {seeds} seed range(s) x {n} samples + {num_train} training "
                              f"images (reference, unless cached) + {floor} test images, x {INCEPTION_FLOPS_PER_IMAGE / 1e9:.2f} GFLOP",
                              images_scored * INCEPTION_FLOPS_PER_IMAGE))
        m = min(n, num_train, KID_SUBSET_SIZE)
        kid_runs = cells * seeds + 1
        items.append(EvalItem(f"KID: {kid_runs} x {KID_SUBSETS} subsets x 3 Gram matrices of {m} x {m} x {FEATURE_DIM}",
                              kid_runs * KID_SUBSETS * 3 * 2 * m * m * FEATURE_DIM))
    return items


def _mass_item(cfg: SweepConfig, dataset, nets: dict, dopri5_nfe: int) -> EvalItem:
    """The total mass of every few-step density: 2D grid quadrature (K-step likelihoods of the grid)
    or, for images, the exact-ODE proposal (num_mass samples) and K-step likelihoods of it."""
    from bench.mass import GRID_SIZE

    ev, dims, num_k = cfg.eval, math.prod(dataset.data_shape), sum(cfg.nfe)
    naive_vjps = num_vjps(ev.naive_estimator, dims)
    if tuple(dataset.data_shape) == (2,):
        points = GRID_SIZE**2
        flops = sum(num_k * (nets[m][0].forward + (0 if nets[m][1].divergence_head else naive_vjps * nets[m][0].vjp)) * points
                    for m in cfg.methods)
        return EvalItem(f"mass: {len(cfg.methods)} methods x NFE x {points} grid points", flops)
    nfe_ref, solver = _reference_nfe(ev, dopri5_nfe)
    mass_vjps = num_vjps(ev.mass_estimator, dims)
    flops = 0
    for m in cfg.methods:
        cost, caps = nets[m]
        flops += ev.num_mass * nfe_ref * (cost.forward + mass_vjps * cost.vjp)
        flops += num_k * ev.num_mass * (cost.forward + (0 if caps.divergence_head else naive_vjps * cost.vjp))
    return EvalItem(f"mass: {len(cfg.methods)} methods x {ev.num_mass} exact-ODE proposal samples x {nfe_ref} NFE ({solver}) "
                    f"x (1 forward + {mass_vjps} VJP(s), {ev.mass_estimator}) + their K-step likelihoods", flops)


def make_plan(
    cfg: SweepConfig, cache_dir, data_dir: str | None, *, tflops: float = DEFAULT_TFLOPS, mfu: float = DEFAULT_MFU,
    dopri5_nfe: int = DOPRI5_NFE, progress: Callable[[str], None] = lambda text: None,
) -> Plan:
    """The plan of ``cfg`` from the dataset's class attributes and the checkpoint cache only."""
    from bench.datasets import dataset_class
    from bench.sweep import TEACHER, plan_jobs

    if not math.isfinite(tflops) or tflops <= 0 or not 0 < mfu <= 1 or dopri5_nfe < 1:
        raise ValueError(f"need --tflops > 0, 0 < --mfu <= 1 and --dopri5-nfe >= 1, got {tflops}, {mfu}, {dopri5_nfe}")
    dataset = dataset_class(cfg.dataset)
    kappa = cfg.kappa if cfg.kappa is not None else dataset.kappa
    sigma_0 = cfg.sigma_0 if cfg.sigma_0 is not None else dataset.sigma_0
    sources = plan_jobs(cfg, dataset, data_dir, cache_dir, kappa, sigma_0)
    models, nets = model_plans(sources, tuple(dataset.data_shape), progress)
    items, notes = evaluation_items(cfg, dataset, nets, dopri5_nfe, TEACHER)
    plan = Plan(cfg.dataset, models, items, tflops, mfu, dopri5_nfe, notes)
    plan.warnings = precision_warnings(sources, tflops)
    return plan


# A100 dense peaks (TFLOP/s) by training precision: what --tflops should be for each setting
PEAK_BY_PRECISION = {"fp32 with TF32 off": 19.5, "fp32 with TF32": 156.0, "bf16": 312.0, "fp16": 312.0}


def precision_warnings(sources: dict, tflops: float) -> list[str]:
    """A line for every training precision in the plan whose A100 peak is not the assumed one (the
    GPU-hours then scale by the ratio), e.g. the paper profile trains in fp32 with TF32 off."""
    from bench.jobs import Job

    seen = {}
    for name, source in sources.items():
        if not isinstance(source, Job) or source.status() == "complete":
            continue
        precision = getattr(source.train, "precision", "fp32")
        tf32 = getattr(source.train, "tf32", None)
        key = precision if precision != "fp32" else ("fp32 with TF32 off" if tf32 is False else "fp32 with TF32")
        seen.setdefault(key, []).append(name)
    return [
        f"{', '.join(names)} train in {key}: an A100's peak for that is {PEAK_BY_PRECISION[key]:g} TFLOP/s, not the "
        f"assumed {tflops:g}; their training GPU-hours scale by {tflops / PEAK_BY_PRECISION[key]:.3g} "
        f"(rerun with --tflops {PEAK_BY_PRECISION[key]:g})"
        for key, names in seen.items() if PEAK_BY_PRECISION[key] != tflops
    ]


def _si(value: float, unit: str = "") -> str:
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def render(plan: Plan) -> str:
    """The plan as Markdown tables with its assumptions."""
    rate = plan.tflops * plan.mfu
    lines = [
        f"Cost plan: {plan.dataset}. Assumed device: {plan.tflops:g} TFLOP/s peak (--tflops; default "
        f"{DEFAULT_TFLOPS:g}, {DEFAULT_DEVICE_NAME}) x MFU {plan.mfu:g} (--mfu; default {DEFAULT_MFU:g}) = {rate:g} TFLOP/s.",
        "FLOPs: torch.utils.flop_counter (matmuls, convolutions, attention; elementwise ops and the optimizer not counted).",
        "",
        "| model | cache | params | steps | batch | images | FLOP/step | train FLOP (this run) | checkpoint |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in plan.models:
        status = {"complete": "complete (reused)", "partial": f"partial (resume at {m.done_steps})",
                  "missing": "missing (train)", "provided": "provided"}[m.status]
        per_step = "-" if m.flops_per_step is None else _si(m.flops_per_step, "FLOP")
        lines.append(f"| {m.method} | {status} | {_si(m.params)} | {m.steps:,} | {m.batch_size} | {_si(m.images)} | "
                     f"{per_step} | {_si(m.train_flops, 'FLOP')} | {_si(m.checkpoint_bytes, 'B')} |")
    lines += ["", "| evaluation (every cell computed; cached cells are not subtracted) | FLOP |", "|---|---|"]
    lines += [f"| {item.what} | {_si(item.flops, 'FLOP')} |" for item in plan.evaluation]
    total = plan.train_flops + plan.eval_flops
    lines += [
        "",
        f"Training: {_si(plan.train_flops, 'FLOP')} = {plan.gpu_hours(plan.train_flops):.3g} GPU-hours. "
        f"Evaluation: {_si(plan.eval_flops, 'FLOP')} = {plan.gpu_hours(plan.eval_flops):.3g} GPU-hours. "
        f"Total: {_si(total, 'FLOP')} = {plan.gpu_hours(total):.3g} GPU-hours at {rate:g} TFLOP/s.",
        f"New checkpoint disk: {_si(plan.new_disk_bytes, 'B')}.",
    ]
    if plan.notes:
        lines.append("Not counted: " + "; ".join(plan.notes) + ".")
    lines += [f"Device assumption: {warning}." for warning in plan.warnings]
    return "\n".join(lines) + "\n"
