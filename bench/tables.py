"""Tables from tidy rows: the CSV frame and the wide Markdown table of a sweep."""

from __future__ import annotations

import math
from dataclasses import asdict, fields

import pandas as pd

from bench.cells import Row

COLUMNS = [f.name for f in fields(Row)]
INVALID_MARK = "†"

# (metric stem, header, digits, takes the unit suffix _nats / _bpd)
WIDE = [
    ("nll", "NLL", 3, True),
    ("nll_ref", "own ref", 3, True),
    ("nll_teacher", "teacher ref", 3, True),
    ("nll_gap", "gap", 3, True),
    ("entropy", "true", 3, True),
    ("energy_distance", "energy dist.", 4, False),
    ("support_share", "in support", 3, False),
    ("fd_digits", "FD-digits", 2, False),
    ("fid", "FID", 2, False),
    ("sample_wall_s", "sample s", 4, False),
    ("nll_wall_s", "NLL s", 4, False),
    ("nll_speedup", "speed-up", 0, False),
]


def rows_frame(rows: list[Row]) -> pd.DataFrame:
    return pd.DataFrame([asdict(r) for r in rows], columns=COLUMNS)


def read_rows(path: str) -> pd.DataFrame:
    frame = pd.read_csv(path, keep_default_na=False, na_values=["", "nan", "NaN"])
    missing = [c for c in ("dataset", "method", "nfe", "metric", "value", "stderr") if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not a results CSV (missing columns {', '.join(missing)})")
    frame["flag"] = frame.get("flag", "").fillna("") if "flag" in frame else ""
    return frame


def fmt(value: float, stderr: float = math.nan, digits: int = 3, flag: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan" if flag == "nonfinite" else "-"
    text = f"{value:.{digits}f}" if digits > 0 else f"{value:,.0f}"
    if isinstance(stderr, float) and math.isfinite(stderr) and stderr > 0:
        text += f" ± {stderr:.{digits}f}" if digits > 0 else ""
    return text + (f" {INVALID_MARK}" if flag == "invalid" else "")


def unit_of(frame: pd.DataFrame) -> str:
    return "bpd" if frame["metric"].str.endswith("_bpd").any() else "nats"


def wide_markdown(frame: pd.DataFrame, title: str = "") -> str:
    """One row per (method, NFE), one column per metric; a dash where a method lacks the metric."""
    unit = unit_of(frame)
    columns = [
        (f"{stem}_{unit}" if suffixed else stem, head + (f" ({unit})" if suffixed else ""), digits)
        for stem, head, digits, suffixed in WIDE
    ]
    present = [c for c in columns if (frame["metric"] == c[0]).any()]
    lines = []
    if title:
        lines += [f"## {title}", ""]
    headers = ["method", "NFE"] + [head for _, head, _ in present]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    index = {(r.method, int(r.nfe), r.metric): r for r in frame.itertuples()}
    methods = list(dict.fromkeys(frame["method"]))
    for method in methods:
        for k in sorted({int(v) for v in frame.loc[frame["method"] == method, "nfe"]}):
            cells = [method, str(k)]
            for metric, _, digits in present:
                row = index.get((method, k, metric))
                cells.append(fmt(row.value, row.stderr, digits, row.flag) if row is not None else "-")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", legend(frame, unit)]
    return "\n".join(lines) + "\n"


def legend(frame: pd.DataFrame, unit: str) -> str:
    estimators = sorted({f"{r.method}: {r.estimator}" for r in frame.itertuples() if r.metric == f"nll_{unit}"})
    devices = sorted(set(frame["device"]))
    return (
        f"NLL: few-step negative log-likelihood ({unit}, mean ± standard error over the test points); "
        f"{INVALID_MARK} marks an invalid value (below the true entropy by more than 3 standard errors, "
        f"or a negative bits/dim). own ref: the method's own instantaneous field through the exact ODE; "
        f"teacher ref: the flow-matching teacher's. gap: NLL minus own ref (paired). "
        f"Times are medians of repeats on {', '.join(devices)}. Estimators: {'; '.join(estimators)}."
    )
