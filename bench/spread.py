"""Cross-machine tolerances from measured seed-to-seed spread.

On another machine class (CPU model, torch version) last-bit differences change the training
trajectories of the ``ci`` profile, so its numbers differ as if trained with another seed. Given
sweeps of the same config with different training seeds, this module measures, for every rule
pattern of a rules file, the largest difference between two seeds of the same (dataset, method,
nfe, metric) row (for ``worse: abs`` rules, of |value|), and proposes tolerance = MULTIPLE x that
spread (with ``sigmas: 0``, so the tolerance is exactly the stated multiple). A leave-one-seed-out
check tells how often such tolerances would fail a seed they were not derived from.

    python -m bench.spread /tmp/seeds/seed*/checkerboard --rules results/ci/rules.yaml --multiple 1.5
"""

from __future__ import annotations

import argparse
import fnmatch
import itertools
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from bench.check import DEFAULT_RULES, KEY, Rule, compare, failed, read_rule_file, rule_for


def round_up(x: float, digits: int = 2) -> float:
    """``x`` rounded up to ``digits`` significant digits (a tolerance never below the spread)."""
    if x <= 0 or not math.isfinite(x):
        return 0.0
    scale = 10 ** (math.floor(math.log10(x)) - digits + 1)
    return round(math.ceil(round(x / scale, 9)) * scale, 12)


def pair_spread(values: np.ndarray, worse: str) -> float:
    """Largest |a - b| (or ||a| - |b|| for worse='abs') over pairs of finite values; nan if < 2."""
    v = values[np.isfinite(values)]
    if worse == "abs":
        v = np.abs(v)
    return float(v.max() - v.min()) if len(v) >= 2 else math.nan


def spread_table(frames: list[pd.DataFrame], rules: tuple[Rule, ...]) -> pd.DataFrame:
    """One row per rule of ``rules`` (each metric goes to its first matching rule among ``rules``
    and the defaults): rows compared, the largest pairwise seed difference, its row, and the median
    and 90th percentile of the per-row spreads."""
    wide = pd.concat([f.set_index(KEY)["value"].rename(i) for i, f in enumerate(frames)], axis=1)
    everything = rules + DEFAULT_RULES
    owner = {m: rule_for(m, everything).pattern for m in wide.index.get_level_values("metric").unique()}
    records = []
    for rule in rules:
        part = wide[[owner[m] == rule.pattern for m in wide.index.get_level_values("metric")]]
        spreads = pd.Series([pair_spread(row, rule.worse) for row in part.to_numpy()], index=part.index).dropna()
        worst = spreads.idxmax() if len(spreads) else None
        records.append({
            "pattern": rule.pattern, "worse": rule.worse, "rows": len(spreads),
            "max": spreads.max() if len(spreads) else math.nan,
            "q90": spreads.quantile(0.9) if len(spreads) else math.nan,
            "median": spreads.median() if len(spreads) else math.nan,
            "worst_row": "/".join(str(k) for k in (worst[1], worst[2], worst[3])) if worst else "-",
        })
    return pd.DataFrame(records)


def derived_rules(table: pd.DataFrame, rules: tuple[Rule, ...], multiple: float) -> tuple[Rule, ...]:
    """``rules`` with abs = round_up(multiple x max spread), rel = 0 and sigmas = 0."""
    spread = dict(zip(table["pattern"], table["max"]))
    return tuple(replace(r, abs=round_up(multiple * spread[r.pattern]), rel=0.0, sigmas=0.0) for r in rules)


def leave_one_out(frames: list[pd.DataFrame], rules: tuple[Rule, ...], multiple: float) -> tuple[int, int, int]:
    """(failing comparisons, comparisons, failing rows): for each held-out seed, tolerances from the
    other seeds, then the held-out seed checked against each of them as baseline."""
    bad_checks = checks = bad_rows = 0
    for held in range(len(frames)):
        rest = [f for i, f in enumerate(frames) if i != held]
        local = derived_rules(spread_table(rest, rules), rules, multiple)
        for base in rest:
            report = failed(compare(frames[held], base, local + DEFAULT_RULES))
            checks += 1
            bad_checks += int(len(report) > 0)
            bad_rows += len(report)
    return bad_checks, checks, bad_rows


