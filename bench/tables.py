"""Tables from tidy result rows: wide (one row per method and NFE), paper (the paper's layout),
backward (first-order backward approximation against trained backward maps) and long (the rows).

Each layout renders as Markdown, LaTeX (booktabs) or CSV. Invalid values (flag 'invalid') are
marked with a dagger in Markdown/CSV and greyed in LaTeX, as the paper greys them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import pandas as pd

from baselines import FORWARD_ONLY
from bench.cells import Row

COLUMNS = [f.name for f in fields(Row)]
INVALID_MARK = "†"
OPTIMISTIC_MARK = "‡"
MARKS = {"invalid": INVALID_MARK, "optimistic": OPTIMISTIC_MARK}
LAYOUTS = ("wide", "paper", "backward", "guidance", "long")
FORMATS = ("markdown", "latex", "csv")
QUALITY_METRICS = ("fid", "fd_digits", "fd_mnist", "energy_distance")  # first present wins (lower is better)

# (metric stem, header, digits, takes the unit suffix _nats / _bpd)
WIDE = [
    ("nll", "NLL", 3, True),
    ("nll_ref", "own ref", 3, True),
    ("nll_teacher", "teacher ref", 3, True),
    ("nll_gap", "gap", 3, True),
    ("mass", "mass", 3, False),
    ("entropy", "true", 3, True),
    ("calib_mae", "calib MAE", 3, True),
    ("calib_spearman", "Spearman", 3, False),
    ("calib_within", "within tol", 3, False),
    ("energy_distance", "energy dist.", 4, False),
    ("support_share", "in support", 3, False),
    ("fd_digits", "FD-digits", 2, False),
    ("fd_mnist", "FD-mnist", 2, False),
    ("fid", "FID", 2, False),
    ("kid", "KID", 4, False),
    ("sample_wall_s", "sample s", 4, False),
    ("nll_wall_s", "NLL s", 4, False),
    ("nll_speedup", "speed-up", 0, False),
]


def rows_frame(rows: list[Row]) -> pd.DataFrame:
    return pd.DataFrame([asdict(r) for r in rows], columns=COLUMNS)


def read_rows(path: str) -> pd.DataFrame:
    """A results CSV (the public interface); missing optional columns are filled."""
    frame = pd.read_csv(path)
    missing = [c for c in ("dataset", "method", "nfe", "metric", "value", "stderr") if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not a results CSV (missing columns {', '.join(missing)})")
    for column in COLUMNS:
        if column not in frame:
            frame[column] = "" if column in ("flag", "estimator", "device") else math.nan
    for column in ("flag", "estimator", "device"):
        frame[column] = frame[column].astype(object).where(frame[column].notna(), "").astype(str)
    for column in ("nfe", "value", "stderr", "num_points"):
        numbers = pd.to_numeric(frame[column], errors="coerce")
        bad = numbers.isna() & frame[column].notna() & ~frame[column].astype(str).str.lower().isin(["nan", ""])
        if bad.any():
            row = int(bad.idxmax())
            raise ValueError(f"{path}: column {column!r} holds a non-number ({frame[column].iloc[row]!r}, data row {row + 1})")
        frame[column] = numbers
    return frame


def unit_of(frame: pd.DataFrame) -> str:
    return "bpd" if frame["metric"].str.endswith("_bpd").any() else "nats"


@dataclass(frozen=True)
class Cell:
    value: float
    stderr: float = math.nan
    flag: str = ""
    estimator: str = ""


def lookup(frame: pd.DataFrame) -> dict[tuple[str, int, str], Cell]:
    return {(r.method, int(r.nfe), r.metric): Cell(r.value, r.stderr, r.flag, r.estimator) for r in frame.itertuples()}


def fmt(cell: Cell | None, digits: int = 3, stderr: bool = True) -> str:
    if cell is None:
        return "-"
    if not math.isfinite(cell.value):
        return "nan" if cell.flag == "nonfinite" or math.isnan(cell.value) else str(cell.value)
    if digits > 0 and max(abs(cell.value), abs(cell.stderr) if math.isfinite(cell.stderr) else 0.0) >= 1e4:
        # e.g. the importance-sampled mass of a far-from-normalised density: 4.33e+44, not 45 digits
        text = f"{cell.value:.{digits - 1}e}"
        if stderr and math.isfinite(cell.stderr) and cell.stderr > 0:
            text += f" ± {cell.stderr:.{digits - 1}e}"
        return text
    if digits > 0:
        text = f"{cell.value:.{digits}f}"
    else:  # ratios such as the speed-up: 3 significant digits below 100
        text = f"{cell.value:,.0f}" if abs(cell.value) >= 100 else f"{cell.value:.3g}"
    if stderr and digits > 0 and math.isfinite(cell.stderr) and cell.stderr > 0:
        text += f" ± {cell.stderr:.{digits}f}"
    return text


def markdown(headers: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def methods_of(frame: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(frame["method"]))


def wide_markdown(frame: pd.DataFrame, title: str = "") -> str:
    """One row per (method, NFE), one column per metric; a dash where a method lacks the metric."""
    unit = unit_of(frame)
    columns = [
        (f"{stem}_{unit}" if suffixed else stem, head + (f" ({unit})" if suffixed else ""), digits)
        for stem, head, digits, suffixed in WIDE
    ]
    present = [c for c in columns if (frame["metric"] == c[0]).any()]
    cells = lookup(frame)
    body = []
    for method in methods_of(frame):
        for k in sorted({int(v) for v in frame.loc[frame["method"] == method, "nfe"]}):
            row = [method, str(k)]
            for metric, _, digits in present:
                cell = cells.get((method, k, metric))
                row.append(fmt(cell, digits) + (f" {MARKS[cell.flag]}" if cell and cell.flag in MARKS else ""))
            body.append(row)
    head = [f"## {title}", ""] if title else []
    return "\n".join(head + [markdown(["method", "NFE"] + [h for _, h, _ in present], body), "", legend(frame, unit)]) + "\n"


def legend(frame: pd.DataFrame, unit: str) -> str:
    estimators = sorted({f"{r.method}: {r.estimator}" for r in frame.itertuples() if r.metric == f"nll_{unit}"})
    devices = sorted(set(frame["device"]))
    return (
        f"NLL: few-step negative log-likelihood ({unit}, mean ± standard error over the test points); "
        f"{INVALID_MARK} marks an invalid value (below the true entropy by more than 3 standard errors, "
        f"or a negative bits/dim), {OPTIMISTIC_MARK} an optimistic one (below the method's own exact NLL by "
        f"more than 3 paired standard errors + {_tol_text(unit)}). own ref: the method's own instantaneous "
        f"field through the exact ODE; teacher ref: the flow-matching teacher's. gap: NLL minus own ref (paired). "
        f"mass: total mass of the few-step density (1 for a normalised density; grid quadrature in 2D, importance "
        f"sampling for images, see results.csv's estimator column). "
        f"A dash: not measured (metric group not selected) or not applicable. "
        f"Times are medians of repeats on {', '.join(devices)}. Estimators: {'; '.join(estimators)}."
    )


# The paper's layout -------------------------------------------------------------------------


def _tol_text(unit: str) -> str:
    from bench.flags import OPTIMISTIC_TOL_BPD

    return f"{OPTIMISTIC_TOL_BPD:g} bits/dim" + (" (0.0139 nats in 2D)" if unit == "nats" else "")


def quality_metric(frame: pd.DataFrame) -> str | None:
    """The sample-quality metric of these results (first of QUALITY_METRICS present), None if the
    quality group was not measured."""
    for metric in QUALITY_METRICS:
        if (frame["metric"] == metric).any():
            return metric
    return None


TIE_SIGMAS = 2.0  # values closer than this many combined standard errors share a rank


def ranks(values: dict[str, Cell], target: float | None = None) -> dict[str, int]:
    """Rank 1 (bold) for the best unflagged value of a column and every value within TIE_SIGMAS
    combined standard errors of it, rank 2 (underlined) for the best of the rest and its ties.

    Sample quality: lower is better. Likelihoods (``target`` given, 0 for paired gaps): closer to
    ``target`` is better; only F2D2 estimates are ranked (a naive estimate is not the likelihood of
    any model) and flagged values (invalid, optimistic) never are."""
    def score(c: Cell) -> float:
        return abs(c.value - target) if target is not None else c.value

    pool = {
        m: c for m, c in values.items()
        if c.flag == "" and math.isfinite(c.value) and (target is None or c.estimator.startswith("f2d2"))
    }
    result: dict[str, int] = {}
    for rank in (1, 2):
        rest = {m: c for m, c in pool.items() if m not in result}
        if not rest:
            break
        leader = min(rest, key=lambda m: score(rest[m]))
        lead = rest[leader]
        for m, c in rest.items():
            se = math.hypot(_finite(c.stderr), _finite(lead.stderr))
            if score(c) - score(lead) <= TIE_SIGMAS * se:
                result[m] = rank
    return result


def _finite(x: float) -> float:
    return x if isinstance(x, float) and math.isfinite(x) else 0.0


def is_forward_only(name: str) -> bool:
    """A registered method's forward-only copy (NAME-fwd), not any row label that ends so."""
    from baselines import METHODS

    return name.endswith(FORWARD_ONLY) and name.removesuffix(FORWARD_ONLY) in METHODS


