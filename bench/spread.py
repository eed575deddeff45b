"""Cross-machine tolerances from measured seed-to-seed spread.

On another machine class (CPU model, torch version) last-bit differences change the training
trajectories of the ``ci`` profile, so its numbers differ as if trained with another seed. Given
sweeps of the same config with different training seeds, this module measures, for every metric
pattern of a rules file (and with ``--per-method`` for every method too), the largest difference
between two seeds of the same (dataset, method, nfe, metric) row (for ``worse: abs`` rules, of
|value|), and proposes tolerance = MULTIPLE x that spread (with ``sigmas: 0``, so the tolerance is
exactly the stated multiple), and ``flag_change: report`` where a flag differs between seeds. A
leave-one-seed-out check tells how often such tolerances fail a seed they were not derived from.

    python -m bench.spread /tmp/seeds/seed*/checkerboard --rules results/ci/rules.yaml --multiple 2 --per-method
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from bench.check import DEFAULT_RULES, KEY, Rule, compare, failed, read_rule_file, rule_for

ANY = "*"


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


def base_rules(rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """What is measured: one rule per metric pattern (its worse direction and gate), in file order.
    Tolerances and flag_change are derived anew, so a generated file measures like its source."""
    seen: dict[str, Rule] = {}
    for rule in rules:
        seen.setdefault(rule.pattern, Rule(rule.pattern, worse=rule.worse, gate=rule.gate))
    return tuple(seen.values())


def flag_changes(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Rows whose flag is not the same in every seed (a cross-machine run could gain or lose it)."""
    flags = pd.concat([f.set_index(KEY)["flag"].fillna("").astype(str).rename(i) for i, f in enumerate(frames)], axis=1)
    return flags[flags.nunique(axis=1) > 1].reset_index()


def spread_table(frames: list[pd.DataFrame], rules: tuple[Rule, ...], per_method: bool = False) -> pd.DataFrame:
    """One row per metric pattern of ``rules`` (method '*'), and with ``per_method`` one per pattern
    and method: rows compared, the largest pairwise seed difference and its row, the median and 90th
    percentile of the per-row spreads, and the rows whose flag differs between seeds. Each metric
    belongs to its first matching pattern among ``rules`` and the defaults."""
    rules = base_rules(rules)
    wide = pd.concat([f.set_index(KEY)["value"].rename(i) for i, f in enumerate(frames)], axis=1)
    metrics = wide.index.get_level_values("metric")
    owner = {m: rule_for(m, rules + DEFAULT_RULES).pattern for m in metrics.unique()}
    flips = flag_changes(frames)
    flipped = [(method, owner[metric]) for method, metric in zip(flips["method"], flips["metric"])]
    records = []
    for rule in rules:
        part = wide[[owner[m] == rule.pattern for m in metrics]]
        spreads = pd.Series([pair_spread(row, rule.worse) for row in part.to_numpy()], index=part.index, dtype=float).dropna()
        methods = spreads.index.get_level_values("method")
        groups = [(ANY, spreads)] + ([(m, spreads[methods == m]) for m in dict.fromkeys(methods)] if per_method else [])
        for method, values in groups:
            worst = values.idxmax() if len(values) else None
            records.append({
                "pattern": rule.pattern, "method": method, "worse": rule.worse, "rows": len(values),
                "max": values.max() if len(values) else math.nan,
                "q90": values.quantile(0.9) if len(values) else math.nan,
                "median": values.median() if len(values) else math.nan,
                "worst_row": "/".join(str(k) for k in worst[1:4]) if worst else "-",
                "flag_flips": sum(p == rule.pattern and fnmatch.fnmatchcase(m, method) for m, p in flipped),
            })
    return pd.DataFrame(records)


def derived_rules(table: pd.DataFrame, rules: tuple[Rule, ...], multiple: float) -> tuple[Rule, ...]:
    """Per pattern (file order): its per-method rules, then the pattern's rule for any method, each
    with abs = round_up(multiple x max spread), rel = 0, sigmas = 0, and flag_change 'report' where
    a flag differs between seeds (the noise flips it), else the default ('gained')."""
    out = []
    for rule in base_rules(rules):
        rows = table[(table["pattern"] == rule.pattern) & (table["rows"] > 0)]
        for r in sorted(rows.itertuples(index=False), key=lambda r: r.method == ANY):
            flag_change = "report" if r.flag_flips else rule.flag_change
            out.append(replace(rule, method=r.method, abs=round_up(multiple * r.max), rel=0.0, sigmas=0.0, flag_change=flag_change))
    return tuple(out)


def leave_one_out(frames: list[pd.DataFrame], rules: tuple[Rule, ...], multiple: float, per_method: bool) -> tuple[int, int, int]:
    """(failing comparisons, comparisons, failing rows): for each held-out seed, tolerances from the
    other seeds, then the held-out seed checked against each of them as baseline."""
    bad_checks = checks = bad_rows = 0
    for held in range(len(frames)):
        rest = [f for i, f in enumerate(frames) if i != held]
        local = derived_rules(spread_table(rest, rules, per_method), rules, multiple)
        for base in rest:
            failing = failed(compare(frames[held], base, local + DEFAULT_RULES))
            checks += 1
            bad_checks += int(len(failing) > 0)
            bad_rows += len(failing)
    return bad_checks, checks, bad_rows