def flag_changes(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Rows whose flag is not the same in every seed (a cross-machine run could gain or lose it)."""
    flags = pd.concat([f.set_index(KEY)["flag"].fillna("").astype(str).rename(i) for i, f in enumerate(frames)], axis=1)
    return flags[flags.nunique(axis=1) > 1].reset_index()


def rules_yaml(rules: tuple[Rule, ...], header: str) -> str:
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for r in rules:
        extra = "" if r.flag_change == "report" else f", flag_change: {r.flag_change}"
        lines.append(f'- {{pattern: "{r.pattern}", worse: {r.worse}, abs: {r.abs:g}, sigmas: 0{extra}}}')
    return "\n".join(lines) + "\n"


def report(paths: list[str], rules_path: str, multiple: float) -> tuple[str, str]:
    """(Markdown report, proposed rules YAML) for the sweeps in ``paths``."""
    from bench.tables import read_rows

    frames = []
    for path in paths:
        p = Path(path)
        frames.append(read_rows(str(p / "results.csv" if p.is_dir() else p)))
    rules = read_rule_file(rules_path)
    table = spread_table(frames, rules)
    new_rules = derived_rules(table, rules, multiple)
    table["tolerance"] = [r.abs for r in new_rules]
    lines = [f"Seed-to-seed spread over {len(frames)} sweeps ({len(frames) * (len(frames) - 1) // 2} pairs): {', '.join(paths)}", "",
             "| pattern | worse | rows | max spread | 90% of rows below | median | row of the max | tolerance |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        lines.append(f"| `{r.pattern}` | {r.worse} | {r.rows} | {r.max:.3g} | {r.q90:.3g} | {r.median:.3g} | {r.worst_row} | {r.tolerance:g} |")
    lines += ["", f"tolerance = {multiple:g} x max spread, rounded up to 2 significant digits (sigmas 0)."]
    for m in sorted({1.0, multiple, 2.0}):
        bad, n, rows = leave_one_out(frames, rules, m)
        lines.append(f"leave-one-seed-out at {m:g} x: {bad} of {n} checks fail ({rows} failing rows)")
    flips = flag_changes(frames)
    lines.append(f"rows whose flag differs between seeds: {len(flips)}")
    for row in flips.to_dict("records"):
        lines.append(f"  {row['method']} NFE {row['nfe']} {row['metric']}: " + ", ".join(repr(row[i]) for i in range(len(frames))))
    uncovered = sorted(m for m in frames[0]["metric"].unique() if not any(fnmatch.fnmatchcase(m, r.pattern) for r in rules))
    lines.append(f"metrics left to the default rules: {', '.join(uncovered) or 'none'}")
    header = "\n".join(["Generated by: python -m bench.spread " + " ".join(paths) + f" --rules {rules_path} --multiple {multiple:g}", *lines])
    return "\n".join(lines), rules_yaml(new_rules, header)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spread", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results.csv files (or their directories), one per seed")
    parser.add_argument("--rules", required=True, help="rules YAML whose patterns (and worse directions) to measure")
    parser.add_argument("--multiple", type=float, default=1.5, help="tolerance = MULTIPLE x max spread (default 1.5)")
    parser.add_argument("--write", help="write the proposed rules YAML here (atomically)")
    args = parser.parse_args(argv)
    if len(args.results) < 2 or args.multiple <= 0:
        parser.error("need at least two result sets and --multiple > 0")
    text, yaml_text = report(args.results, args.rules, args.multiple)
    print(text)
    if args.write:
        from bench.io import write_text

        write_text(args.write, yaml_text)
        print(f"wrote {args.write}")
    else:
        print("\n" + yaml_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
