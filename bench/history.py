"""Result history: one JSON line per sweep, appended by ``sweep --record FILE``.

An entry holds the git commit, the date (UTC), the machine (CPU model, device, device name, torch
and Python versions), the profile, the config hash (``stable_hash`` of the resolved SweepConfig),
the dataset, where the results were written with the sha256 of their results.csv, and every metric
row. ``f2d2-bench history FILE`` shows a metric's trajectory per method and NFE over entries (and a
trend figure, :mod:`bench.trend`); ``check NEW --history FILE`` takes its baseline from here.

**Machine class** = (CPU model, the instruction set torch's CPU kernels use, torch version,
accelerator), where the accelerator is 'cpu' or the CUDA device name. On CPU this is the rule of
tests/test_regression.py: on one machine class the CPU sweep of the 2D MLP is bit-for-bit
reproducible (also across thread counts), so results of two classes are compared with the
cross-machine tolerances (results/ci/rules.yaml). A file written before the instruction set was
recorded matches any (:func:`same_class`): the model name was all it said. The instruction set is
ATen's dispatch level only; the BLAS and oneDNN libraries pick kernels by finer CPU features, so a
class is the best this records, not a proof of bit-identity (the regression test measures it).

Appends from concurrent jobs: each entry is one ``write`` of one line on a file opened with
O_APPEND while holding an exclusive ``fcntl.flock`` on it (readers take a shared lock), so lines
never interleave. flock is advisory and may be ignored on network file systems (NFS).
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import math
import os
import textwrap
from pathlib import Path

import pandas as pd

SCHEMA = 1
BAND_WIDTH = 0.7  # of the trend figure's tolerance bands, in entries
ROW_COLUMNS = ("dataset", "method", "nfe", "metric", "value", "stderr", "flag", "estimator", "num_points")


class HistoryError(ValueError):
    """A history file or entry that cannot be used (reported as one line by the CLI)."""


def machine_class(env: dict) -> dict:
    """The machine class of an env.json (or of an entry's ``machine``): results of one class are
    bit-for-bit comparable. See the module docstring."""
    versions = env.get("versions") or {}
    device = str(env.get("device", "cpu"))
    accelerator = "cpu" if device.startswith("cpu") else str(env.get("device_name", device))
    return {
        "cpu_model": env.get("cpu_model"), "cpu_capability": env.get("cpu_capability"),
        "torch": versions.get("torch", env.get("torch")), "accelerator": accelerator,
    }


WILDCARDS = ("cpu_capability",)  # keys a file may lack (written before they were recorded)


def same_class(a: dict, b: dict) -> bool:
    """Two machine classes are one class: equal in every key, where a key of :data:`WILDCARDS`
    that either side did not record (None) matches anything."""
    return all(
        a.get(key) == b.get(key) or (key in WILDCARDS and (a.get(key) is None or b.get(key) is None))
        for key in set(a) | set(b)
    )


def class_text(cls: dict) -> str:
    isa = f" ({cls['cpu_capability']})" if cls.get("cpu_capability") else ""
    return f"{cls['cpu_model']}{isa} / torch {cls['torch']} / {cls['accelerator']}"


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def config_hash_of(out_dir: str | Path) -> str:
    """``stable_hash`` of the SweepConfig that a sweep wrote to ``out_dir/config.yaml``."""
    import yaml

    from bench.config import SweepConfig, from_dict, stable_hash

    path = Path(out_dir) / "config.yaml"
    if not path.is_file():
        raise HistoryError(f"{path} not found: --history needs a sweep's output directory (with config.yaml and env.json)")
    return stable_hash(from_dict(SweepConfig, yaml.safe_load(path.read_text()) or {}, str(path)))


def read_env(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "env.json"
    if not path.is_file():
        raise HistoryError(f"{path} not found: the machine of these results is unknown")
    return json.loads(path.read_text())


def _cell(value):
    """JSON has no NaN/inf: NaN -> null, +-inf -> 'inf'/'-inf' (undone by :func:`entry_frame`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value.item() if hasattr(value, "item") else value


def make_entry(out_dir: str | Path, config_hash: str, profile: str) -> dict:
    """The history entry of a finished sweep whose outputs are in ``out_dir`` (results.csv, env.json)."""
    from bench.tables import read_rows

    out_dir = Path(out_dir)
    env = read_env(out_dir)
    frame = read_rows(str(out_dir / "results.csv"))
    return {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": env.get("git_commit"),
        "machine": {
            "cpu_model": env.get("cpu_model"), "cpu_capability": env.get("cpu_capability"),
            "device": env.get("device"), "device_name": env.get("device_name"),
            "torch": (env.get("versions") or {}).get("torch"), "python": env.get("python"),
        },
        "profile": profile,
        "config_hash": config_hash,
        "dataset": str(frame["dataset"].iloc[0]) if len(frame) else None,
        "out_dir": str(out_dir.resolve()),
        "results_sha256": file_sha256(out_dir / "results.csv"),
        "columns": list(ROW_COLUMNS),
        "rows": [[_cell(v) for v in row] for row in frame[list(ROW_COLUMNS)].itertuples(index=False)],
    }


def check_record_path(path: str | Path) -> None:
    """Fail before any work if ``path`` cannot take history entries."""
    from bench.sweep import check_writable

    path = Path(path)
    if path.is_dir():
        raise HistoryError(f"--record {path} is a directory; give a file (JSON lines)")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"history file {path} is not writable")
    check_writable(path.parent, "history directory")


def append_entry(path: str | Path, entry: dict) -> None:
    """Append ``entry`` as one line, under an exclusive lock, in one write (see module docstring)."""
    line = (json.dumps(entry, sort_keys=True, allow_nan=False, separators=(",", ":")) + "\n").encode()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a writer killed mid-line: start a fresh line
            line = b"\n" + line
        view = memoryview(line)
        while view:  # one write; the loop only matters for a short write (disk full, signal)
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock


def record(path: str | Path, out_dir: str | Path, config_hash: str, profile: str) -> dict:
    """``sweep --record``: append the entry of the sweep in ``out_dir``; returns it."""
    entry = make_entry(out_dir, config_hash, profile)
    append_entry(path, entry)
    return entry


def read_history(path: str | Path) -> tuple[list[dict], int]:
    """(entries in file order, number of unreadable lines skipped: a writer killed mid-line)."""
    path = Path(path)
    if not path.is_file():
        raise HistoryError(f"history file {path} not found")
    with open(path, "rb") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
        data = handle.read()
    entries, bad = [], 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            entry["rows"], entry["columns"]  # noqa: B018 - a line without them is not an entry
        except (ValueError, TypeError, KeyError):
            bad += 1
            continue
        entries.append(entry)
    return entries, bad


def entry_frame(entry: dict) -> pd.DataFrame:
    """An entry's rows as a results frame (the columns of results.csv that history keeps)."""
    frame = pd.DataFrame(entry["rows"], columns=entry["columns"])
    for column in ("value", "stderr"):
        frame[column] = pd.to_numeric(frame[column].map(lambda v: math.nan if v is None else float(v)))
    for column in ("flag", "estimator"):
        frame[column] = frame[column].fillna("").astype(str)
    frame["nfe"] = frame["nfe"].astype(int)
    return frame


def is_entry_of(entry: dict, commit: str | None, results_sha256: str) -> bool:
    """Whether ``entry`` records the very results being checked (same commit, same results.csv)."""
    return entry.get("commit") == commit and entry.get("results_sha256") == results_sha256


def baseline_entry(entries: list[dict], config_hash: str, machine: dict, own: tuple[str | None, str] | None = None) -> tuple[int, dict]:
    """(index, entry): the last entry with this config hash and machine class, skipping the entries
    of the results under test (``own`` = (commit, results sha256): ``sweep --record`` then ``check
    --history`` in one job must not compare a run with itself)."""
    skipped = 0
    for index in range(len(entries) - 1, -1, -1):
        entry = entries[index]
        if entry.get("config_hash") != config_hash or not same_class(machine_class(entry.get("machine", {})), machine):
            continue
        if own is not None and is_entry_of(entry, *own):
            skipped += 1
            continue
        return index, entry
    raise HistoryError(
        f"no earlier entry with config hash {config_hash} on machine class {class_text(machine)} "
        f"among {len(entries)} entries" + (f" ({skipped} skipped: the results under test themselves)" if skipped else "")
    )


def select_series(entries: list[dict], show_all: bool) -> list[int]:
    """Indices of the entries a trajectory runs over: those with the last entry's config hash and
    machine class (what ``check --history`` compares; one instruction set, see below), or every entry."""
    if show_all or not entries:
        return list(range(len(entries)))
    last = entries[-1]
    config, machine = last.get("config_hash"), machine_class(last.get("machine", {}))
    candidates = [i for i, e in enumerate(entries)
                  if e.get("config_hash") == config and same_class(machine_class(e.get("machine", {})), machine)]
    # same_class is not transitive (AVX2 ~ unrecorded ~ AVX512): when the last entry did not record
    # its instruction set, the series takes that of the newest entry that did, so it never mixes two
    for i in reversed(candidates):
        recorded = machine_class(entries[i].get("machine", {}))
        if all(recorded.get(key) is not None for key in WILDCARDS):
            machine = recorded
            break
    return [i for i in candidates if same_class(machine_class(entries[i].get("machine", {})), machine)]


def trajectories(entries: list[dict], indices: list[int], metric: str | None, method: str | None, nfe: int | None) -> tuple[str, pd.DataFrame]:
    """(metric, long frame: entry, commit, date, dataset, method, nfe, value, stderr, flag) of
    ``metric`` (default nll_nats, else nll_bpd) over the entries ``indices``."""
    frames = []
    for i in indices:
        frame = entry_frame(entries[i])
        frames.append(frame.assign(entry=i, commit=str(entries[i].get("commit") or "-"), date=entries[i].get("date", "")))
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*ROW_COLUMNS, "entry", "commit", "date"])
    if metric is None:
        metric = next((m for m in ("nll_nats", "nll_bpd") if (rows["metric"] == m).any()), "nll_nats")
    keep = rows["metric"] == metric
    if method is not None:
        keep &= rows["method"] == method
    if nfe is not None:
        keep &= rows["nfe"] == nfe
    if not keep.any():
        known = ", ".join(sorted(rows["metric"].unique()))
        raise HistoryError(f"no rows of metric {metric!r}" + (f" for method {method}" if method else "")
                           + (f" at NFE {nfe}" if nfe is not None else "") + f" in the selected entries (metrics: {known or 'none'})")
    columns = ["entry", "commit", "date", "dataset", "method", "nfe", "value", "stderr", "flag"]
    return metric, rows.loc[keep, columns].sort_values(["dataset", "method", "nfe", "entry"], kind="stable").reset_index(drop=True)


