"""The ``check`` and ``history`` commands behind bench/cli.py: inputs checked first (a usage error
writes nothing), then the comparison, then the outputs (each file atomically).

Exit status of ``check`` (bench/cli.py): 0 no regression, 1 a regression, 2 a usage error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.history import HistoryError

STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"


def results_file(path: Path) -> Path:
    """A results.csv given as the file or its directory; must exist."""
    path = path / "results.csv" if path.is_dir() else path
    if not path.is_file():
        raise HistoryError(f"results file {path} not found")
    return path


def check_output(path: Path | None, option: str) -> None:
    """An output file's directory must be (creatable and) writable, the path not a directory."""
    if path is None:
        return
    from bench.sweep import check_writable

    if path.is_dir():
        raise HistoryError(f"{option} {path} is a directory; give a file name")
    check_writable(path.parent if str(path.parent) else Path("."), f"{option} directory")


@dataclass
class Baseline:
    frame: pd.DataFrame
    env: dict | None  # env.json of the baseline (or the history entry's machine), None if unknown
    label: str


def baseline_from_file(path: Path) -> Baseline:
    from bench.tables import read_rows

    path = results_file(path)
    env_path = path.parent / "env.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else None
    return Baseline(read_rows(str(path)), env, str(path))


def baseline_from_history(history: Path, new_path: Path) -> Baseline:
    """The last entry with NEW's config hash and machine class, not NEW's own entry."""
    from bench.history import baseline_entry, config_hash_of, entry_frame, file_sha256, machine_class, read_env, read_history

    entries, _ = read_history(history)
    env = read_env(new_path.parent)
    own = (env.get("git_commit"), file_sha256(new_path))
    index, entry = baseline_entry(entries, config_hash_of(new_path.parent), machine_class(env), own)
    label = f"{history} entry #{index} (commit {entry.get('commit') or '-'}, {entry.get('date')})"
    return Baseline(entry_frame(entry), entry.get("machine"), label)


def run_check(
    new: Path, baseline: Path | None, history: Path | None, rules: Path | None, cross_machine_rules: Path | None,
    show: str, junit: Path | None, json_path: Path | None, summary: Path | None,
) -> int:
    """Compare, print the differences, write the requested outputs; returns the number of rows
    that fail the check (exit status 1 if any)."""
    from bench.check import compare, failed, load_rules
    from bench.history import class_text, machine_class, read_env, same_class
    from bench.tables import read_rows

    if (baseline is None) == (history is None):
        raise HistoryError("give the baseline as --baseline OLD or --history FILE (exactly one)")
    if show not in ("changes", "all"):
        raise HistoryError(f"--show must be 'changes' or 'all', got {show!r}")
    for path in (rules, cross_machine_rules):
        if path is not None and not path.is_file():
            raise HistoryError(f"rules file {path} not found")
    for path, option in ((junit, "--junit"), (json_path, "--json"), (summary, "--summary")):
        check_output(path, option)
    new_path = results_file(new)
    new_frame = read_rows(str(new_path))
    base = baseline_from_history(history, new_path) if history is not None else baseline_from_file(baseline)
    if base.frame.empty:  # a truncated or header-only baseline would let every row pass as 'new'
        raise HistoryError(f"baseline {base.label} has no result rows")
    context = {"new": str(new_path), "baseline": base.label, "rules": str(rules) if rules else "default"}
    use_cross = False
    if cross_machine_rules is not None:
        if base.env is None:
            raise HistoryError(f"--cross-machine-rules needs env.json beside the baseline {base.label}")
        new_class, base_class = machine_class(read_env(new_path.parent)), machine_class(base.env)
        use_cross = not same_class(new_class, base_class)
        context |= {"new_machine_class": class_text(new_class), "baseline_machine_class": class_text(base_class),
                    "cross_machine_rules": str(cross_machine_rules) if use_cross else "not applied (same machine class)"}
    files = [str(rules) if rules else None, str(cross_machine_rules) if use_cross else None]
    report = compare(new_frame, base.frame, load_rules(*files), measured_groups_of(new_path.parent))
    write_verdicts(report, context, junit, json_path, summary)
    print_report(report if show == "all" else report[report["status"] != "ok"])
    bad = failed(report)
    counts = ", ".join(f"{n} {k}" for k, n in sorted(report["status"].value_counts().items()))
    print(f"{len(report)} metrics compared: {counts}")
    print(f"baseline: {base.label}" + (f"; cross-machine rules {cross_machine_rules}" if use_cross else ""))
    return len(bad)


