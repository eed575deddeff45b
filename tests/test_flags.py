"""The flag rules of likelihood rows (bench/flags.py), each on both sides of its boundary."""

from __future__ import annotations

import math

import pytest

from bench.flags import (
    INVALID_SIGMAS,
    OPTIMISTIC_SIGMAS,
    OPTIMISTIC_TOL_BPD,
    below_entropy,
    is_optimistic,
    nll_flag,
    optimistic_tolerance,
)

EPS = 1e-9


def test_optimistic_tolerance_is_one_number_in_bits_per_dimension():
    assert optimistic_tolerance("bpd", 3072) == OPTIMISTIC_TOL_BPD == 0.01
    assert optimistic_tolerance("nats", 2) == pytest.approx(0.01 * 2 * math.log(2))  # 0.01386 nats in 2D
    assert optimistic_tolerance("nats", 64) == pytest.approx(0.01 * 64 * math.log(2))
    with pytest.raises(ValueError, match="unit"):
        optimistic_tolerance("bits", 2)


@pytest.mark.parametrize("unit, dims", [("nats", 2), ("bpd", 64)])
@pytest.mark.parametrize("se", [0.0, 0.004])
def test_optimistic_boundary_is_three_paired_standard_errors_plus_the_tolerance(unit, dims, se):
    limit = -(OPTIMISTIC_SIGMAS * se + optimistic_tolerance(unit, dims))
    assert is_optimistic(limit - EPS, se, unit, dims)
    assert not is_optimistic(limit + EPS, se, unit, dims)
    assert not is_optimistic(abs(limit) + 1.0, se, unit, dims)  # pessimistic estimates are not flagged
    assert not is_optimistic(math.nan, se, unit, dims)


def test_optimistic_without_a_standard_error_uses_the_tolerance_alone():
    assert is_optimistic(-0.011, math.nan, "bpd", 64) and not is_optimistic(-0.009, math.nan, "bpd", 64)


@pytest.mark.parametrize("entropy_se", [0.0, 0.01])
def test_invalid_boundary_below_the_true_entropy(entropy_se):
    se = 0.02
    limit = 3.466 - INVALID_SIGMAS * math.hypot(se, entropy_se)
    assert below_entropy(limit - EPS, se, 3.466, entropy_se, "nats")
    assert not below_entropy(limit + EPS, se, 3.466, entropy_se, "nats")


def test_invalid_without_entropy_only_for_negative_bits_per_dim():
    assert below_entropy(-EPS, 0.01, None, 0.0, "bpd") and not below_entropy(0.0, 0.01, None, 0.0, "bpd")
    assert not below_entropy(-5.0, 0.01, None, 0.0, "nats")  # an unknown entropy in nats: no floor


def test_flag_precedence_nonfinite_invalid_optimistic():
    kw = dict(unit="nats", num_dims=2, entropy=3.466, entropy_stderr=0.0)
    assert nll_flag(math.nan, 0.01, **kw, gap=-1.0, gap_stderr=0.0) == "nonfinite"
    assert nll_flag(math.inf, 0.01, **kw) == "nonfinite"
    assert nll_flag(3.0, 0.01, **kw, gap=-1.0, gap_stderr=0.0) == "invalid"  # both rules hold: invalid wins
    assert nll_flag(3.5, 0.01, **kw, gap=-1.0, gap_stderr=0.0) == "optimistic"
    assert nll_flag(3.5, 0.01, **kw, gap=+1.0, gap_stderr=0.0) == ""
    assert nll_flag(3.5, 0.01, **kw) == ""  # references carry no gap: never optimistic
