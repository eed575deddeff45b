"""Strict configuration parsing, NFE lists and stable cache keys."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from bench.config import (
    ConfigError,
    EvalConfig,
    SweepConfig,
    TrainConfig,
    apply_sweep_yaml,
    merge,
    parse_nfe,
    read_sweep_yaml,
    stable_hash,
    to_dict,
)
from bench.profiles import default_config


@pytest.mark.parametrize("text,expected", [("1,2,4,8", (1, 2, 4, 8)), (" 8 , 1 ", (8, 1)), ("3", (3,))])
def test_parse_nfe(text, expected):
    assert parse_nfe(text) == expected


@pytest.mark.parametrize(
    "text,match",
    [("0", ">= 1"), ("-1", ">= 1"), ("abc", "not an integer"), ("", "comma-separated"), ("1,1", "duplicated"), ("1,,2", "comma")],
)
def test_parse_nfe_errors(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_nfe(text)


def test_yaml_unknown_key_is_named(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("train:\n  stepz: 10\n")
    with pytest.raises(ConfigError, match="unknown key 'train.stepz'"):
        apply_sweep_yaml(str(path), read_sweep_yaml(str(path)), default_config("checkerboard"))


def test_yaml_wrong_type_is_named(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("train:\n  steps: ten\n")
    with pytest.raises(ConfigError, match="train.steps: expected int"):
        apply_sweep_yaml(str(path), read_sweep_yaml(str(path)), default_config("checkerboard"))


def test_yaml_overrides_and_keeps_the_rest(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("nfe: [1, 3]\ntrain:\n  steps: 17\nmethod_options:\n  meanflow-f2d2:\n    divergence:\n      estimator: hutchinson:2\n")
    base = default_config("checkerboard")
    cfg = apply_sweep_yaml(str(path), read_sweep_yaml(str(path)), base)
    assert cfg.nfe == (1, 3) and cfg.train.steps == 17
    assert cfg.train.batch_size == base.train.batch_size
    assert cfg.method_options["meanflow-f2d2"]["divergence"]["estimator"] == "hutchinson:2"


def test_invalid_values_raise_config_errors():
    with pytest.raises(ConfigError, match="train.steps"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="eval.backward"):
        EvalConfig(backward="sideways")
    with pytest.raises(ConfigError, match="duplicates"):
        SweepConfig(methods=("meanflow", "meanflow"))
    with pytest.raises(ConfigError, match="expected a number"):
        merge(TrainConfig(), {"lr": "fast"})


def test_stable_hash_depends_on_values_only():
    a, b = TrainConfig(steps=5), TrainConfig(steps=5)
    assert stable_hash(a) == stable_hash(b)
    assert stable_hash(a) != stable_hash(TrainConfig(steps=6))
    assert to_dict(a)["steps"] == 5


def test_method_config_parses_estimator_strings():
    from baselines import METHODS
    from f2d2.divergence import Hutchinson

    spec = METHODS["meanflow-f2d2"]
    cfg = merge(spec.config, {"divergence": {"estimator": "gaussian:3", "target": "teacher"}})
    assert cfg.divergence.estimator == Hutchinson(3, "gaussian")
    assert to_dict(cfg)["divergence"]["estimator"] == "gaussian:3"
    with pytest.raises(ConfigError, match="divergence.estimator"):
        merge(spec.config, {"divergence": {"estimator": "magic"}})
    with pytest.raises(ConfigError, match="divergence"):
        merge(spec.config, {"divergence": {"target": "oracle"}})


def test_an_option_added_later_keeps_old_cache_keys_while_at_its_default():
    from bench.config import key_dict

    @dataclasses.dataclass(frozen=True)
    class Before:
        steps: int = 5

    @dataclasses.dataclass(frozen=True)
    class After:
        KEY_OMITS_DEFAULT: typing.ClassVar[tuple[str, ...]] = ("precision",)
        steps: int = 5
        precision: str = "fp32"

    assert stable_hash(After()) == stable_hash(Before())
    assert stable_hash(After(precision="bf16")) != stable_hash(Before())
    assert key_dict(After(precision="bf16")) == {"steps": 5, "precision": "bf16"}
    assert to_dict(After()) == {"steps": 5, "precision": "fp32"}  # the resolved config still shows it


KNOWN_TEACHER_KEY = "543355e7c86f"  # results/checkpoints/checkerboard/flow-matching-543355e7c86f


def test_committed_checkpoint_keys_are_stable():
    """The cache key of the default checkerboard teacher: a change here silently retrains every model
    (and orphans every cached checkpoint), so it must be deliberate (bump CACHE_VERSION)."""
    from baselines import get_method
    from bench.jobs import Job
    from bench.profiles import default_config

    cfg = default_config("checkerboard")
    job = Job("flow-matching", get_method("flow-matching").config, cfg.model, cfg.teacher_train, "checkerboard",
              None, 10.0, 2.31, None, "/nonexistent")
    assert job.key == KNOWN_TEACHER_KEY


@pytest.mark.parametrize("metric, method, group", [
    ("nll_bpd", "m", "nll"), ("nll_gap_map_nats", "m", "nll"), ("nll_first_order_bpd", "m", "nll"), ("entropy_nats", "m", "nll"),
    ("ref_nfe", "m", "nll"), ("ref_mc_stderr_bpd", "m", "nll"), ("calib_floor_within", "m", "calibration"),
    ("calib_mae_nats", "m", "calibration"), ("nll_wall_s", "m", "timing"), ("ref_wall_s", "m", "timing"),
    ("nll_speedup", "m", "timing"), ("sample_wall_s", "m", "timing"), ("mass", "m", "mass"), ("fid", "m", "quality"),
    ("fd_digits", "m", "quality"), ("energy_distance", "m", "quality"), ("support_share", "m", "quality"),
    ("network_calls_forward", "m", "guidance"), ("fd_digits", "m+guided@0.1", "guidance"),
])
def test_every_metric_belongs_to_the_group_that_writes_it(metric, method, group):
    from bench.config import metric_group

    assert metric_group(metric, method) == group