def reflagged(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the 'optimistic' rule applied to every few-step NLL row that has its paired gap
    row (``nll_gap_*``) and no flag yet: results written before the rule existed must not be ranked
    on their old, empty flags."""
    from bench.datasets import DATASETS
    from bench.flags import OPTIMISTIC, is_optimistic

    unit = unit_of(frame)
    gaps = frame[frame["metric"] == f"nll_gap_{unit}"].set_index(["dataset", "method", "nfe"])
    out = frame.copy()
    for i, r in out[(out["metric"] == f"nll_{unit}") & (out["flag"] == "")].iterrows():
        key = (r.dataset, r.method, r.nfe)
        cls = DATASETS.get(str(r.dataset))
        if key not in gaps.index or (unit == "nats" and cls is None):
            continue
        gap = gaps.loc[key]
        dims = math.prod(cls.data_shape) if cls is not None else 1
        if is_optimistic(float(gap["value"]), float(gap["stderr"]), unit, dims):
            out.at[i, "flag"] = OPTIMISTIC
    return out


def paper_table(frame: pd.DataFrame, fmt_name: str = "markdown", nfe: tuple[int, ...] | None = None) -> str:
    """Rows = methods; column pairs NLL / sample quality at each NFE (8, 4, 2, 1 as in the paper);
    teacher reference in the caption. NLL columns are ranked by |paired gap to the method's own
    exact NLL| (F2D2's claim: a model's few-step NLL matches its own exact NLL); flagged values are
    marked and never ranked; a dash is a value not measured. Forward-only copies (NAME-fwd) are
    left to the backward layout."""
    frame = reflagged(frame)
    unit, quality = unit_of(frame), quality_metric(frame)
    nll_metric, gap_metric = f"nll_{unit}", f"nll_gap_{unit}"
    measured = frame.loc[frame["metric"].isin([nll_metric, quality]), "nfe"]
    nfe = tuple(nfe) if nfe else tuple(sorted({int(k) for k in measured}, reverse=True))
    cells = lookup(frame)
    methods = [m for m in methods_of(frame) if not is_forward_only(m)]  # those belong to --layout backward
    qcol = quality or "quality"
    columns = [(k, m) for k in nfe for m in (nll_metric, qcol)]

    def gap_cell(name: str, k: int) -> Cell | None:
        nll, gap = cells.get((name, k, nll_metric)), cells.get((name, k, gap_metric))
        return None if nll is None or gap is None else Cell(gap.value, gap.stderr, nll.flag, nll.estimator)

    rank = {}
    for k, m in columns:
        if m == nll_metric:
            gaps = {name: c for name in methods if (c := gap_cell(name, k)) is not None}
            rank[(k, m)] = ranks(gaps, 0.0)
        else:
            rank[(k, m)] = ranks({name: cells[(name, k, m)] for name in methods if (name, k, m) in cells}) if quality else {}
    caption = paper_caption(frame, unit, quality)
    if fmt_name == "csv":
        return _paper_csv(methods, columns, cells, gap_metric)
    digits = {nll_metric: 2 if unit == "bpd" else 3, qcol: 2 if quality != "energy_distance" else 4}
    body = [[name] + [decorate(cells.get((name, k, m)), digits[m], rank[(k, m)].get(name), fmt_name) for k, m in columns] for name in methods]
    qname = {"energy_distance": "ED", "fd_digits": "FD-digits", "fd_mnist": "FD-mnist", "fid": "FID"}.get(quality, quality or "quality")
    headers = ["method"] + [f"{'NLL' if m == nll_metric else qname} @{k}" for k, m in columns]
    if fmt_name == "latex":
        return latex_table(headers, body, caption)
    return markdown(headers, body) + "\n\n" + caption + "\n"


def _paper_csv(methods: list[str], columns: list[tuple[int, str]], cells: dict, gap_metric: str) -> str:
    records = []
    for name in methods:
        record = {"method": name}
        for k, m in columns:
            cell = cells.get((name, k, m))
            record[f"{m}@{k}"] = cell.value if cell else math.nan
            record[f"{m}@{k}_flag"] = cell.flag if cell else ""
            if m.startswith("nll_"):
                gap = cells.get((name, k, gap_metric))
                record[f"{gap_metric}@{k}"] = gap.value if gap else math.nan
        records.append(record)
    return pd.DataFrame(records).to_csv(index=False)


def decorate(cell: Cell | None, digits: int, rank: int | None, fmt_name: str) -> str:
    text = fmt(cell, digits, stderr=False)
    if cell is None:
        return "-" if fmt_name != "latex" else "--"
    if fmt_name == "latex":
        text = text.replace("-", "$-$", 1) if text.startswith("-") else text
        if cell.flag in MARKS:
            mark = r"$^\dagger$" if cell.flag == "invalid" else r"$^\ddagger$"
            return r"\textcolor{gray}{" + text + mark + "}"
        return {1: r"\textbf{" + text + "}", 2: r"\underline{" + text + "}"}.get(rank, text)
    if cell.flag in MARKS:
        return text + f" {MARKS[cell.flag]}"
    return {1: f"**{text}**", 2: f"<u>{text}</u>"}.get(rank, text)


def paper_caption(frame: pd.DataFrame, unit: str, quality: str | None) -> str:
    teacher = frame[frame["metric"] == f"nll_teacher_{unit}"]
    dataset = ", ".join(sorted(set(frame["dataset"])))
    qtext = f"{quality}: lower is best." if quality else "Sample quality: not measured (dash)."
    parts = [
        f"{dataset}: few-step NLL ({unit}) and {quality or 'sample quality'} at each number of steps. NLL: ranked by "
        f"|paired gap to the method's own exact-ODE NLL| (closest to 0 is best; NLL, own reference and gap side by "
        f"side in the wide table, results.md). {qtext}"
    ]
    if len(teacher):
        row = teacher.iloc[0]
        parts.append(f"Teacher's exact NLL {row.value:.3f} ± {row.stderr:.3f} {unit} ({row.estimator}).")
    entropy = frame[frame["metric"] == f"entropy_{unit}"]
    if len(entropy):
        parts.append(f"True entropy {entropy.iloc[0].value:.3f} {unit}.")
    parts.append(
        f"Best unflagged value bold, second underlined, values within {TIE_SIGMAS:g} combined standard errors "
        f"of them share the mark; flagged values are never ranked: {INVALID_MARK} invalid (below the true "
        f"entropy by more than 3 standard errors, or negative bits/dim), {OPTIMISTIC_MARK} optimistic (below the "
        f"method's own exact NLL by more than 3 paired standard errors + {_tol_text(unit)}); grey in LaTeX. "
        "Baselines without a divergence head report the naive few-step likelihood, which is not ranked."
    )
    return " ".join(parts)


def latex_table(headers: list[str], body: list[list[str]], caption: str) -> str:
    escape = lambda s: s.replace("_", r"\_").replace("@", r"$@$")  # noqa: E731
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\caption{" + escape(caption).replace("±", r"$\pm$").replace(INVALID_MARK, r"$\dagger$").replace(OPTIMISTIC_MARK, r"$\ddagger$") + "}",
        r"\begin{tabular}{l" + "r" * (len(headers) - 1) + "}",
        r"\toprule",
        " & ".join(escape(h) for h in headers) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join([escape(row[0])] + row[1:]) + r" \\" for row in body]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# Backward integration study -----------------------------------------------------------------


def backward_table(frame: pd.DataFrame, fmt_name: str = "markdown") -> str:
    """Per F2D2 variant and NFE: the few-step NLL error against the own reference with trained
    backward maps, with the first-order approximation on the same model, and (if the sweep had
    NAME-fwd) with the first-order approximation on the forward-only model."""
    unit = unit_of(frame)
    cells = lookup(frame)
    records = []
    for name in methods_of(frame):
        if name.endswith("-fwd") or not any(key[0] == name and key[2] == f"nll_first_order_{unit}" for key in cells):
            continue
        for k in sorted({key[1] for key in cells if key[0] == name}):
            ref = cells[(name, k, f"nll_ref_{unit}")].value
            record = {
                "method": name,
                "nfe": k,
                "trained": cells[(name, k, f"nll_{unit}")].value - ref,
                "first_order_same_model": cells[(name, k, f"nll_first_order_{unit}")].value - ref,
            }
            fwd = f"{name}-fwd"
            if (fwd, k, f"nll_{unit}") in cells:
                record["first_order_forward_only"] = cells[(fwd, k, f"nll_{unit}")].value - cells[(fwd, k, f"nll_ref_{unit}")].value
            records.append(record)
    table = pd.DataFrame(records)
    if fmt_name == "csv":
        return table.to_csv(index=False)
    headers = list(table.columns)
    body = [[str(v) if not isinstance(v, float) else (f"{v:+.3f}" if math.isfinite(v) else "-") for v in row] for row in table.itertuples(index=False)]
    caption = (
        f"Few-step NLL minus the model's own exact-ODE reference NLL ({unit}): with trained backward maps, "
        "with the first-order backward approximation on the same (bidirectionally trained) model, and on "
        "the same method trained forward only (NAME-fwd)."
    )
    if fmt_name == "latex":
        return latex_table(headers, body, caption)
    return markdown(headers, body) + "\n\n" + caption + "\n"


def guidance_table(frame: pd.DataFrame, fmt_name: str = "markdown") -> str:
    """Rows = a method unguided and with each guidance step size (NAME+guided@ETA); columns =
    sample quality at each NFE with the network calls (forward + backward) it cost; the teacher's
    many-step value, if present, in the caption."""
    quality = quality_metric(frame)
    if quality is None:
        raise ValueError("no sample-quality metric in these results (the guidance table needs one)")
    cells = lookup(frame)
    guided = [m for m in methods_of(frame) if "+guided@" in m]
    if not guided:
        raise ValueError("no guided rows (NAME+guided@ETA) in these results: the guidance layout needs a `f2d2-bench guide` run")
    bases = list(dict.fromkeys(m.split("+guided@")[0] for m in guided))
    labels = [label for base in bases for label in [base, *[m for m in guided if m.startswith(base + "+")]]]
    nfe = sorted({k for (m, k, metric) in cells if m in labels and metric == quality})
    records = []
    for label in labels:
        record = {"method": label}
        for k in nfe:
            q = cells.get((label, k, quality))
            fwd, bwd = cells.get((label, k, "network_calls_forward")), cells.get((label, k, "network_calls_backward"))
            record[f"{quality}@{k}"] = q.value if q else math.nan
            record[f"calls@{k}"] = f"{fwd.value:.0f}+{bwd.value:.0f}" if fwd and bwd else "-"
        records.append(record)
    table = pd.DataFrame(records)
    teacher = [(k, c) for (m, k, metric), c in cells.items() if m == "flow-matching" and metric == quality and k > max(nfe, default=0)]
    caption = f"{quality} of samples (lower is better); calls = forward + backward network passes per sample."
    if teacher:
        k, c = max(teacher)
        caption += f" Teacher with {k} Euler steps: {c.value:.4g}."
    if fmt_name == "csv":
        return table.to_csv(index=False)
    body = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    if fmt_name == "latex":
        return latex_table(list(table.columns), body, caption)
    return markdown(list(table.columns), body) + "\n\n" + caption + "\n"


def render(frame: pd.DataFrame, layout: str, fmt_name: str) -> str:
    """Dispatch on layout and format; both are validated by the caller's choices."""
    if layout == "long":
        if fmt_name == "csv":
            return frame.to_csv(index=False)
        body = [[str(v) for v in row] for row in frame[COLUMNS].itertuples(index=False)]
        return markdown(COLUMNS, body) + "\n" if fmt_name == "markdown" else latex_table(COLUMNS, body, "All result rows.")
    if layout == "paper":
        return paper_table(frame, fmt_name)
    if layout == "backward":
        return backward_table(frame, fmt_name)
    if layout == "guidance":
        return guidance_table(frame, fmt_name)
    if fmt_name != "markdown":
        raise ValueError("the wide layout renders as markdown only; use --layout long for csv/latex")
    return wide_markdown(frame)