GENERATED = "# Generated by:"
LOO_MULTIPLES = (1.0, 1.5, 2.0, 2.5, 3.0)


def preamble(path: str) -> list[str]:
    """The leading comment lines of a rules file before its generated part (kept on rewrite)."""
    lines = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#") or line.startswith(GENERATED):
            break
        lines.append(line)
    return lines


def rules_yaml(rules: tuple[Rule, ...], header: str, lead: list[str] = ()) -> str:
    lines = [*lead, *(f"# {line}".rstrip() for line in header.splitlines())]
    for r in rules:
        method = "" if r.method == ANY else f', method: "{r.method}"'
        flags = "" if r.flag_change == "gained" else f", flag_change: {r.flag_change}"
        lines.append(f'- {{pattern: "{r.pattern}"{method}, worse: {r.worse}, abs: {r.abs:g}, sigmas: 0{flags}}}')
    return "\n".join(lines) + "\n"


def _markdown(table: pd.DataFrame, tolerances: dict) -> list[str]:
    lines = ["| pattern | worse | rows | max spread | 90% of rows below | median | row of the max | flag flips | tolerance |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table[table["method"] == ANY].itertuples(index=False):
        lines.append(f"| `{r.pattern}` | {r.worse} | {r.rows} | {r.max:.3g} | {r.q90:.3g} | {r.median:.3g} | {r.worst_row} "
                     f"| {r.flag_flips} | {tolerances[(r.pattern, ANY)]:g} |")
    per_method = table[table["method"] != ANY]
    if len(per_method):
        methods = list(dict.fromkeys(per_method["method"]))
        lines += ["", "Max spread per method (tolerance = multiple x this):", "",
                  "| pattern | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for pattern, rows in per_method.groupby("pattern", sort=False):
            cells = dict(zip(rows["method"], rows["max"]))
            lines.append(f"| `{pattern}` | " + " | ".join(f"{cells.get(m, math.nan):.3g}" for m in methods) + " |")
    return lines


def report(paths: list[str], rules_path: str, multiple: float, per_method: bool) -> tuple[str, str]:
    """(Markdown report, proposed rules YAML) for the sweeps in ``paths``."""
    from bench.tables import read_rows

    frames = [read_rows(str(Path(p) / "results.csv" if Path(p).is_dir() else p)) for p in paths]
    rules = read_rule_file(rules_path)
    table = spread_table(frames, rules, per_method)
    new_rules = derived_rules(table, rules, multiple)
    lines = [f"Seed-to-seed spread over {len(frames)} sweeps ({len(frames) * (len(frames) - 1) // 2} pairs).", ""]
    lines += _markdown(table, {(r.pattern, r.method): r.abs for r in new_rules})
    lines += ["", f"tolerance = {multiple:g} x max spread{' of the method' if per_method else ''}, rounded up to 2 "
              "significant digits (sigmas 0); flag_change: report where a flag differs between seeds."]
    if len(frames) >= 3:
        for m in sorted({*LOO_MULTIPLES, multiple}):
            bad, n, rows = leave_one_out(frames, rules, m, per_method)
            lines.append(f"leave-one-seed-out at {m:g} x: {bad} of {n} checks fail ({rows} failing rows)")
    flips = flag_changes(frames)
    lines.append(f"rows whose flag differs between seeds: {len(flips)}")
    for row in flips.to_dict("records"):
        lines.append(f"  {row['method']} NFE {row['nfe']} {row['metric']}: " + ", ".join(repr(row[i]) for i in range(len(frames))))
    uncovered = sorted(m for m in frames[0]["metric"].unique() if not any(fnmatch.fnmatchcase(m, r.pattern) for r in rules))
    lines.append(f"metrics left to the default rules: {', '.join(uncovered) or 'none'}")
    command = " ".join(["python -m bench.spread", *paths, "--rules", rules_path, "--multiple", f"{multiple:g}"]
                       + (["--per-method"] if per_method else []))
    header = "\n".join([GENERATED[2:] + f" {command}", *lines])
    return "\n".join(lines), rules_yaml(new_rules, header, preamble(rules_path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spread", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results.csv files (or their directories), one per seed")
    parser.add_argument("--rules", required=True, help="rules YAML whose metric patterns (and worse directions) to measure")
    parser.add_argument("--multiple", type=float, default=2.0, help="tolerance = MULTIPLE x max spread (default 2)")
    parser.add_argument("--per-method", action="store_true", help="a tolerance per metric pattern and method")
    parser.add_argument("--write", help="write the proposed rules YAML here (atomically)")
    args = parser.parse_args(argv)
    if len(args.results) < 2 or args.multiple <= 0:
        parser.error("need at least two result sets and --multiple > 0")
    text, yaml_text = report(args.results, args.rules, args.multiple, args.per_method)
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
