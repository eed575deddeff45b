"""The Python evaluation API (bench.evaluate) on analytic flow maps with closed-form answers:
likelihood rows equal the closed form, flags follow the paired gap, the gap splits exactly into
its map and head parts, metric groups compute only what they name, and the total mass of a few-step
density is measured."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import bench
from bench.datasets import Dataset, Entropy
from f2d2.analytic import GaussianFlowMapNet, gaussian_flow_map

MEAN, STD, SIGMA_0 = torch.tensor([0.5, -1.0], dtype=torch.float64), 0.7, 1.0
SMALL = {"num_test": 400, "num_samples": 300, "batch_size": 400, "num_repeats": 1, "rtol": 1e-8, "atol": 1e-8}


class Gaussian2D(Dataset):
    """Data N(MEAN, STD^2 I): the analytic flow map's data, with its exact entropy."""

    name = "gaussian-2d"
    data_shape = (2,)
    sigma_0 = SIGMA_0
    kappa = 1.0

    def sample(self, num: int, generator: torch.Generator) -> torch.Tensor:
        return MEAN + STD * torch.randn(num, 2, generator=generator, dtype=torch.float64)

    def entropy(self) -> Entropy:
        return Entropy(math.log(2 * math.pi * math.e * STD**2), 0.0)


def closed_form_nll(x: torch.Tensor) -> torch.Tensor:
    return -GaussianFlowMapNet(MEAN, STD, SIGMA_0).log_prob(x, torch.ones(len(x), dtype=x.dtype))


def evaluate(model, **kw) -> pd.DataFrame:
    return bench.evaluate(model, dataset=Gaussian2D(), nfe=(1, 2, 4), eval=SMALL, **kw)


def row(frame: pd.DataFrame, k: int, metric: str) -> pd.Series:
    rows = frame[(frame.nfe == k) & (frame.metric == metric)]
    assert len(rows) == 1, (k, metric, sorted(set(frame.metric)))
    return rows.iloc[0]


@pytest.fixture(scope="module")
def exact_frame() -> pd.DataFrame:
    return evaluate(gaussian_flow_map(MEAN, STD, SIGMA_0), metrics=["nll", "calibration"])


def test_analytic_gaussian_through_the_api_gives_its_closed_form_nll(exact_frame):
    truth = closed_form_nll(Gaussian2D().test_set(SMALL["num_test"]))
    for k in (1, 2, 4):
        for metric in ("nll_nats", "nll_ref_nats"):
            got = row(exact_frame, k, metric)
            assert got.value == pytest.approx(truth.mean().item(), abs=1e-6), (k, metric)
            assert got.stderr == pytest.approx((truth.std() / math.sqrt(len(truth))).item(), rel=1e-3)
            assert got.flag == ""
        assert abs(row(exact_frame, k, "nll_gap_nats").value) < 1e-6
        assert row(exact_frame, k, "nll_nats").estimator == "f2d2-trained"
        assert row(exact_frame, k, "entropy_nats").value == pytest.approx(Gaussian2D().entropy().nats)
    assert set(exact_frame.method) == {"analytic-gaussian"}  # the row name comes from model.meta


def test_calibration_of_an_exact_estimator_is_perfect_and_its_floor_is_exact(exact_frame):
    for k in (1, 2, 4):
        assert row(exact_frame, k, "calib_mae_nats").value < 1e-6
        assert row(exact_frame, k, "calib_within").value == 1.0
        assert row(exact_frame, k, "calib_spearman").value == pytest.approx(1.0)
        assert row(exact_frame, k, "calib_floor_mae_nats").value == 0.0  # exact-trace reference
        assert row(exact_frame, k, "calib_floor_within").value == 1.0


