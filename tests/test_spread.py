"""Cross-machine tolerances from seed-to-seed spread (bench/spread.py): the statistics on
hand-made seeds, the derived rules at their boundary, and the committed results/ci/rules.yaml."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from bench.check import DEFAULT_RULES, Rule, compare, failed, load_rules, rule_for
from bench.spread import base_rules, derived_rules, leave_one_out, main, pair_spread, round_up, spread_table

ROOT = Path(__file__).resolve().parent.parent
RULES = (Rule("nll_gap_*", worse="abs"), Rule("nll_*", worse="both"), Rule("support_share", worse="lower"))


def seeds() -> list[pd.DataFrame]:
    """Three seeds; values chosen so that every spread is exact in binary."""
    table = {  # (method, nfe, metric): values per seed
        ("a", 1, "nll_nats"): [3.0, 3.25, 3.125],
        ("a", 2, "nll_nats"): [3.0, 3.0, 3.5],
        ("b", 1, "nll_nats"): [4.0, 4.125, 4.0],
        ("a", 1, "nll_gap_nats"): [-0.5, 0.25, 0.5],  # |.|: 0.5, 0.25, 0.5 -> 0.25 (not 1.0)
        ("b", 1, "nll_gap_nats"): [0.125, 0.25, 0.25],
        ("a", 1, "support_share"): [0.5, 0.75, 0.5],
        ("b", 1, "support_share"): [0.5, 0.5, 0.5],
        ("a", 1, "ref_nfe"): [100.0, 200.0, 300.0],  # a default rule's metric: not measured
    }
    flags = {("b", 1, "nll_nats"): ["", "invalid", ""]}
    frames = []
    for i in range(3):
        rows = [("toy", m, k, metric, values[i], math.nan, flags.get((m, k, metric), [""] * 3)[i])
                for (m, k, metric), values in table.items()]
        frames.append(pd.DataFrame(rows, columns=["dataset", "method", "nfe", "metric", "value", "stderr", "flag"]))
    return frames


def test_round_up_never_goes_below_and_keeps_exact_values():
    assert [round_up(x) for x in (0.86, 0.861, 0.8595, 1.15, 0.0012, 0.0)] == [0.86, 0.87, 0.86, 1.2, 0.0012, 0.0]
    assert round_up(0.07) == 0.07 and round_up(0.14) == 0.14  # 0.07 / 0.01 = 7.000000000000001 in floats
    assert round_up(math.nan) == 0.0


def test_pair_spread():
    assert pair_spread(np.array([1.0, 3.0, 2.0]), "both") == 2.0
    assert pair_spread(np.array([-3.0, 1.0, math.nan]), "abs") == 2.0
    assert math.isnan(pair_spread(np.array([1.0, math.nan]), "both"))


def test_spread_per_pattern_and_method():
    table = spread_table(seeds(), RULES, per_method=True).set_index(["pattern", "method"])
    assert table.loc[("nll_*", "*"), "max"] == 0.5 and table.loc[("nll_*", "*"), "rows"] == 3
    assert table.loc[("nll_*", "a"), "max"] == 0.5 and table.loc[("nll_*", "b"), "max"] == 0.125
    assert table.loc[("nll_gap_*", "a"), "max"] == 0.25  # of |value|, and gaps do not count as nll_*
    assert table.loc[("support_share", "*"), "worst_row"] == "a/1/support_share"
    assert table.loc[("nll_*", "b"), "flag_flips"] == 1 and table.loc[("nll_*", "a"), "flag_flips"] == 0
    assert set(table.index.get_level_values("pattern")) == {"nll_gap_*", "nll_*", "support_share"}  # not ref_nfe


def test_derived_rules_are_the_stated_multiple_and_hold_exactly_at_it():
    frames = seeds()
    rules = derived_rules(spread_table(frames, RULES, per_method=True), RULES, multiple=2.0)
    nll = [r for r in rules if r.pattern == "nll_*"]
    assert [(r.method, r.abs, r.flag_change) for r in nll] == [("a", 1.0, "gained"), ("b", 0.25, "report"), ("*", 1.0, "report")]
    assert all(r.rel == 0 and r.sigmas == 0 for r in rules)
    base = frames[0]
    for shift, bad in ((0.25, False), (0.25 + 2.0**-20, True)):  # method b's nll tolerance: 2 x 0.125
        new = base.copy()
        new.loc[(new.method == "b") & (new.metric == "nll_nats"), "value"] += shift
        assert len(failed(compare(new, base, rules + DEFAULT_RULES))) == int(bad)
    wide = derived_rules(spread_table(frames, RULES), RULES, multiple=2.0)
    assert [(r.pattern, r.method, r.abs) for r in wide] == [("nll_gap_*", "*", 0.5), ("nll_*", "*", 1.0), ("support_share", "*", 0.5)]
    # a generated file measures again like its source
    assert [(r.pattern, r.method, r.worse) for r in base_rules(rules)] == [(r.pattern, "*", r.worse) for r in RULES]


def test_leave_one_out_counts_the_seeds_that_would_fail():
    """Worked by hand (tolerances per pattern from the two other seeds):
    held out 0: nll 0.5, gap 0.25, support 0.25, flags differ -> report: passes both baselines;
    held out 1: seeds 0 and 2 agree on support (tol 0) and on no flag, so b's 'invalid' fails twice;
    held out 2: nll tol 0.25 (1x) and a/2 moved 0.5: fails twice at 1x, passes at 2x."""
    frames = seeds()
    assert leave_one_out(frames, RULES, 1.0, per_method=False) == (4, 6, 4)
    assert leave_one_out(frames, RULES, 2.0, per_method=False) == (2, 6, 2)
    assert leave_one_out(frames, RULES, 100.0, per_method=False) == (2, 6, 2)  # a flag is no tolerance


def test_command_writes_rules_that_load_back(tmp_path, capsys):
    paths = []
    for i, frame in enumerate(seeds()):
        paths.append(tmp_path / f"seed{i}.csv")
        frame.to_csv(paths[-1], index=False)
    source = tmp_path / "rules.yaml"
    source.write_text("".join(f'- {{pattern: "{r.pattern}", worse: {r.worse}}}\n' for r in RULES))
    out = tmp_path / "new.yaml"
    assert main([*map(str, paths), "--rules", str(source), "--multiple", "2", "--per-method", "--write", str(out)]) == 0
    assert "leave-one-seed-out at 2 x" in capsys.readouterr().out
    loaded = load_rules(str(out))
    assert loaded[: len(loaded) - len(DEFAULT_RULES)] == derived_rules(spread_table(seeds(), RULES, True), RULES, 2.0)
    assert out.read_text().startswith("# Generated by: python -m bench.spread")
    # a preamble (leading comments) is kept, and regenerating from the generated file changes nothing
    out.write_text("# what this file is for\n" + out.read_text())
    again = tmp_path / "again.yaml"
    main([*map(str, paths), "--rules", str(out), "--multiple", "2", "--per-method", "--write", str(again)])
    text = again.read_text().replace(str(out), str(source))
    assert text == out.read_text()


def test_committed_ci_rules_load_and_name_the_command_that_made_them():
    text = (ROOT / "results" / "ci" / "rules.yaml").read_text()
    rules = load_rules(str(ROOT / "results" / "ci" / "rules.yaml"))
    assert "Generated by: python -m bench.spread" in text and len(rules) > len(DEFAULT_RULES)
    assert all(r.sigmas == 0 and r.rel == 0 for r in rules[: len(rules) - len(DEFAULT_RULES)])
    fallback = rule_for("nll_nats", rules, "a-method-added-later")  # the pattern's rule for any method
    assert fallback.pattern == "nll_*nats" and fallback.method == "*" and fallback.abs > 0
