"""Regression tracking: compare two result sets metric by metric with per-metric tolerances.

A row of NEW regresses against the same (dataset, method, nfe, metric) row of BASELINE when it moved
in the direction that counts as worse by more than its tolerance,
    tol = max(abs, rel * |baseline|, sigmas * sqrt(stderr_new^2 + stderr_baseline^2)),
or when it gained a flag (any non-empty flag: invalid, nonfinite, optimistic, ...), or disappeared.
A flag that went away ('invalid' in BASELINE, none in NEW) is a change, reported as 'unflagged'.
Which flag changes fail is the rule's ``flag_change``: 'gained' (the default: a flag that appears),
'regress' (also one that disappears) or 'report' (neither; for tolerances of training noise, which
flips flags of values near their threshold). Rules match metric names with shell patterns, first
match wins; a rule may also name a method pattern (``method``, default '*'), so that tolerances of
training noise can differ between methods (results/ci/rules.yaml). Rules with ``gate: false``
(wall-clock, which depends on the machine) are reported but never fail the check.

The verdict is also written as JUnit XML (one test case per metric row), JSON and Markdown
(:func:`junit_xml`, :func:`verdict_json`, :func:`summary_markdown`) for CI systems.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import pandas as pd

from bench.config import ConfigError, from_dict, metric_group

FLAG_CHANGES = ("gained", "regress", "report")
FAILING = ("regressed", "flagged", "missing")  # statuses that always fail the check


@dataclass(frozen=True)
class Rule:
    """Tolerance of one metric pattern.

    Attributes:
        pattern: shell pattern on the metric name, e.g. 'nll_*'.
        method: shell pattern on the method name (default '*': every method).
        worse: 'higher', 'lower', 'both' (any move beyond tolerance) or 'abs' (|value| grew).
        abs, rel, sigmas: the three tolerances, the largest applies.
        gate: whether a regression fails the check.
        flag_change: which flag changes fail: 'gained' (a flag appeared, status 'flagged'; one that
            disappeared, status 'unflagged', is reported), 'regress' (both) or 'report' (neither).
    """

    pattern: str
    method: str = "*"
    worse: str = "both"
    abs: float = 0.0
    rel: float = 0.0
    sigmas: float = 3.0
    gate: bool = True
    flag_change: str = "gained"

    def __post_init__(self) -> None:
        if self.worse not in ("higher", "lower", "both", "abs"):
            raise ConfigError(f"rule {self.pattern!r}: worse must be higher, lower, both or abs, got {self.worse!r}")
        if self.flag_change not in FLAG_CHANGES:
            raise ConfigError(f"rule {self.pattern!r}: flag_change must be one of {', '.join(FLAG_CHANGES)}, got {self.flag_change!r}")
        if min(self.abs, self.rel, self.sigmas) < 0:
            raise ConfigError(f"rule {self.pattern!r}: abs, rel and sigmas must be >= 0")


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
    Rule("fid*", worse="higher", rel=0.10),
    Rule("kid*", worse="higher", rel=0.10),
    Rule("calib_floor_*", worse="both", abs=0.05, gate=False),  # the reference's noise, not the estimator's quality
    Rule("calib_mae_*", worse="higher", abs=0.05),
    Rule("calib_*", worse="lower", abs=0.05),
    Rule("*", worse="both", rel=0.10),
)

KEY = ["dataset", "method", "nfe", "metric"]


def read_rule_file(path: str) -> tuple[Rule, ...]:
    """The rules of a YAML list of mappings (each a :class:`Rule`), without the defaults."""
    import yaml

    with open(path) as handle:
        try:
            data = yaml.safe_load(handle) or []
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a list of rules")
    return tuple(from_dict(Rule, item, f"{path}[{i}]") for i, item in enumerate(data))


def load_rules(*paths: str | None) -> tuple[Rule, ...]:
    """Rules of each YAML file in order, then the defaults (first match wins)."""
    return tuple(rule for path in paths if path is not None for rule in read_rule_file(path)) + DEFAULT_RULES


def rule_for(metric: str, rules: tuple[Rule, ...], method: str | None = None) -> Rule:
    """The first rule matching ``metric`` and ``method`` (None: whatever a rule's method pattern)."""
    return next(
        rule for rule in rules
        if fnmatch.fnmatchcase(metric, rule.pattern) and (method is None or fnmatch.fnmatchcase(str(method), rule.method))
    )


def _finite(x: float) -> float:
    return x if isinstance(x, float) and math.isfinite(x) else 0.0


def tolerance(old: float, se_new: float, se_old: float, rule: Rule) -> float:
    return max(rule.abs, rule.rel * abs(old), rule.sigmas * math.hypot(_finite(se_new), _finite(se_old)))


def judge(new: float, old: float, se_new: float, se_old: float, rule: Rule) -> tuple[float, float, bool]:
    """(delta, tolerance, regressed) for one metric; a move of exactly the tolerance is not a regression."""
    if not math.isfinite(new) and math.isfinite(old):
        return math.nan, math.nan, True
    delta = new - old
    tol = tolerance(old, se_new, se_old, rule)
    if rule.worse == "higher":
        bad = delta > tol
    elif rule.worse == "lower":
        bad = -delta > tol
    elif rule.worse == "abs":
        bad = abs(new) - abs(old) > tol
    else:
        bad = abs(delta) > tol
    return delta, tol, bool(bad)


def _flag(value) -> str:
    text = "" if value is None else str(value).strip()
    return "" if text.lower() == "nan" else text


def _status(r, rule: Rule) -> tuple[str, float, float, bool]:
    """(status, delta, tolerance, fails the check) of a row present in both result sets."""
    delta, tol, bad = judge(r.value_new, r.value_old, r.stderr_new, r.stderr_old, rule)
    flag_new, flag_old = _flag(r.flag_new), _flag(r.flag_old)
    if flag_new and flag_new != flag_old:  # a flag appeared (or changed to another one)
        status = "flagged"
    elif bad:
        status = "regressed"
    elif flag_old and not flag_new:
        status = "unflagged"
    else:
        status = "ok"
    if not rule.gate and status != "ok":
        return "info", delta, tol, False
    if status == "flagged":
        fails = rule.flag_change != "report" or bad
    elif status == "unflagged":
        fails = rule.flag_change == "regress"
    else:
        fails = status in FAILING
    return status, delta, tol, fails


def compare(
    new: pd.DataFrame, old: pd.DataFrame, rules: tuple[Rule, ...] = DEFAULT_RULES, measured: frozenset[str] | None = None
) -> pd.DataFrame:
    """One row per metric row of either set: values, flags, delta, tolerance, the rule's pattern, a
    status ('ok', 'regressed', 'flagged', 'unflagged', 'missing', 'not measured', 'info' for ungated
    changes, 'new' for rows only in NEW) and ``fails`` (whether the row fails the check).
    ``measured``: the metric groups NEW computed (its config's eval.metrics); a baseline row of a
    group NEW did not measure is 'not measured' (a dash, never a regression), not 'missing'."""
    old = old.assign(flag=old["flag"] if "flag" in old else "")
    new = new.assign(flag=new["flag"] if "flag" in new else "")
    merged = old.merge(new, on=KEY, how="outer", suffixes=("_old", "_new"), indicator="presence")
    records = []
    for r in merged.itertuples(index=False):
        rule = rule_for(r.metric, rules, r.method)
        record = {k: getattr(r, k) for k in KEY} | {
            "old": r.value_old, "new": r.value_new, "delta": math.nan, "tol": math.nan,
            "flag_old": _flag(r.flag_old), "flag_new": _flag(r.flag_new), "rule": rule.pattern, "worse": rule.worse,
        }
        if r.presence == "left_only" and measured is not None and metric_group(r.metric, r.method) not in measured:
            record |= {"status": "not measured", "fails": False}
        elif r.presence == "left_only":
            record |= {"status": "missing" if rule.gate else "info", "fails": rule.gate}
        elif r.presence == "right_only":
            record |= {"status": "new", "fails": False}
        else:
            status, delta, tol, fails = _status(r, rule)
            record |= {"delta": delta, "tol": tol, "status": status, "fails": fails}
        records.append(record)
    columns = [*KEY, "old", "new", "delta", "tol", "flag_old", "flag_new", "rule", "worse", "status", "fails"]
    return pd.DataFrame(records, columns=columns)


def failed(report: pd.DataFrame) -> pd.DataFrame:
    """The rows that fail the check (exit status 1)."""
    if "fails" in report:
        return report[report["fails"].astype(bool)]
    return report[report["status"].isin(FAILING)]


# Machine-readable verdicts -------------------------------------------------------------------------


def _num(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6g}"


def message(r) -> str:
    """One line saying what happened to a report row (JUnit failure message, Markdown cell)."""
    where = f"{r.method} NFE {r.nfe} {r.metric}"
    if r.status == "missing":
        return f"{where}: in the baseline ({_num(r.old)}) but missing from the new results"
    if r.status == "new":
        return f"{where}: new metric ({_num(r.new)}), no baseline"
    if r.status == "not measured":
        return f"{where}: in the baseline ({_num(r.old)}); its metric group was not selected in the new run"
    text = (
        f"{where}: baseline {_num(r.old)}, new {_num(r.new)}, delta {'+' if r.delta > 0 else ''}{_num(r.delta)}, "
        f"tolerance {_num(r.tol)} (rule '{r.rule}', worse: {r.worse})"
    )
    if r.flag_old != r.flag_new:
        text += f"; flag '{r.flag_old}' -> '{r.flag_new}'"
    note = {True: " (counts as a regression)", False: " (reported, not a regression)"}
    return f"{text}: {r.status}" + (note[bool(r.fails)] if r.status in ("flagged", "unflagged") else "")


def junit_xml(report: pd.DataFrame, suite: str = "f2d2-bench check") -> str:
    """JUnit XML: a test suite per dataset, a test case per metric row (classname DATASET.METHOD,
    name 'nfe=K METRIC'); failing rows carry a <failure> whose message gives baseline, new value,
    delta and tolerance; rows only in NEW are <skipped>; other changes go to <system-out>."""
    import xml.etree.ElementTree as ET

    bad = failed(report)
    root = ET.Element("testsuites", name=suite, tests=str(len(report)), failures=str(len(bad)), errors="0")
    for dataset, rows in report.groupby("dataset", sort=True):
        node = ET.SubElement(
            root, "testsuite", name=f"{suite}: {dataset}", tests=str(len(rows)),
            failures=str(int(rows["fails"].sum())), errors="0", skipped=str(int((rows["status"] == "new").sum())),
        )
        for r in rows.itertuples(index=False):
            case = ET.SubElement(node, "testcase", classname=f"{dataset}.{r.method}", name=f"nfe={r.nfe} {r.metric}", time="0")
            if r.fails:
                ET.SubElement(case, "failure", message=message(r), type=r.status).text = message(r)
            elif r.status == "new":
                ET.SubElement(case, "skipped", message=message(r))
            elif r.status != "ok":
                ET.SubElement(case, "system-out").text = message(r)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _json_value(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else str(x)
    return x.item() if hasattr(x, "item") else x


def verdict_json(report: pd.DataFrame, context: dict) -> dict:
    """The verdict as a JSON-ready dict: exit status, counts by status, ``context`` (paths, rules,
    machine classes) and every row (NaN as null)."""
    bad = failed(report)
    return {
        "verdict": "regression" if len(bad) else "ok",
        "exit_code": 1 if len(bad) else 0,
        "num_compared": len(report),
        "num_failed": len(bad),
        "counts": {str(k): int(v) for k, v in sorted(report["status"].value_counts().items())},
        **context,
        "rows": [{k: _json_value(v) for k, v in row.items()} for row in report.to_dict("records")],
    }


def summary_markdown(report: pd.DataFrame, context: dict, max_rows: int = 50) -> str:
    """A Markdown verdict for a CI step summary: headline, counts, the failing rows, other changes."""
    bad = failed(report)
    counts = ", ".join(f"{n} {k}" for k, n in sorted(report["status"].value_counts().items()))
    head = "REGRESSION" if len(bad) else "OK"
    lines = [f"### f2d2-bench check: {head}", "", f"{len(report)} metrics compared: {counts}.", ""]
    lines += [f"- {k}: `{v}`" for k, v in context.items() if isinstance(v, (str, int, float, bool))] + [""]
    quiet = report["status"].isin(["ok", "info"]) | report["fails"].astype(bool)
    changed = report[~quiet]
    num_info = int((report["status"] == "info").sum())
    if num_info:  # ungated rows (wall-clock): machine-dependent, listed in the JSON and JUnit files
        lines += [f"{num_info} ungated metrics (wall-clock, speed-up, reference NFE) moved beyond their tolerance: not judged.", ""]
    for title, rows in (("Failing", bad), ("Other changes (not failing)", changed)):
        if not len(rows):
            continue
        lines += [f"#### {title} ({len(rows)})", "", "| dataset | method | NFE | metric | baseline | new | delta | tolerance | flags | status |"]
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows.head(max_rows).itertuples(index=False):
            flags = f"{r.flag_old or '-'} -> {r.flag_new or '-'}" if r.flag_old != r.flag_new else (r.flag_new or "")
            cells = (r.dataset, r.method, r.nfe, r.metric, _num(r.old), _num(r.new), _num(r.delta), _num(r.tol), flags, r.status)
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        if len(rows) > max_rows:
            lines.append(f"\n({len(rows) - max_rows} more rows in the JSON/JUnit outputs)")
        lines.append("")
    return "\n".join(lines)