def test_an_under_predicting_head_is_flagged_optimistic_and_an_over_predicting_one_is_not():
    # div_error adds d (1 + s - t) to D: zero on the single jump 1 -> 0, nonzero on shorter jumps
    low = evaluate(gaussian_flow_map(MEAN, STD, SIGMA_0, div_error=-0.05), metrics=["nll"])
    high = evaluate(gaussian_flow_map(MEAN, STD, SIGMA_0, div_error=+0.05), metrics=["nll"])
    assert row(low, 1, "nll_nats").flag == "" and row(high, 1, "nll_nats").flag == ""
    for k in (2, 4):
        gap = row(low, k, "nll_gap_nats").value
        # K jumps of length 1/K below the data end: sum_k h kappa (d (1 - h)) = d (1 - 1/K)
        assert gap == pytest.approx(-0.05 * (1 - 1 / k), abs=1e-6)
        assert row(low, k, "nll_nats").flag == "optimistic"
        assert row(high, k, "nll_gap_nats").value == pytest.approx(+0.05 * (1 - 1 / k), abs=1e-6)
        assert row(high, k, "nll_nats").flag == ""
        assert row(low, k, "nll_ref_nats").flag == ""  # the reference is the model's own exact NLL


def test_the_gap_splits_exactly_into_where_the_map_lands_and_what_the_head_adds():
    wrong_map = evaluate(gaussian_flow_map(MEAN, STD, SIGMA_0, velocity_error=0.05), metrics=["nll"])
    wrong_head = evaluate(gaussian_flow_map(MEAN, STD, SIGMA_0, div_error=-0.05), metrics=["nll"])
    for frame in (wrong_map, wrong_head):
        for k in (1, 2, 4):
            parts = row(frame, k, "nll_gap_map_nats").value + row(frame, k, "nll_gap_head_nats").value
            assert parts == pytest.approx(row(frame, k, "nll_gap_nats").value, abs=1e-12)
    for k in (1, 2, 4):
        assert abs(row(wrong_map, k, "nll_gap_map_nats").value) > 1e-3  # the map lands elsewhere
        assert abs(row(wrong_head, k, "nll_gap_map_nats").value) < 1e-6  # the map is exact: all of it is the head
    assert abs(row(wrong_head, 2, "nll_gap_head_nats").value) > 1e-3


@pytest.mark.parametrize("group, expected", [
    ("quality", {"energy_distance"}),  # no likelihood, no timing, no reference solve
    ("timing", {"nll_wall_s", "ref_wall_s", "nll_speedup", "sample_wall_s"}),
    ("mass", {"mass"}),
    ("calibration", {"calib_mae_nats", "calib_spearman", "calib_within", "calib_floor_mae_nats", "calib_floor_spearman", "calib_floor_within"}),
])
def test_metric_groups_compute_only_what_they_name(group, expected):
    from bench.config import metric_group

    frame = evaluate(gaussian_flow_map(MEAN, STD, SIGMA_0), metrics=[group])
    assert set(frame.metric) == expected
    assert {metric_group(m) for m in frame.metric} == {group}  # what `check` uses to tell "not measured"


def test_nll_group_rows_belong_to_it(exact_frame):
    from bench.config import metric_group

    nll = exact_frame[~exact_frame.metric.str.startswith("calib_")]
    assert {metric_group(m) for m in nll.metric} == {"nll"}
    with pytest.raises(bench.ConfigError, match="unknown metric group"):
        evaluate(gaussian_flow_map(MEAN, STD, SIGMA_0), metrics=["fid"])


def test_mass_of_an_exact_few_step_density_is_one_and_a_wrong_head_changes_it():
    exact = evaluate(gaussian_flow_map(MEAN, STD, SIGMA_0), metrics=["mass"])
    wrong = evaluate(gaussian_flow_map(MEAN, STD, SIGMA_0, div_error=-0.05), metrics=["mass"])
    for k in (1, 2, 4):
        assert row(exact, k, "mass").value == pytest.approx(1.0, abs=1e-4)  # grid quadrature of a Gaussian
        # a constant error e of the log-density multiplies the mass by exp(e)
        expected = math.exp(0.05 * (1 - 1 / k))
        assert row(wrong, k, "mass").value == pytest.approx(expected, rel=1e-4)