def judge_steps(traj: pd.DataFrame, metric: str, rules) -> pd.DataFrame:
    """``traj`` with each entry of each (dataset, method, nfe) series judged against the previous
    entry of that series by its rule among ``rules`` (what ``check`` would have said): columns
    prev, delta, tol, regressed (never for a series' first entry or an ungated rule) and flagged
    (a flag appeared and the rule's flag_change counts that)."""
    from bench.check import judge, rule_for

    records = []
    for (_, method, _), series in traj.groupby(["dataset", "method", "nfe"], sort=False):
        rule = rule_for(metric, rules, method)
        prev = None
        for r in series.itertuples():
            record = {"prev": math.nan, "delta": math.nan, "tol": math.nan, "regressed": False, "flagged": False}
            if prev is not None:
                delta, tol, bad = judge(r.value, prev.value, r.stderr, prev.stderr, rule)
                record |= {"prev": prev.value, "delta": delta, "tol": tol, "regressed": bad and rule.gate,
                           "flagged": bool(r.flag) and r.flag != prev.flag and rule.gate and rule.flag_change != "report"}
            records.append({"index": r.Index, **record})
            prev = r
    judged = pd.DataFrame(records).set_index("index")
    return pd.concat([traj, judged.reindex(traj.index)], axis=1)


