"""Figures of issue 6 ("Beyond the paper"): 2D densities, NLL and sample quality against NFE,
per-point likelihood calibration and training curves (F2D2, arXiv:2512.02636).

Every figure is drawn on a bare :class:`matplotlib.figure.Figure` (Agg canvas, no pyplot state, no
global rcParams) and written as PNG and PDF through :func:`bench.io.write_with`, so an interrupted
run never leaves a half-written file; each figure function returns the written paths. Conventions
as in the f2d2 package: t = 0 noise, t = 1 data; NLLs in nats, or bits/dim where the frame says so.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from bench.io import write_json, write_with
from bench.metrics import CALIBRATION_TOL, calibration_stats
from bench.tables import quality_metric
from f2d2.likelihood import few_step_log_prob, reference_log_prob
from f2d2.sampling import sample

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from bench.datasets import Dataset
    from f2d2.model import FlowMap

FORMATS = ("png", "pdf")
DPI = 150
EXTENT = 4.5  # half-width of the density grid: covers checkerboard ([-4, 4]^2) and 8gaussians
CHUNK = 8192  # grid points per likelihood call, so a real network's activations stay small
TEACHER = "flow-matching"
GUIDED_SUFFIX = "+guided"
MARKERS = "osD^v<>"
QUALITY_NAMES = {"fid": "FID", "fd_digits": "FD-digits", "fd_mnist": "FD-mnist", "energy_distance": "energy distance"}


def _figure(num_rows: int, num_cols: int, panel: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    from matplotlib.figure import Figure  # heavy import kept local; Figure needs no pyplot

    fig = Figure(figsize=(panel[0] * num_cols, panel[1] * num_rows), layout="constrained")
    return fig, fig.subplots(num_rows, num_cols, squeeze=False)


def _save(fig: Figure, out_stem: Path) -> list[Path]:
    """Write ``<out_stem>.png`` and ``<out_stem>.pdf`` atomically (the tmp name has no suffix, so the
    format is explicit); the PDF carries no creation date, so reruns differ only where numbers do."""
    out_stem = Path(out_stem)
    paths = []
    for ext in FORMATS:
        path = out_stem.with_name(f"{out_stem.name}.{ext}")
        meta = {"CreationDate": None} if ext == "pdf" else None
        write_with(path, lambda tmp, ext=ext, meta=meta: fig.savefig(tmp, format=ext, dpi=DPI, metadata=meta))
        paths.append(path)
    return paths


# 1. Densities on a 2D grid ------------------------------------------------------------------


@dataclass(frozen=True)
class DensityPanel:
    """``density`` (G, G) at cell centres, row i = y_i, column j = x_j; ``mass`` = sum * cell area."""

    label: str
    density: np.ndarray
    mass: float


@dataclass(frozen=True)
class DensityGrid:
    """The truth (None without an exact log p) and the model: one panel per K, or one without a head."""

    extent: float
    true: DensityPanel | None
    model: list[DensityPanel]


def _dtype_device(model: FlowMap) -> tuple[torch.dtype, torch.device]:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return torch.get_default_dtype(), torch.device("cpu")


def _panel(label: str, log_prob: Callable[[Tensor], Tensor], points: Tensor, extent: float) -> DensityPanel:
    size = math.isqrt(len(points))
    parts = [log_prob(chunk).detach().cpu().double() for chunk in points.split(CHUNK)]
    density = torch.cat(parts).exp().reshape(size, size).numpy()  # log p = -inf outside the support -> 0
    return DensityPanel(label, density, float(density.sum() * (2 * extent / size) ** 2))


def grid_densities(
    model: FlowMap, dataset: Dataset, nfe: Sequence[int] = (1, 2, 4, 8), grid_size: int = 200, extent: float = EXTENT
) -> DensityGrid:
    """The numbers behind :func:`density_figure`: exp(dataset.log_prob) and, per K, the density the
    model assigns by backward evaluation, exp(few_step_log_prob(model, x, K).log_p). A model without
    a divergence head gets one panel, the exact-ODE density of its instantaneous field u(x, t, t)."""
    if tuple(model.data_shape) != (2,):
        raise ValueError(f"density figures need 2D data, got data shape {tuple(model.data_shape)}")
    edges = torch.linspace(-extent, extent, grid_size + 1, dtype=torch.float64)
    ys, xs = torch.meshgrid((edges[1:] + edges[:-1]) / 2, (edges[1:] + edges[:-1]) / 2, indexing="ij")
    points = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)  # cell centres; reshape(G, G): y on rows
    dtype, device = _dtype_device(model)
    true = None  # the dataset's exact densities live on the CPU, in float64
    if dataset.log_prob(points[:1]) is not None:
        true = _panel("true density", dataset.log_prob, points, extent)
    on_model = points.to(device, dtype)
    if model.capabilities.divergence_head:
        few = lambda k: lambda x: few_step_log_prob(model, x, k).log_p  # noqa: E731
        panels = [_panel(f"K = {k}: F2D2 density", few(k), on_model, extent) for k in nfe]
    else:
        exact = lambda x: reference_log_prob(model.velocity, x, prior_log_prob=model.prior_log_prob).log_p  # noqa: E731
        panels = [_panel("exact-ODE density of u(x, t, t)\n(no divergence head)", exact, on_model, extent)]
    return DensityGrid(extent, true, panels)


def density_summary(grid: DensityGrid) -> dict:
    """The figure's numbers per model panel: ``mass`` on the grid; with a true density,
    ``l1_to_true`` = sum |p_model - p_true| x cell area (0 for a perfect model, at most 2 for
    normalised densities) and ``mass_in_support``, the model's mass on cells whose centre the
    true density gives positive probability (left out when that is every cell, as for a Gaussian
    mixture: it would repeat ``mass``)."""
    size = grid.model[0].density.shape[0]
    area = (2 * grid.extent / size) ** 2
    support = None if grid.true is None else grid.true.density > 0
    panels = []
    for p in grid.model:
        entry = {"label": p.label.splitlines()[0], "mass": p.mass}
        if grid.true is not None:
            entry["l1_to_true"] = float(np.abs(p.density - grid.true.density).sum() * area)
            if not support.all():
                entry["mass_in_support"] = float(p.density[support].sum() * area)
        panels.append(entry)
    return {"extent": grid.extent, "grid_size": size, "true_mass": grid.true.mass if grid.true else None, "panels": panels}


def _scatter(ax: Axes, x: np.ndarray, title: str, extent: float) -> None:
    outside = int((np.abs(x) > extent).any(axis=1).sum())
    ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4, color="C0", rasterized=True)  # rasterized keeps the PDF small
    ax.set_title(title + (f"\n({outside} outside the frame)" if outside else ""), fontsize=8)


def density_figure(
    model: FlowMap, dataset: Dataset, out_stem: Path, nfe: Sequence[int] = (1, 2, 4, 8), grid_size: int = 200,
    num_samples: int = 4000, seed: int = 0, *, extent: float = EXTENT,
) -> list[Path]:
    """The paper's 2D density figure, 2 x (1 + len(nfe)) panels over [-extent, extent]^2, plus
    ``<out_stem>.json`` with its numbers (:func:`density_summary`).

    Row 1: the true density, then the model's few-step density at each K (see
    :func:`grid_densities`) on one colour scale capped at the true maximum (brighter model peaks
    saturate); titles give the mass on the grid. Row 2: ``num_samples`` data samples, then K-step
    samples from the same latents x_0 = model.sample_prior(n, seed) for every K.
    """
    grid = grid_densities(model, dataset, nfe, grid_size, extent)
    data = dataset.sample(num_samples, torch.Generator().manual_seed(seed)).cpu().double().numpy()
    dtype, device = _dtype_device(model)
    x0 = model.sample_prior(num_samples, torch.Generator().manual_seed(seed)).to(device, dtype)
    fig, axes = _figure(2, 1 + len(nfe), panel=(2.6, 2.7))
    panels = [grid.true, *grid.model]
    scale = grid.true or max(grid.model, key=lambda p: float(np.nanmax(p.density)))  # the truth sets the scale
    vmax = float(np.nanmax(scale.density))
    for column, (ax, p) in enumerate(itertools.zip_longest(axes[0], panels)):
        if p is None:  # a missing panel is shown as missing, never faked
            note = "no exact density" if column == 0 else "no few-step density\n(no divergence head)"
            ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, fontsize=8)
            continue
        image = ax.imshow(p.density, origin="lower", extent=(-extent, extent) * 2, vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{p.label}\nmass on grid {p.mass:.4f}", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), extend="max", shrink=0.8, label="density")
    _scatter(axes[1][0], data, "data samples", extent)
    for ax, k in zip(axes[1][1:], nfe):
        x = sample(model, x0, k, track_log_p=False).x.detach().cpu().double().numpy()
        _scatter(ax, x, f"K = {k}: samples", extent)
    for ax in axes.flat:
        ax.set(xlim=(-extent, extent), ylim=(-extent, extent), aspect="equal", xticks=[], yticks=[])
    masses = ", ".join(f"{p.label.splitlines()[0]} {p.mass:.3f}" for p in panels if p)
    fig.suptitle(f"{dataset.name or 'data'} / {model.meta.get('method', 'model')}: masses {masses}", fontsize=9)
    summary = Path(out_stem).with_name(f"{Path(out_stem).name}.json")
    write_json(summary, {"dataset": dataset.name, "method": model.meta.get("method"), **density_summary(grid)})
    return [*_save(fig, out_stem), summary]


# 2-3. Curves against NFE from a tidy results frame ------------------------------------------


def _tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy with the optional columns of the results CSV filled (hand-made frames may omit them)."""
    missing = [c for c in ("method", "nfe", "metric", "value") if c not in frame.columns]
    if missing:
        raise ValueError(f"not a tidy results frame: missing columns {', '.join(missing)}")
    frame = frame.copy()
    for column, default in (("dataset", ""), ("stderr", math.nan), ("flag", "")):
        if column not in frame.columns:
            frame[column] = default
    frame["flag"] = frame["flag"].fillna("").astype(str)
    frame["stderr"] = frame["stderr"].astype(float)
    return frame