def test_per_point_nlls_are_returned_for_figures(exact_frame):
    arrays: dict = {}
    bench.evaluate(gaussian_flow_map(MEAN, STD, SIGMA_0), dataset=Gaussian2D(), nfe=(1,), eval=SMALL, metrics=["nll"], per_point=arrays)
    truth = closed_form_nll(Gaussian2D().test_set(SMALL["num_test"]))
    torch.testing.assert_close(arrays["nfe1"], truth, atol=1e-6, rtol=0)
    torch.testing.assert_close(arrays["ref"], truth, atol=1e-6, rtol=0)


def test_a_model_of_another_shape_is_refused():
    model = gaussian_flow_map(torch.zeros(3, dtype=torch.float64), STD, SIGMA_0)
    with pytest.raises(bench.ConfigError, match="data shape"):
        evaluate(model, metrics=["nll"])


def test_a_sweep_evaluates_models_from_user_loaders_under_their_own_row_names(tmp_path):
    """`--checkpoint NAME=package.module:loader`: no training (the teacher comes from a loader too),
    rows under NAME with the F2D2 estimator, the same numbers as bench.evaluate, nothing cached."""
    from typer.testing import CliRunner

    from bench.cli import app

    out = tmp_path / "out"
    args = ["sweep", "--dataset", "checkerboard", "--nfe", "1,2", "--metrics", "nll", "--num-test", "200", "--out", str(out),
            "--checkpoint", "flow-matching=user_models:gaussian_teacher", "--checkpoint", "mine=user_models:gaussian_student", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    frame = pd.read_csv(out / "checkerboard" / "results.csv")
    assert set(frame.method) == {"flow-matching", "mine"}
    assert row(frame[frame.method == "mine"], 2, "nll_nats").estimator == "f2d2-trained"
    assert row(frame[frame.method == "mine"], 2, "nll_nats").flag == "optimistic"
    assert not (out / "checkpoints").exists() and not (out / "checkerboard" / "cells" / "mine.json").exists()
    import user_models

    direct = bench.evaluate(user_models.gaussian_student(), dataset="checkerboard", nfe=(1, 2), metrics=["nll"],
                            eval={"num_test": 200}, teacher=user_models.gaussian_teacher(), name="mine")
    for k in (1, 2):
        for metric in ("nll_nats", "nll_ref_nats", "nll_teacher_nats", "nll_gap_nats"):
            assert row(frame[frame.method == "mine"], k, metric).value == pytest.approx(row(direct, k, metric).value, rel=1e-12)


@pytest.mark.parametrize("spec, message", [
    ("user_models:not_a_flow_map", "must return an f2d2.model.FlowMap"),
    ("user_models:no_such_loader", "has no attribute 'no_such_loader'"),
    ("no_such_module_xyz:load", "cannot import module 'no_such_module_xyz'"),
])
def test_a_bad_loader_is_one_error_line(spec, message, tmp_path):
    from typer.testing import CliRunner

    from bench.cli import app

    result = CliRunner().invoke(app, ["sweep", "--checkpoint", f"mine={spec}", "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_map_part_of_a_gap_is_where_the_few_step_map_lands_with_its_sign():
    """nll_gap_map = -(log p_0(x_0 few-step) - log p_0(x_0 exact)), recomputed here from the two
    endpoints: a sign or endpoint mix-up in the sweep's split fails (their sum alone cannot see it)."""
    from f2d2.likelihood import Solver, few_step_log_prob, reference_log_prob

    model = gaussian_flow_map(MEAN, STD, SIGMA_0, velocity_error=0.05)
    frame = evaluate(model, metrics=["nll"])
    x = Gaussian2D().test_set(SMALL["num_test"])
    ref = reference_log_prob(model.velocity, x, prior_log_prob=model.prior_log_prob, solver=Solver("dopri5", 1e-8, 1e-8))
    for k in (1, 2, 4):
        few = few_step_log_prob(model, x, k)
        expected = -(model.prior_log_prob(few.x0) - model.prior_log_prob(ref.x0)).mean().item()
        assert row(frame, k, "nll_gap_map_nats").value == pytest.approx(expected, abs=1e-6)
        assert abs(expected) > 1e-3


class TinyImages(Dataset):
    """Image-shaped data with 16 levels (so NLLs are in bits/dim): 1 x 2 x 2 'images' in [-1, 1]."""

    name = "tiny-images"
    data_shape = (1, 2, 2)
    levels = 16
    sigma_0 = 1.0
    kappa = 1.0

    def sample(self, num: int, generator: torch.Generator) -> torch.Tensor:
        return (0.4 * torch.randn(num, 1, 2, 2, generator=generator, dtype=torch.float64)).clamp(-1, 1)


IMAGE_EVAL = {"num_test": 300, "batch_size": 100, "num_repeats": 1, "num_mass": 64, "rtol": 1e-7, "atol": 1e-7}


def test_image_mass_is_importance_sampled_from_the_exact_ode_density():
    """Exact few-step density: every weight p_hat / q is 1, so the mass is 1 with zero spread; a
    head error e on the log-density multiplies it by exp(e) (p_hat and q swapped would give exp(-e))."""
    mean = torch.zeros(1, 2, 2, dtype=torch.float64)
    exact = bench.evaluate(gaussian_flow_map(mean, 0.5, 1.0), dataset=TinyImages(), nfe=(1, 2), eval=IMAGE_EVAL, metrics=["mass"])
    wrong = bench.evaluate(gaussian_flow_map(mean, 0.5, 1.0, div_error=-0.05), dataset=TinyImages(), nfe=(1, 2), eval=IMAGE_EVAL, metrics=["mass"])
    for k in (1, 2):
        got = row(exact, k, "mass")
        assert got.value == pytest.approx(1.0, abs=1e-5) and got.stderr == pytest.approx(0.0, abs=1e-5)
        assert "importance sampling" in got.estimator and "ESS=64.0" in got.estimator and got.num_points == 64
        assert row(wrong, k, "mass").value == pytest.approx(math.exp(0.05 * (1 - 1 / k)), rel=1e-5)
    biased = bench.evaluate(gaussian_flow_map(mean, 0.5, 1.0), dataset=TinyImages(), nfe=(1,),
                            eval={**IMAGE_EVAL, "mass_estimator": "hutchinson:2"}, metrics=["mass"])
    assert "BIASED" in row(biased, 1, "mass").estimator


def test_calibration_floor_of_a_hutchinson_reference_in_bits_per_dim():
    """The exact few-step likelihood of the sinh flow against a 2-probe reference: its calibration
    error is all the reference's, and the floor (in bpd: nats / (D ln 2)) predicts it; with one
    probe the floor is unknown (NaN), never a perfect 0 / 1."""
    from bench.config import EvalConfig
    from bench.measure import reference
    from f2d2.analytic_sinh import sinh_flow_map

    model = sinh_flow_map((1, 2, 2)).double()
    cfg = {**IMAGE_EVAL, "reference_estimator": "hutchinson:2"}
    frame = bench.evaluate(model, dataset=TinyImages(), nfe=(1,), eval=cfg, metrics=["calibration"])
    x = TinyImages().test_set(300)
    ref = reference(model, x, EvalConfig(**cfg), torch.device("cpu"))
    scale = 1 / (4 * math.log(2))
    floor = row(frame, 1, "calib_floor_mae_bpd").value
    assert floor == pytest.approx(ref.mc_noise.abs().mean().item() * scale, rel=1e-9)
    assert row(frame, 1, "calib_mae_bpd").value == pytest.approx(floor, rel=0.25)  # same error law, another draw
    one = bench.evaluate(model, dataset=TinyImages(), nfe=(1,), eval={**IMAGE_EVAL, "reference_estimator": "hutchinson:1"},
                         metrics=["calibration"])
    assert math.isnan(row(one, 1, "calib_floor_mae_bpd").value) and "unknown with 1 probe" in row(one, 1, "calib_floor_within").estimator
