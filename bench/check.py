"""Regression tracking: compare two result sets metric by metric with per-metric tolerances.

A row of NEW regresses against the same (dataset, method, nfe, metric) row of BASELINE when it moved
in the direction that counts as worse by more than its tolerance,
    tol = max(abs, rel * |baseline|, sigmas * sqrt(stderr_new^2 + stderr_baseline^2)),
or when it became flagged (invalid, nonfinite), or disappeared. Rules match metric names with shell
patterns, first match wins; rules with ``gate: false`` (wall-clock, which depends on the machine)
are reported but never fail the check.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import pandas as pd

from bench.config import ConfigError, from_dict


@dataclass(frozen=True)
class Rule:
    """Tolerance of one metric pattern.

    Attributes:
        pattern: shell pattern on the metric name, e.g. 'nll_*'.
        worse: 'higher', 'lower', 'both' (any move beyond tolerance) or 'abs' (|value| grew).
        abs, rel, sigmas: the three tolerances, the largest applies.
        gate: whether a regression fails the check.
    """

    pattern: str
    worse: str = "both"
    abs: float = 0.0
    rel: float = 0.0
    sigmas: float = 3.0
    gate: bool = True

    def __post_init__(self) -> None:
        if self.worse not in ("higher", "lower", "both", "abs"):
            raise ConfigError(f"rule {self.pattern!r}: worse must be higher, lower, both or abs, got {self.worse!r}")


DEFAULT_RULES = (
    Rule("ref_nfe", worse="higher", rel=0.5, gate=False),
    Rule("*_wall_s", worse="higher", rel=1.0, sigmas=0.0, gate=False),
    Rule("nll_speedup", worse="lower", rel=0.5, sigmas=0.0, gate=False),
    Rule("network_calls_*", worse="higher", abs=0.0, sigmas=0.0),
    Rule("nll_gap_*", worse="abs", abs=0.05),
    Rule("nll_*", worse="both", abs=0.05),
    Rule("entropy_*", worse="both", abs=1e-6, sigmas=0.0),
    Rule("energy_distance", worse="higher", abs=0.01),
    Rule("support_share", worse="lower", abs=0.02),
    Rule("fd_*", worse="higher", rel=0.10),
    Rule("fid", worse="higher", rel=0.10),
    Rule("calib_mae_*", worse="higher", abs=0.05),
    Rule("calib_*", worse="lower", abs=0.05),
    Rule("*", worse="both", rel=0.10),
)

KEY = ["dataset", "method", "nfe", "metric"]


def load_rules(path: str | None) -> tuple[Rule, ...]:
    """Rules from a YAML list of mappings (each a :class:`Rule`), before the defaults."""
    if path is None:
        return DEFAULT_RULES
    import yaml

    with open(path) as handle:
        data = yaml.safe_load(handle) or []
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a list of rules")
    return tuple(from_dict(Rule, item, f"{path}[{i}]") for i, item in enumerate(data)) + DEFAULT_RULES


def rule_for(metric: str, rules: tuple[Rule, ...]) -> Rule:
    return next(rule for rule in rules if fnmatch.fnmatchcase(metric, rule.pattern))


def _finite(x: float) -> float:
    return x if isinstance(x, float) and math.isfinite(x) else 0.0


def judge(new: float, old: float, se_new: float, se_old: float, rule: Rule) -> tuple[float, float, bool]:
    """(delta, tolerance, regressed) for one metric."""
    if not math.isfinite(new) and math.isfinite(old):
        return math.nan, math.nan, True
    delta = new - old
    tol = max(rule.abs, rule.rel * abs(old), rule.sigmas * math.hypot(_finite(se_new), _finite(se_old)))
    if rule.worse == "higher":
        bad = delta > tol
    elif rule.worse == "lower":
        bad = -delta > tol
    elif rule.worse == "abs":
        bad = abs(new) - abs(old) > tol
    else:
        bad = abs(delta) > tol
    return delta, tol, bool(bad)


def compare(new: pd.DataFrame, old: pd.DataFrame, rules: tuple[Rule, ...] = DEFAULT_RULES) -> pd.DataFrame:
    """One row per baseline metric: values, delta, tolerance and a status
    ('ok', 'regressed', 'flagged', 'missing', 'info' for ungated moves, 'new' for rows only in NEW)."""
    merged = old.merge(new, on=KEY, how="outer", suffixes=("_old", "_new"), indicator="presence")
    records = []
    for r in merged.itertuples(index=False):
        rule = rule_for(r.metric, rules)
        record = {k: getattr(r, k) for k in KEY} | {"old": r.value_old, "new": r.value_new, "delta": math.nan, "tol": math.nan}
        if r.presence == "left_only":
            record["status"] = "missing" if rule.gate else "info"
        elif r.presence == "right_only":
            record["status"] = "new"
        else:
            delta, tol, bad = judge(r.value_new, r.value_old, r.stderr_new, r.stderr_old, rule)
            flagged = str(r.flag_new or "") not in ("", "nan") and str(r.flag_old or "") in ("", "nan")
            record |= {"delta": delta, "tol": tol}
            record["status"] = "flagged" if flagged and rule.gate else ("regressed" if bad else "ok")
            if not rule.gate and record["status"] != "ok":
                record["status"] = "info"
        records.append(record)
    return pd.DataFrame(records)


def failed(report: pd.DataFrame) -> pd.DataFrame:
    return report[report["status"].isin(["regressed", "flagged", "missing"])]
