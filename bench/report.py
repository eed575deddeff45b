"""The figures of a sweep, drawn from its rows, per-point arrays and checkpoints (bench/plots.py)."""

from __future__ import annotations


import torch
from torch import Tensor

from bench.checkpoint import load_checkpoint, read_meta
from bench.config import SweepConfig

DENSITY_GRID = 200  # points per side of the 2D density grid


def write_figures(outcome, dataset, sources: dict, arrays: dict[str, dict[str, Tensor]], cfg: SweepConfig, device: torch.device) -> list[str]:
    """NLL and sample quality against NFE, per-point calibration, the 2D density figure of every
    model with a divergence head, and validation curves; returns the written paths."""
    from bench import plots
    from bench.cells import Units
    from bench.tables import rows_frame

    from bench.tables import quality_metric

    figures = outcome.out_dir / "figures"
    frame = rows_frame(outcome.rows)
    paths = []  # a figure of a metric group that was not measured is left out, never drawn empty
    if frame["metric"].str.fullmatch(r"nll_(nats|bpd)").any():
        paths += plots.nll_vs_nfe(frame, figures / "nll_vs_nfe")
    if quality_metric(frame) is not None:
        paths += plots.quality_vs_nfe(frame, figures / "quality_vs_nfe")
    units = Units(dataset)
    per_sample = {
        name: {int(key[3:]): (_unit(values, units), _unit(data["ref"], units)) for key, values in data.items() if key.startswith("nfe")}
        for name, data in arrays.items()
    }
    if any(per_sample.values()):
        paths += plots.calibration_scatter({n: v for n, v in per_sample.items() if v}, figures / "calibration", unit=units.name)
    for name, source in sources.items():
        if name not in cfg.methods:
            continue
        if not hasattr(source, "directory"):  # a user loader's model: no checkpoint metadata
            continue
        meta = read_meta(source.directory)
        if len(dataset.data_shape) == 1 and dataset.data_shape[0] == 2 and meta["capabilities"]["divergence_head"]:
            model = load_checkpoint(source.directory, ema=cfg.eval.use_ema, best=cfg.eval.use_best, device=device)
            paths += plots.density_figure(model, dataset, figures / f"density_{name}", nfe=cfg.nfe, grid_size=DENSITY_GRID)
        if meta.get("validation"):
            paths += plots.training_curves(
                meta["validation"], figures / f"training_{name}", criterion=meta.get("select"), best_step=meta.get("best_step")
            )
    return [str(p) for p in paths]


def _unit(nll: Tensor, units):
    return units.convert(nll).numpy()