def nll_unit(frame: pd.DataFrame) -> str:
    """'bpd' if the frame has ``nll_bpd`` rows, else 'nats' if it has ``nll_nats``; else ValueError."""
    metrics = set(frame["metric"])
    for unit in ("bpd", "nats"):
        if f"nll_{unit}" in metrics:
            return unit
    raise ValueError(f"no NLL metric (nll_nats or nll_bpd) in this frame; metrics: {', '.join(sorted(metrics)) or 'none'}")


def _colours(methods) -> dict[str, tuple]:
    """One colour per base method, so a method and its guided variant match."""
    from matplotlib import colormaps

    palette = colormaps["tab20"].colors  # 20 distinct colours: all nine methods and their -fwd copies
    bases = dict.fromkeys(m.removesuffix(GUIDED_SUFFIX) for m in methods)
    return {m: palette[(2 * i) % 20 + (2 * i) // 20] for i, m in enumerate(bases)}


def _first(frame: pd.DataFrame, metric: str, method: str | None = None) -> float | None:
    rows = frame[(frame["metric"] == metric) & ((frame["method"] == method) if method else True)]
    values = rows["value"].astype(float)
    values = values[np.isfinite(values)]
    return float(values.iloc[0]) if len(values) else None  # references repeat on every NFE row


def _curve(ax: Axes, rows: pd.DataFrame, colour: str, label: str, dashed: bool = False, marker: str = "o") -> list[int]:
    """value +- stderr against nfe, flagged points (invalid, optimistic) hollow; returns the NFEs drawn (finite values)."""
    rows = rows[np.isfinite(rows["value"].astype(float))].sort_values("nfe")
    x, y = rows["nfe"].to_numpy(float), rows["value"].to_numpy(float)
    err = np.nan_to_num(rows["stderr"].to_numpy(float))  # an undefined stderr draws no bar
    ax.errorbar(x, y, yerr=err, color=colour, ls="--" if dashed else "-", marker=marker, ms=5, capsize=2, label=label)
    bad = rows["flag"].isin(["invalid", "optimistic"]).to_numpy()
    ax.scatter(x[bad], y[bad], facecolors="white", edgecolors=colour, marker=marker, s=25, zorder=4)  # hollow
    return [int(k) for k in x]


def _log2_axis(ax: Axes, nfe) -> None:
    ticks = sorted({int(k) for k in nfe})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.minorticks_off()
    ax.set_xlabel("NFE (network calls)")


def _per_dataset(frame: pd.DataFrame, draw: Callable[[Axes, pd.DataFrame], None], out_stem: Path) -> list[Path]:
    datasets = list(dict.fromkeys(frame["dataset"]))
    fig, axes = _figure(1, len(datasets), panel=(7.0, 3.8))
    for ax, name in zip(axes[0], datasets):
        ax.set_title(str(name), fontsize=9)  # before drawing, which may append a note
        draw(ax, frame[frame["dataset"] == name])
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save(fig, out_stem)


def nll_vs_nfe(frame: pd.DataFrame, out_stem: Path) -> list[Path]:
    """Few-step NLL (``nll_<unit>``, mean +- stderr) against NFE per method, one panel per dataset.

    Lines: the teacher's exact-ODE NLL (solid black), each method's own exact-ODE reference (dashed,
    method colour), the true entropy (dotted grey, if known). Hollow points are flagged invalid
    (below the entropy, or a negative bits/dim) or optimistic (below the own reference). The y axis is linear, so naive baselines far below
    the entropy stretch it, which is the paper's point about them.
    """
    frame = _tidy(frame)
    unit = nll_unit(frame)
    colours = _colours(frame["method"])

    def draw(ax: Axes, rows: pd.DataFrame) -> None:
        nll, drawn = rows[rows["metric"] == f"nll_{unit}"], []
        for method in dict.fromkeys(nll["method"]):
            colour = colours[method.removesuffix(GUIDED_SUFFIX)]
            drawn += _curve(ax, nll[nll["method"] == method], colour, method)
            if (own := _first(rows, f"nll_ref_{unit}", method)) is not None:
                ax.axhline(own, color=colour, ls="--", lw=1, alpha=0.8)
        if (teacher := _first(rows, f"nll_teacher_{unit}")) is not None:
            ax.axhline(teacher, color="black", lw=1.2, label=f"teacher, exact ODE ({teacher:.3f})")
        if (entropy := _first(rows, f"entropy_{unit}")) is not None:
            ax.axhline(entropy, color="grey", ls=":", lw=1.5, label=f"true entropy ({entropy:.3f})")
        ax.plot([], [], color="grey", ls="--", lw=1, label="own reference (method colour)")
        ax.scatter([], [], facecolors="none", edgecolors="grey", label="flagged: invalid or optimistic")
        _log2_axis(ax, drawn)
        ax.set_ylabel(f"few-step NLL ({unit}), lower is better")
        if len(nll) > len(drawn):  # NaN/inf NLLs cannot be drawn; say so rather than hide them
            ax.set_title(f"{ax.get_title()} ({len(nll) - len(drawn)} non-finite NLL not shown)", fontsize=9)

    with_nll = frame["dataset"].isin(frame.loc[frame["metric"] == f"nll_{unit}", "dataset"])  # one panel per dataset with an NLL
    return _per_dataset(frame[with_nll], draw, out_stem)


@dataclass(frozen=True)
class Curve:
    """One quality curve: ``rows`` of one method (and guidance step size eta, if any)."""

    label: str
    base: str
    guided: bool
    rows: pd.DataFrame


def quality_curves(rows: pd.DataFrame) -> tuple[list[Curve], pd.Series | None]:
    """Split one dataset's rows of one metric into curves, and pick the many-step teacher row.

    Guided rows: a method named NAME+guided, or a finite ``eta`` > 0 (eta 0 is no guidance). The
    teacher row is flow-matching at its largest NFE; it leaves the curves when that NFE is beyond
    every other method's, so a 200-step value does not stretch the few-step axis.
    """
    rows = _tidy(rows)
    eta = rows["eta"].astype(float).to_numpy() if "eta" in rows.columns else np.full(len(rows), np.nan)
    teacher = None
    fm = rows[rows["method"] == TEACHER]
    if len(fm):
        teacher = fm.loc[fm["nfe"].astype(int).idxmax()]
        others = rows.loc[rows["method"] != TEACHER, "nfe"]
        if len(others) and teacher["nfe"] > others.max():
            keep = (rows.index != teacher.name)
            rows, eta = rows[keep], eta[keep]
    step = [f"{e:g}" if np.isfinite(e) and e > 0 else "" for e in eta]
    keys = list(zip(rows["method"], step))
    curves = []
    for method, s in dict.fromkeys(keys):
        guided = method.endswith(GUIDED_SUFFIX) or s != ""
        base = method.removesuffix(GUIDED_SUFFIX)
        label = base + (" + guidance" if guided else "") + (f" (eta = {s})" if s else "")
        curves.append(Curve(label, base, guided, rows[[key == (method, s) for key in keys]]))
    return curves, teacher


def quality_vs_nfe(frame: pd.DataFrame, out_stem: Path, metric: str | None = None) -> list[Path]:
    """Sample quality (``metric``, lower is better; auto-picked among fid, fd_digits, fd_mnist,
    energy_distance) against NFE per method, one panel per dataset. Guided curves are dashed in the
    method's colour (one marker per eta); the many-step flow-matching teacher is a labelled line."""
    frame = _tidy(frame)
    metric = metric or quality_metric(frame)
    if metric is None or not (frame["metric"] == metric).any():
        raise ValueError(f"metric {metric!r} is not in this frame; metrics: {', '.join(sorted(set(frame['metric'])))}")
    rows = frame[frame["metric"] == metric]
    colours = _colours(rows["method"])

    def draw(ax: Axes, sub: pd.DataFrame) -> None:
        curves, teacher = quality_curves(sub)
        variants: dict[str, int] = {}
        drawn = []
        for curve in curves:
            index = variants[curve.base] = variants.get(curve.base, -1) + 1
            drawn += _curve(ax, curve.rows, colours[curve.base], curve.label, curve.guided, MARKERS[index % len(MARKERS)])
        if teacher is not None:
            label = f"{TEACHER}, {int(teacher['nfe'])} steps ({teacher['value']:.3g})"
            ax.axhline(float(teacher["value"]), color="black", lw=1, ls="-.", label=label)
        _log2_axis(ax, drawn)
        values = sub["value"].to_numpy(dtype=float)
        values = values[np.isfinite(values)]
        if values.size and values.min() > 0 and values.max() / values.min() > 20:
            ax.set_yscale("log")  # distances spanning decades (a 1-step teacher's FD) would flatten the rest
        ax.set_ylabel(f"{QUALITY_NAMES.get(metric, metric)}, lower is better")

    return _per_dataset(rows, draw, out_stem)


# 4. Per-point calibration of few-step likelihoods -------------------------------------------


def _calibration_panel(ax: Axes, few: np.ndarray, ref: np.ndarray, unit: str, name: str) -> None:
    stats = calibration_stats(few, ref, unit)
    ok = np.isfinite(few) & np.isfinite(ref)
    ax.scatter(ref[ok], few[ok], s=3, alpha=0.5, color="C0", rasterized=True)
    both = np.concatenate([few[ok], ref[ok]])
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    pad = 0.05 * (hi - lo) or 1.0
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", lw=1, ls="--")  # y = x: perfectly calibrated
    ax.set(xlim=(lo - pad, hi + pad), ylim=(lo - pad, hi + pad), aspect="equal")
    skipped = f", {int((~ok).sum())} non-finite" if (~ok).any() else ""
    line = f"MAE {stats['mae']:.3g}, Spearman {stats['spearman']:.3f},\n{stats['within']:.1%} within {CALIBRATION_TOL[unit]:g} {unit}"
    ax.set_title(f"{name}\n{line}{skipped}", fontsize=8)


def calibration_scatter(
    per_sample: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]], out_stem: Path, unit: str = "nats"
) -> list[Path]:
    """Per-point few-step NLL against the exact reference NLL; rows = methods, columns = NFE.

    ``per_sample[method][K] = (few, ref)``, each (N,) NLL of the same test points in ``unit``: few
    with K network calls (y axis), ref through the exact ODE (x axis). Each panel draws y = x and
    titles :func:`calibration_stats`; a method lacking a K shows an empty panel.
    """
    nfe = sorted({int(k) for by_k in per_sample.values() for k in by_k})
    if not nfe:
        raise ValueError("calibration_scatter needs at least one method with one NFE")
    fig, axes = _figure(len(per_sample), len(nfe), panel=(2.8, 3.0))
    for row, (method, by_k) in zip(axes, per_sample.items()):
        for ax, k in zip(row, nfe):
            if k not in by_k:
                ax.set_axis_off()
                ax.set_title(f"{method}, K = {k}: -", fontsize=8)
                continue
            few, ref = (np.asarray(a, dtype=np.float64).reshape(-1) for a in by_k[k])
            _calibration_panel(ax, few, ref, unit, f"{method}, K = {k}")
    fig.supxlabel(f"exact reference NLL ({unit})")
    fig.supylabel(f"few-step NLL ({unit})")
    return _save(fig, out_stem)


