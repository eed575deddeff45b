"""How accurate is an exact-ODE reference? Per-point NLL errors against a much tighter solve.

A reference NLL integrates the joint ODE (x, log p) with an adaptive solver; its relative tolerance
bounds the local error of a state whose log-density part reaches tens of nats, so the per-point
error of the NLL can be far above rtol (METHOD.md Sec. 4, "Reference accuracy"). This study solves
the same points at several tolerances (and, optionally, with Hutchinson probes instead of the exact
trace) and reports, against the tightest exact solve, the mean and worst per-point absolute error
in nats and in the dataset's unit, the solver's function evaluations and wall-clock. It is what
the sweep profiles' reference settings are chosen from (``f2d2-bench reference-accuracy``).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace

import torch

from bench.config import EvalConfig
from bench.measure import reference
from f2d2.model import FlowMap


@dataclass(frozen=True)
class AccuracyRow:
    """One reference setting against the tightest exact solve (errors per point, over the points)."""

    estimator: str
    rtol: float
    nfe: int
    wall_s: float
    mean_abs_err_nats: float
    max_abs_err_nats: float
    mean_abs_err_unit: float
    max_abs_err_unit: float
    mean_mc_stderr_unit: float  # the reference's own reported Monte-Carlo standard error (NaN: exact)


def reference_accuracy(
    model: FlowMap, x: torch.Tensor, cfg: EvalConfig, rtols: list[float], estimators: list[str], unit_scale: float,
    device: torch.device,
) -> list[AccuracyRow]:
    """Every (estimator, rtol) pair, and the exact trace at the tightest rtol as the truth (its own
    row has zero error by construction: it is listed to give its cost).

    The truth is solved in float64 (a copy of the model and the points): a float32 state rounds at
    ~1e-7 relative, so below rtol ~1e-7 dopri5's error control cannot be met and the step size
    collapses (seen: no end after 27 CPU-minutes on 297 digits at rtol 1e-9). The other settings run
    in the model's own dtype, as the sweep does, so their errors include its rounding."""
    tightest = min(rtols)
    settings = [("exact", tightest)] + [(e, r) for e in estimators for r in sorted(rtols, reverse=True) if (e, r) != ("exact", tightest)]
    results = {}
    for estimator, rtol in settings:
        run_cfg = replace(cfg, reference_estimator=estimator, rtol=rtol, atol=rtol, reference_solver="dopri5")
        truth_row = (estimator, rtol) == ("exact", tightest)
        run_model, run_x = (float64_copy(model), x.double()) if truth_row else (model, x)
        start = time.perf_counter()
        results[(estimator, rtol)] = (reference(run_model, run_x, run_cfg, device), time.perf_counter() - start)
    truth = results[("exact", tightest)][0].nll.double()
    rows = []
    for (estimator, rtol), (lik, wall) in results.items():
        err = (lik.nll.double() - truth).abs()
        mc = math.nan if lik.mc_stderr is None else lik.mc_stderr.double().mean().item() * unit_scale
        rows.append(AccuracyRow(
            estimator, rtol, lik.nfe, wall, err.mean().item(), err.max().item(),
            err.mean().item() * unit_scale, err.max().item() * unit_scale, mc,
        ))
    return rows


def float64_copy(model: FlowMap) -> FlowMap:
    """The model with float64 parameters and buffers; the caller's model is left as it is."""
    return copy.deepcopy(model).to(torch.float64)


def accuracy_markdown(rows: list[AccuracyRow], unit: str, title: str) -> str:
    both = unit != "nats"  # in bits/dim too for discrete data
    head = ["estimator", "rtol = atol", "solver NFE", "wall s", "mean |err| (nats)", "max |err| (nats)"]
    head += [f"mean |err| ({unit})", f"max |err| ({unit})"] if both else []
    head += [f"reported MC stderr ({unit})"]
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.estimator, f"{r.rtol:g}", str(r.nfe), f"{r.wall_s:.1f}", f"{r.mean_abs_err_nats:.2e}", f"{r.max_abs_err_nats:.2e}"]
        cells += [f"{r.mean_abs_err_unit:.2e}", f"{r.max_abs_err_unit:.2e}"] if both else []
        cells += ["-" if math.isnan(r.mean_mc_stderr_unit) else f"{r.mean_mc_stderr_unit:.2e}"]
        lines.append("| " + " | ".join(cells) + " |")
    tight = min(r.rtol for r in rows)
    lines += ["", f"Errors are per test point against the exact trace at rtol = atol = {tight:g} (dopri5, float64); "
              "its own row shows its cost. NFE: the solver's field evaluations per batch."]
    return "\n".join(lines) + "\n"