def measured_groups_of(directory: Path) -> frozenset[str] | None:
    """The metric groups the sweep behind a results directory computed (from its config.yaml),
    None when unknown (a results.csv without its config: every baseline row is then expected)."""
    import yaml

    from bench.config import ConfigError, EvalConfig, from_dict, measured_groups

    path = directory / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
        return measured_groups(from_dict(EvalConfig, data["eval"], "eval")) if isinstance(data, dict) and "eval" in data else None
    except (yaml.YAMLError, ConfigError, TypeError, KeyError):
        return None


def write_verdicts(report: pd.DataFrame, context: dict, junit: Path | None, json_path: Path | None, summary: Path | None) -> None:
    """JUnit, JSON and Markdown files (atomically) and the GitHub step summary (appended)."""
    from bench.check import junit_xml, summary_markdown, verdict_json
    from bench.io import write_json, write_text

    if junit is not None:
        write_text(junit, junit_xml(report))
    if json_path is not None:
        write_json(json_path, verdict_json(report, context))
    markdown = summary_markdown(report, context)
    if summary is not None:
        write_text(summary, markdown)
    step_summary = os.environ.get(STEP_SUMMARY_ENV)
    if step_summary:
        try:
            with open(step_summary, "a") as handle:
                handle.write(markdown + "\n")
        except OSError as err:  # the verdict (exit status) must not depend on the CI's summary file
            import sys

            print(f"warning: could not append to ${STEP_SUMMARY_ENV} ({err})", file=sys.stderr)


def print_report(report: pd.DataFrame) -> None:
    from rich.console import Console
    from rich.table import Table

    if not len(report):
        return
    table = Table("dataset", "method", "nfe", "metric", "baseline", "new", "delta", "tolerance", "flags", "status")
    style = {"regressed": "red", "flagged": "red", "missing": "red", "info": "yellow", "new": "cyan", "unflagged": "yellow"}
    for r in report.itertuples(index=False):
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (r.old, r.new, r.delta, r.tol)]
        flags = f"{r.flag_old or '-'}->{r.flag_new or '-'}" if r.flag_old != r.flag_new else r.flag_new
        status = r.status + ((" (fails)" if r.fails else " (reported)") if r.status in ("flagged", "unflagged") else "")
        table.add_row(str(r.dataset), str(r.method), str(r.nfe), str(r.metric), *cells, flags, status,
                      style="red" if r.fails else style.get(r.status))
    Console(width=170).print(table)


def run_history(
    file: Path, metric: str | None, method: str | None, nfe: int | None, last: int, show_all: bool,
    rules: Path | None, plot: Path | None,
) -> None:
    """Print a metric's trajectory per method and NFE; optionally write the trend figure."""
    from rich.console import Console
    from rich.table import Table

    from bench.check import load_rules
    from bench.history import judge_steps, plot_trend, read_history, select_series, trajectories, trajectory_table

    if last < 1:
        raise HistoryError(f"--last must be >= 1, got {last}")
    if rules is not None and not rules.is_file():
        raise HistoryError(f"rules file {rules} not found")
    check_output(plot, "--plot")
    entries, bad = read_history(file)
    if not entries:
        raise HistoryError(f"history file {file} has no entries")
    indices = select_series(entries, show_all)
    metric, traj = trajectories(entries, indices, metric, method, nfe)
    rule_set = load_rules(str(rules) if rules else None)
    judged = judge_steps(traj, metric, rule_set)
    header, rows, legend = trajectory_table(judged, entries, last)
    table = Table(*header, title=f"{metric} over {len(indices)} of {len(entries)} entries")
    for row in rows:
        table.add_row(*row, style="red" if row[-1] in ("regressed", "flagged") else None)
    console = Console(width=max(120, 12 * len(header)))
    console.print(table)
    console.print("\n".join(legend), markup=False, highlight=False)
    print(f"delta/tol/status: the last entry against the previous one by the check's rules ({rules or 'default'})"
          + ("" if show_all else "; entries with the last entry's config hash and machine class (--all: every entry)"))
    if bad:
        print(f"skipped {bad} unreadable line(s) of {file}")
    if plot is not None:
        plot_trend(judged, metric, rule_set, plot)
        print(f"wrote {plot}")