# 5. Training curves --------------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pick_step(history: list[dict], criterion: str) -> int:
    """Step of the best record for ``criterion`` (earliest on ties): the lowest value, the lowest
    |value| for gaps (a gap is best at 0, of either sign), the highest for shares."""
    records = [r for r in history if _is_number(r.get(criterion))]
    if not records:
        keys = sorted({k for r in history for k in r})
        raise ValueError(f"criterion {criterion!r} has no finite value in the history; keys: {', '.join(keys)}")
    score = abs if "gap" in criterion else (lambda v: -v) if "share" in criterion else float
    return int(min(records, key=lambda r: (score(r[criterion]), r["step"]))["step"])


def training_curves(
    history: list[dict], out_stem: Path, criterion: str | None = None, best_step: int | None = None
) -> list[Path]:
    """Each numeric metric of the records against ``step`` (validation metrics first), one panel each.

    A solid red line marks the chosen step (``best_step``, else :func:`pick_step` on ``criterion``;
    'last', as in ``train.select``, picks the last step), a dotted grey one the last step; the title
    says which step the criterion picked. Positive metrics spanning two decades get a log y axis.
    """
    if not history or any(not _is_number(r.get("step")) for r in history):
        raise ValueError("training_curves needs a non-empty list of records, each with a numeric 'step'")
    keys = [k for k in dict.fromkeys(k for r in history for k in r) if k != "step"]
    metrics = sorted((k for k in keys if any(_is_number(r.get(k)) for r in history)), key=lambda k: not k.startswith("val_"))
    if not metrics:
        raise ValueError("no numeric metric in the history records")
    last = max(int(r["step"]) for r in history)
    if best_step is None and criterion is not None:  # 'last' is the training loop's "no selection"
        best_step = last if criterion == "last" else pick_step(history, criterion)
    num_cols = min(3, len(metrics))
    fig, axes = _figure(math.ceil(len(metrics) / num_cols), num_cols, panel=(3.4, 2.6))
    for ax, key in zip(axes.flat, metrics):
        steps, values = zip(*sorted((int(r["step"]), float(r[key])) for r in history if _is_number(r.get(key))))
        ax.plot(steps, values, color="C0", marker="." if len(steps) <= 50 else None)
        if min(values) > 0 and max(values) > 100 * min(values):
            ax.set_yscale("log")
        if best_step is not None:
            ax.axvline(best_step, color="C3", lw=1.2, label=f"chosen step {best_step}")
        ax.axvline(last, color="grey", ls=":", lw=1.2, label=f"last step {last}")
        if "gap" in key:
            ax.axhline(0.0, color="black", lw=0.6)  # a gap is best at zero, of either sign
        ax.set_title(key, fontsize=9, fontweight="bold" if key == criterion else "normal")
        ax.set_xlabel("step")
    for ax in axes.flat[len(metrics):]:
        ax.set_axis_off()
    axes.flat[0].legend(fontsize=7)
    chosen = "no step chosen" if best_step is None else f"{criterion or 'the caller'} picked step {best_step}"
    fig.suptitle(f"{chosen} (last step {last})", fontsize=10)
    return _save(fig, out_stem)