def plot_trend(judged: pd.DataFrame, metric: str, rules, path: str | Path) -> None:
    """Trend figure (PNG, matplotlib Agg): one panel per method, a line per NFE over the entries; at
    each entry the band the check allowed against the previous entry (prev +- tol, shaded; a
    one-sided rule only fails on one side) and regressions or new flags marked with a red cross."""
    from bench.check import rule_for

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.io import write_with

    methods = list(dict.fromkeys(judged["method"]))
    ncols = min(3, len(methods))
    nrows = math.ceil(len(methods) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False, sharex=True)
    entries = sorted(judged["entry"].unique())
    position = {e: i for i, e in enumerate(entries)}
    labels = {e: f"#{e} {str(c)[:7]}" for e, c in zip(judged["entry"], judged["commit"])}
    for ax, method in zip(axes.flat, methods):
        part = judged[judged["method"] == method]
        groups = list(part.groupby("nfe"))
        width = BAND_WIDTH / len(groups)  # bands of the NFEs side by side, not on top of each other
        for j, (k, series) in enumerate(groups):
            x = series["entry"].map(position).to_numpy(float)
            line, = ax.plot(x, series["value"], marker="o", ms=3, lw=1, label=f"NFE {k}")
            has = series["tol"].notna().to_numpy()
            for xi, prev, tol in zip(x[has], series["prev"][has], series["tol"][has]):
                left = xi - BAND_WIDTH / 2 + j * width
                ax.fill_between([left, left + width], prev - tol, prev + tol, color=line.get_color(), alpha=0.3, lw=0)
            bad = (series["regressed"] | series["flagged"]).to_numpy(bool)
            ax.plot(x[bad], series["value"][bad], "x", color="red", ms=8, mew=2)
        rule = rule_for(metric, rules, method)
        ax.set_title(f"{method} (rule {rule.pattern} / {rule.method}: worse {rule.worse}, abs {rule.abs:g})", fontsize=8)
        ax.legend(fontsize=6, loc="best")
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    ticks = list(range(len(entries)))
    for ax in axes[-1]:
        ax.set_xticks(ticks, [labels[e] for e in entries], rotation=60, fontsize=6, ha="right")
    title = (f"{metric} per entry; band: the range the check allowed against the previous entry, "
             "tol = max(abs, rel |prev|, sigmas se) of the panel's rule; red x: regression or new flag")
    fig.suptitle(textwrap.fill(title, 75 * ncols), fontsize=8)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def trajectory_table(judged: pd.DataFrame, entries: list[dict], last: int) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, legend) of the history command: a row per (dataset, method, nfe) with its
    value at each of the ``last`` most recent entries (a flag after the value) and the last step
    judged against the previous entry; the legend says which commit, date and config each entry is."""
    shown = sorted(judged["entry"].unique())[-last:]
    header = ["dataset", "method", "nfe", *[f"#{e}" for e in shown], "delta", "tol", "status"]
    rows = []
    for (dataset, method, nfe), series in judged.groupby(["dataset", "method", "nfe"], sort=False):
        by_entry = {r.entry: r for r in series.itertuples(index=False)}
        cells = [f"{by_entry[e].value:.4g}" + (f" {by_entry[e].flag}" if by_entry[e].flag else "") if e in by_entry else "-" for e in shown]
        end = series.iloc[-1]
        status = "regressed" if end["regressed"] else "flagged" if end["flagged"] else "ok" if math.isfinite(end["tol"]) else "-"
        rows.append([str(dataset), str(method), str(nfe), *cells, f"{end['delta']:+.4g}" if math.isfinite(end["delta"]) else "-",
                     f"{end['tol']:.3g}" if math.isfinite(end["tol"]) else "-", status])
    legend = []
    for e in shown:
        entry = entries[e]
        legend.append(f"#{e}: {entry.get('date', '?')} commit {entry.get('commit') or '-'} profile {entry.get('profile')} "
                      f"config {entry.get('config_hash')} on {class_text(machine_class(entry.get('machine', {})))}")
    return header, rows, legend
