"""Flags on likelihood rows: values a reader must not take at face value (METHOD.md Sec. 4).

- ``nonfinite``: the mean NLL is NaN or infinite (reported as NaN, never averaged away).
- ``invalid``: an NLL below the true entropy of the data by more than INVALID_SIGMAS standard errors
  (known for the 2D toy densities), or a negative bits/dim. No model can do better than the truth,
  so such a number cannot be the likelihood of any model: the paper greys these cells.
- ``optimistic``: a few-step NLL below the exact-ODE NLL of the SAME model by more than
  OPTIMISTIC_SIGMAS paired standard errors plus a tolerance of OPTIMISTIC_TOL_BPD bits per
  dimension. F2D2's claim is that a model's few-step NLL matches that model's exact NLL, so an
  estimate that is significantly lower flatters the model (e.g. a backward map that under-expands,
  or a divergence head that under-predicts); a worse model with an optimistic estimator can land
  near the teacher's NLL by accident. It is judged on every dataset, with or without a known
  entropy, and optimistic values are never ranked best.

Precedence when several apply: nonfinite, then invalid, then optimistic (the flag column holds one).
"""

from __future__ import annotations

import math

INVALID_SIGMAS = 3.0  # an NLL this many standard errors below the true entropy is invalid
OPTIMISTIC_SIGMAS = 3.0  # paired standard errors of the gap to the model's own exact NLL
# Tolerance of the optimistic rule, in bits per dimension for every dataset (0.0139 nats on 2D
# data): the precision at which the paper reports BPD, and far above the error of our exact
# references (README.md, "Reference accuracy").
OPTIMISTIC_TOL_BPD = 0.01

NONFINITE, INVALID, OPTIMISTIC = "nonfinite", "invalid", "optimistic"
FLAGS = (NONFINITE, INVALID, OPTIMISTIC)


def optimistic_tolerance(unit: str, num_dims: int) -> float:
    """OPTIMISTIC_TOL_BPD in the NLL's unit: bits/dim as is, nats as bits/dim x D ln 2."""
    if unit == "bpd":
        return OPTIMISTIC_TOL_BPD
    if unit == "nats":
        return OPTIMISTIC_TOL_BPD * num_dims * math.log(2.0)
    raise ValueError(f"unit must be 'bpd' or 'nats', got {unit!r}")


def below_entropy(mean: float, stderr: float, entropy: float | None, entropy_stderr: float, unit: str) -> bool:
    """The 'invalid' rule: below the true entropy by > INVALID_SIGMAS combined standard errors, or a
    negative bits/dim. ``entropy`` (None if unknown) and all values are in ``unit``."""
    if entropy is not None:
        se = math.hypot(stderr if math.isfinite(stderr) else 0.0, entropy_stderr)
        return mean < entropy - INVALID_SIGMAS * se
    return unit == "bpd" and mean < 0


def is_optimistic(gap: float, gap_stderr: float, unit: str, num_dims: int) -> bool:
    """The 'optimistic' rule on the paired gap (few-step NLL minus own exact NLL, in ``unit``):
    gap < -(OPTIMISTIC_SIGMAS x gap_stderr + tolerance). A gap without a finite standard error
    (one point) is judged against the tolerance alone."""
    if not math.isfinite(gap):
        return False
    se = gap_stderr if math.isfinite(gap_stderr) else 0.0
    return gap < -(OPTIMISTIC_SIGMAS * se + optimistic_tolerance(unit, num_dims))


def nll_flag(
    mean: float,
    stderr: float,
    *,
    unit: str,
    num_dims: int,
    entropy: float | None = None,
    entropy_stderr: float = 0.0,
    gap: float | None = None,
    gap_stderr: float = math.nan,
) -> str:
    """The flag of one NLL row: '' or one of FLAGS, by precedence. ``gap``/``gap_stderr`` (the
    paired gap to the model's own exact NLL) are given for few-step estimates only."""
    if not math.isfinite(mean):
        return NONFINITE
    if below_entropy(mean, stderr, entropy, entropy_stderr, unit):
        return INVALID
    if gap is not None and is_optimistic(gap, gap_stderr, unit, num_dims):
        return OPTIMISTIC
    return ""
