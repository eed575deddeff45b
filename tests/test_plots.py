"""Figures of issue 6: the numbers behind them (grid masses, calibration statistics, step choice,
curve grouping) against hand arithmetic and closed forms, and that every figure is written whole."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from bench.datasets import EightGaussians
from bench.metrics import calibration_stats
from bench.plots import (
    calibration_scatter,
    density_figure,
    density_summary,
    grid_densities,
    nll_unit,
    nll_vs_nfe,
    pick_step,
    quality_curves,
    quality_vs_nfe,
    training_curves,
)
from f2d2.analytic import GaussianFlowMapNet, gaussian_flow_map
from f2d2.model import Capabilities, FlowMap

MEAN, STD, SIGMA_0, KAPPA = (1.0, -0.5), 0.7, 1.2, 2.0
NFE = (1, 2, 4, 8)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU timings run beside the suite
    yield
    torch.set_num_threads(previous)


class GaussianData:
    """Stand-in dataset: N(MEAN, STD^2 I), the data the analytic flow map transports to."""

    name = "gaussian"
    data_shape = (2,)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        sq = (x - torch.tensor(MEAN, dtype=x.dtype)).pow(2).sum(1)
        return -0.5 * sq / STD**2 - math.log(2 * math.pi * STD**2)

    def sample(self, num: int, generator: torch.Generator) -> torch.Tensor:
        return torch.tensor(MEAN, dtype=torch.float64) + STD * torch.randn(num, 2, generator=generator, dtype=torch.float64)


class NoDensity(GaussianData):
    def log_prob(self, x: torch.Tensor) -> None:
        return None


def analytic(**errors) -> FlowMap:
    return gaussian_flow_map(torch.tensor(MEAN, dtype=torch.float64), STD, SIGMA_0, KAPPA, **errors)


def assert_written(paths, stem):
    if paths[-1].suffix == ".json":  # density figures: their numbers beside them
        assert json.loads(paths[-1].read_text())["panels"]
        paths = paths[:-1]
    assert paths == [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")]
    png, pdf = (p.read_bytes() for p in paths)
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert pdf.startswith(b"%PDF") and len(pdf) > 1000
    assert not list(stem.parent.glob("*.tmp")), "atomic writes leave no temporary files"


# 1. Densities -------------------------------------------------------------------------------


def test_analytic_few_step_density_has_unit_mass_and_matches_the_truth_for_every_k():
    grid = grid_densities(analytic(), GaussianData(), NFE, grid_size=200)
    assert [p.label for p in grid.model] == [f"K = {k}: F2D2 density" for k in NFE]
    assert grid.true.mass == pytest.approx(1.0, abs=1e-3)
    for panel in grid.model:
        assert panel.mass == pytest.approx(1.0, rel=0.01)
        # the analytic map is exact at any K, so its density is the data's, cell for cell
        np.testing.assert_allclose(panel.density, grid.true.density, rtol=0, atol=1e-6)
    # orientation: the peak sits at the mean (x on columns, y on rows), within one cell of 0.045
    centres = np.linspace(-4.5, 4.5, 201)[:-1] + 0.0225
    row, col = np.unravel_index(grid.model[0].density.argmax(), (200, 200))
    assert abs(centres[col] - MEAN[0]) < 0.05 and abs(centres[row] - MEAN[1]) < 0.05


def test_mass_check_sees_a_wrong_divergence_head():
    # D off by e (1 + s - t): the backward sum gains kappa e (1 - 1/K), so the mass is exp(-kappa e (1 - 1/K))
    e = 0.5
    grid = grid_densities(analytic(div_error=e), GaussianData(), NFE, grid_size=120)
    for k, panel in zip(NFE, grid.model):
        assert panel.mass == pytest.approx(math.exp(-KAPPA * e * (1 - 1 / k)), rel=0.01)
    assert grid.model[-1].mass < 0.5


def test_density_summary_l1_and_support_against_closed_forms():
    # exact map: the model density is the truth cell for cell; a head off by e scales it by
    # c = exp(-kappa e (1 - 1/K)), so L1 = (1 - c) x true mass
    exact = density_summary(grid_densities(analytic(), GaussianData(), NFE, grid_size=120))
    assert [p["l1_to_true"] for p in exact["panels"]] == pytest.approx([0.0] * 4, abs=1e-4)
    e = 0.3
    grid = grid_densities(analytic(div_error=e), GaussianData(), NFE, grid_size=120)
    summary = density_summary(grid)
    for k, panel in zip(NFE, summary["panels"]):
        c = math.exp(-KAPPA * e * (1 - 1 / k))
        assert panel["l1_to_true"] == pytest.approx((1 - c) * grid.true.mass, rel=1e-3, abs=1e-6)
        assert "mass_in_support" not in panel  # the Gaussian is positive on every cell
        assert panel["label"] == f"K = {k}: F2D2 density"
    assert summary["grid_size"] == 120 and summary["true_mass"] == pytest.approx(1.0, abs=1e-3)


def test_mass_in_support_excludes_cells_the_truth_rules_out():
    class HalfPlane(GaussianData):  # the Gaussian cut to x > 1 (unnormalised: only the support matters)
        def log_prob(self, x):
            return torch.where(x[:, 0] > 1.0, super().log_prob(x), torch.full_like(x[:, 0], -math.inf))

    summary = density_summary(grid_densities(analytic(), HalfPlane(), (1,), grid_size=200))
    panel = summary["panels"][0]
    # the model is N(m, s^2 I): its mass at x > 1 = mean is one half
    assert panel["mass_in_support"] == pytest.approx(0.5 * panel["mass"], abs=0.01)


def test_model_without_divergence_head_shows_its_exact_ode_density(tmp_path):
    net = GaussianFlowMapNet(torch.tensor(MEAN, dtype=torch.float64), STD, SIGMA_0, KAPPA)
    model = FlowMap(net, Capabilities(flow_map=True, divergence_head=False), kappa=KAPPA, sigma_0=SIGMA_0)
    grid = grid_densities(model, GaussianData(), NFE, grid_size=36)
    assert len(grid.model) == 1 and "no divergence head" in grid.model[0].label
    assert grid.model[0].mass == pytest.approx(1.0, rel=0.01)
    np.testing.assert_allclose(grid.model[0].density, grid.true.density, rtol=0, atol=1e-4)
    stem = tmp_path / "density_nohead"
    assert_written(density_figure(model, GaussianData(), stem, nfe=(1, 2), grid_size=24, num_samples=200), stem)


def test_density_figure_writes_png_and_pdf(tmp_path):
    stem = tmp_path / "figs" / "density_gaussian"
    paths = density_figure(analytic(), GaussianData(), stem, nfe=(1, 2, 4), grid_size=60, num_samples=500, seed=3)
    assert_written(paths, stem)


def test_true_density_of_eight_gaussians_has_unit_mass_on_the_default_grid():
    grid = grid_densities(analytic(), EightGaussians(), (1,), grid_size=200)
    assert grid.true.mass == pytest.approx(1.0, abs=1e-3)


def test_density_figure_without_exact_density_leaves_that_panel_empty(tmp_path):
    grid = grid_densities(analytic(), NoDensity(), (1,), grid_size=80)
    assert grid.true is None and grid.model[0].mass == pytest.approx(1.0, rel=0.01)
    stem = tmp_path / "density_unknown"
    assert_written(density_figure(analytic(), NoDensity(), stem, nfe=(1,), grid_size=30, num_samples=300), stem)
    with pytest.raises(ValueError, match="2D"):
        density_figure(gaussian_flow_map(torch.zeros(3), 1.0, 1.0), NoDensity(), tmp_path / "x", nfe=(1,))


# 4. Calibration statistics ------------------------------------------------------------------


def test_calibration_stats_hand_arithmetic():
    few = np.array([1.0, 2.0, 3.5, 4.0])
    ref = np.array([1.05, 2.5, 3.5, 3.0])  # |errors| 0.05, 0.5, 0, 1.0; ref ranks 1, 2, 4, 3
    stats = calibration_stats(few, ref, "nats")
    assert set(stats) == {"mae", "spearman", "within"}
    assert stats["mae"] == pytest.approx(1.55 / 4)
    assert stats["spearman"] == pytest.approx(1 - 6 * 2 / (4 * 15))  # no ties: 1 - 6 sum d^2 / (n (n^2 - 1))
    assert stats["within"] == pytest.approx(0.5)
    assert calibration_stats(few, ref, "bpd")["within"] == pytest.approx(0.25)


def test_calibration_spearman_monotone_reversed_and_ties():
    ref = np.random.default_rng(0).normal(size=200)
    assert calibration_stats(np.exp(ref) + 3, ref)["spearman"] == pytest.approx(1.0, abs=1e-12)
    assert calibration_stats(-(ref**3), ref)["spearman"] == pytest.approx(-1.0, abs=1e-12)
    # ties take average ranks: x ranks (1, 2.5, 2.5, 4), y ranks (1, 3, 2, 4) -> 4.5 / sqrt(4.5 * 5) = sqrt(0.9),
    # not the tie-blind 1 - 6 * 0.5 / 60 = 0.95
    tied = calibration_stats(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0, 4.0]))
    assert tied["spearman"] == pytest.approx(math.sqrt(0.9), abs=1e-12)


def test_calibration_spearman_matches_scipy_with_many_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    few, ref = rng.integers(0, 6, 300).astype(float), rng.integers(0, 4, 300) + 0.1 * rng.integers(0, 6, 300)
    expected = stats.spearmanr(few, ref).statistic
    assert calibration_stats(few, ref)["spearman"] == pytest.approx(expected, abs=1e-12)


def test_calibration_stats_edges():
    # the tolerance is inclusive: an error of exactly 0.1 nats counts, just above does not
    assert calibration_stats(np.array([0.1, 0.1000001]), np.zeros(2))["within"] == 0.5
    assert math.isnan(calibration_stats(np.ones(5), np.arange(5.0))["spearman"])  # constant: undefined
    nonfinite = calibration_stats(np.array([1.0, np.nan, 2.0]), np.array([1.0, 1.0, 2.0]))
    assert all(math.isnan(v) for v in nonfinite.values())
    with pytest.raises(ValueError):
        calibration_stats(np.ones(3), np.ones(4))
    with pytest.raises(ValueError):
        calibration_stats(np.ones(3), np.ones(3), "bits")


def test_calibration_scatter_writes_png_and_pdf(tmp_path):
    rng = np.random.default_rng(2)
    ref = rng.normal(3.5, 0.5, 100)
    per_sample = {
        "meanflow-f2d2": {1: (ref + rng.normal(0, 0.2, 100), ref), 4: (ref + 0.01, ref)},
        "flow-matching": {1: (ref - 5.0, ref)},  # a method lacking K = 4 gets an empty panel
    }
    stem = tmp_path / "calibration"
    assert_written(calibration_scatter(per_sample, stem), stem)


# 2-3. Curves against NFE --------------------------------------------------------------------


def results_frame(unit: str = "nats") -> pd.DataFrame:
    rows = []
    for k in NFE:
        rows += [
            ("checkerboard", "meanflow-f2d2", k, f"nll_{unit}", 3.6 + 0.1 / k, 0.02, ""),
            ("checkerboard", "meanflow-f2d2", k, f"nll_ref_{unit}", 3.55, 0.02, ""),
            ("checkerboard", "flow-matching", k, f"nll_{unit}", 3.4 - 8.0 / k, 0.05, "invalid" if k < 8 else ""),
            ("checkerboard", "flow-matching", k, f"nll_ref_{unit}", 3.52, 0.02, ""),
            ("checkerboard", "flow-matching", k, f"nll_teacher_{unit}", 3.52, 0.02, ""),
            ("checkerboard", "flow-matching", k, f"entropy_{unit}", math.log(32), 0.0, ""),
            ("checkerboard", "meanflow-f2d2", k, "energy_distance", 0.02 / k, 0.001, ""),
            ("checkerboard", "flow-matching", k, "energy_distance", 0.3 / k, 0.001, ""),
        ]
    rows.append(("checkerboard", "flow-matching", 3, f"nll_{unit}", math.nan, math.nan, "nonfinite"))
    return pd.DataFrame(rows, columns=["dataset", "method", "nfe", "metric", "value", "stderr", "flag"])


def test_nll_unit_prefers_bpd_and_a_frame_without_nll_is_an_error(tmp_path):
    assert nll_unit(results_frame("nats")) == "nats"
    assert nll_unit(results_frame("bpd")) == "bpd"
    quality_only = results_frame()[lambda f: f["metric"] == "energy_distance"]
    with pytest.raises(ValueError, match="no NLL metric"):
        nll_vs_nfe(quality_only, tmp_path / "nll")
    assert not list(tmp_path.iterdir()), "a rejected frame writes nothing"


@pytest.mark.parametrize("unit", ["nats", "bpd"])
def test_nll_vs_nfe_writes_png_and_pdf(tmp_path, unit):
    stem = tmp_path / f"nll_{unit}"
    assert_written(nll_vs_nfe(results_frame(unit), stem), stem)


def guided_frame() -> pd.DataFrame:
    rows = [("cifar10", "meanflow-f2d2", k, "fid", 10.0 / k, 0.1, math.nan) for k in NFE]
    rows += [("cifar10", "meanflow-f2d2+guided", k, "fid", 8.0 / k, 0.1, math.nan) for k in NFE]
    rows += [("cifar10", "meanflow-f2d2", k, "fid", 7.0 / k, 0.1, eta) for k in NFE for eta in (0.05, 0.1)]
    rows += [("cifar10", "flow-matching", k, "fid", 50.0 / k, 0.1, math.nan) for k in (*NFE, 200)]
    rows += [("cifar10", "flow-matching", k, "energy_distance", 0.1, 0.0, math.nan) for k in NFE]
    return pd.DataFrame(rows, columns=["dataset", "method", "nfe", "metric", "value", "stderr", "eta"])


def test_quality_curves_split_guided_rows_and_take_the_many_step_teacher_out():
    frame = guided_frame()
    curves, teacher = quality_curves(frame[frame["metric"] == "fid"])
    assert [(c.label, c.base, c.guided) for c in curves] == [
        ("meanflow-f2d2", "meanflow-f2d2", False),
        ("meanflow-f2d2 + guidance", "meanflow-f2d2", True),
        ("meanflow-f2d2 + guidance (eta = 0.05)", "meanflow-f2d2", True),
        ("meanflow-f2d2 + guidance (eta = 0.1)", "meanflow-f2d2", True),
        ("flow-matching", "flow-matching", False),
    ]
    assert all(sorted(c.rows["nfe"]) == list(NFE) for c in curves)  # the 200-step row left the curve
    assert (int(teacher["nfe"]), float(teacher["value"])) == (200, 0.25)


def test_quality_vs_nfe_picks_a_metric_and_writes_png_and_pdf(tmp_path):
    stem = tmp_path / "quality"
    assert_written(quality_vs_nfe(guided_frame(), stem), stem)
    stem2 = tmp_path / "quality_ed"
    assert_written(quality_vs_nfe(results_frame(), stem2, metric="energy_distance"), stem2)
    with pytest.raises(ValueError, match="fd_mnist"):
        quality_vs_nfe(guided_frame(), tmp_path / "q", metric="fd_mnist")
    with pytest.raises(ValueError):
        quality_vs_nfe(results_frame()[lambda f: f["metric"] == "nll_nats"], tmp_path / "q")


# 5. Training curves -------------------------------------------------------------------------


def history() -> list[dict]:
    records = [{"step": s, "loss": 10.0 / s, "num_skipped": 0} for s in range(1, 7)]
    gaps = {2: 0.5, 4: -0.3, 6: 0.1}  # the smallest |gap| is at step 6; the smallest value at step 4
    energy = {2: 0.03, 4: 0.01, 6: 0.02}
    share = {2: 0.8, 4: 0.9, 6: 0.95}
    for s in gaps:
        records.append({"step": s, "val_nll_gap_nats": gaps[s], "val_energy_distance": energy[s], "val_support_share": share[s]})
    return records


def test_pick_step_minimises_the_right_score():
    assert pick_step(history(), "val_nll_gap_nats") == 6
    assert pick_step(history(), "val_energy_distance") == 4
    assert pick_step(history(), "val_support_share") == 6
    assert pick_step(history(), "loss") == 6
    with pytest.raises(ValueError, match="val_fid"):
        pick_step(history(), "val_fid")


def test_training_curves_write_png_and_pdf(tmp_path):
    stem = tmp_path / "training"
    assert_written(training_curves(history(), stem, criterion="val_nll_gap_nats"), stem)
    stem2 = tmp_path / "training_given"
    assert_written(training_curves(history(), stem2, best_step=4), stem2)
    stem3 = tmp_path / "training_last"
    assert_written(training_curves(history(), stem3, criterion="last"), stem3)
    with pytest.raises(ValueError):
        training_curves([], tmp_path / "t")
    with pytest.raises(ValueError):
        training_curves(history(), tmp_path / "t", criterion="val_fid")
