"""The regression check's rules at their boundaries, its flag handling, and its machine-readable
verdicts (JUnit XML, JSON, Markdown, GitHub step summary) parsed back after a planted regression."""

from __future__ import annotations

import json
import math
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from bench.check import DEFAULT_RULES, Rule, compare, failed, judge, load_rules
from bench.cli import EXIT_USAGE, app

CI = Path(__file__).resolve().parent.parent / "results" / "ci" / "checkerboard"
EPS = 2.0**-20  # far above float64 rounding of the values below (all exact in binary), far below any tolerance


# judge: both sides of every tolerance ----------------------------------------------------------

@pytest.mark.parametrize(
    "rule, old, se_new, se_old",
    [
        (Rule("m", abs=0.25, sigmas=0.0), 1.0, math.nan, math.nan),  # abs
        (Rule("m", rel=0.125, sigmas=0.0), 2.0, math.nan, math.nan),  # rel * |old| = 0.25
        (Rule("m", rel=0.125, sigmas=0.0), -2.0, math.nan, math.nan),  # |old|, not old
        (Rule("m", sigmas=0.5), 1.0, 0.3, 0.4),  # 0.5 * hypot(0.3, 0.4) = 0.25
        (Rule("m", abs=0.1, rel=0.125, sigmas=0.1), 2.0, 0.3, 0.4),  # the largest of the three applies
    ],
)
def test_tolerance_is_the_largest_term_and_its_boundary_passes(rule, old, se_new, se_old):
    for worse, sign in (("higher", 1), ("lower", -1), ("both", 1), ("both", -1)):
        r = Rule(rule.pattern, worse=worse, abs=rule.abs, rel=rule.rel, sigmas=rule.sigmas)
        delta, tol, bad = judge(old + sign * 0.25, old, se_new, se_old, r)
        assert tol == pytest.approx(0.25, abs=1e-15) and delta == pytest.approx(sign * 0.25)
        assert not bad, (worse, sign)  # exactly at the tolerance: not a regression
        assert judge(old + sign * (0.25 + EPS), old, se_new, se_old, r)[2], (worse, sign)
        # the good direction never regresses, however far
        if worse != "both":
            assert not judge(old - sign * 10.0, old, se_new, se_old, r)[2]


def test_abs_rule_judges_the_magnitude():
    rule = Rule("nll_gap_*", worse="abs", abs=0.25, sigmas=0.0)
    assert not judge(1.25, -1.0, math.nan, math.nan, rule)[2]  # |1.25| - |-1| = 0.25: at the limit
    assert judge(-1.25 - EPS, -1.0, math.nan, math.nan, rule)[2]
    assert not judge(0.0, -1.0, math.nan, math.nan, rule)[2]  # a gap that closed is no regression


def test_nan_stderr_counts_as_zero_and_a_value_turning_nonfinite_regresses():
    rule = Rule("m", sigmas=3.0)
    assert judge(1.0 + EPS, 1.0, math.nan, math.nan, rule)[2]  # no stderr: tolerance 0
    assert judge(math.nan, 1.0, 0.1, 0.1, rule)[2]
    assert not judge(math.nan, math.nan, 0.1, 0.1, rule)[2]


def test_rules_reject_bad_values():
    with pytest.raises(ValueError, match="flag_change"):
        Rule("m", flag_change="ignore")
    assert Rule("m").flag_change == "gained"
    with pytest.raises(ValueError, match="worse"):
        Rule("m", worse="up")
    with pytest.raises(ValueError, match=">= 0"):
        Rule("m", abs=-1.0)


def test_a_method_pattern_narrows_a_rule():
    rules = (Rule("nll_*", method="meanflow*", abs=0.25, sigmas=0.0), Rule("nll_*", abs=1.0, sigmas=0.0))
    old = frame([("meanflow-f2d2", 1, "nll_nats", 3.0, 0.01, ""), ("lsd", 1, "nll_nats", 3.0, 0.01, "")])
    for shift, expected in ((0.25, []), (0.5, ["meanflow-f2d2"]), (1.0 + EPS, ["meanflow-f2d2", "lsd"])):
        new = old.assign(value=old["value"] + shift)
        assert sorted(failed(compare(new, old, rules))["method"]) == sorted(expected), shift


# flags ----------------------------------------------------------------------------------------

def frame(rows) -> pd.DataFrame:
    """rows: (method, nfe, metric, value, stderr, flag)."""
    return pd.DataFrame(
        [("toy", m, k, metric, v, se, flag) for m, k, metric, v, se, flag in rows],
        columns=["dataset", "method", "nfe", "metric", "value", "stderr", "flag"],
    )


@pytest.mark.parametrize(
    "flag_old, flag_new, flag_change, status, fails",
    [
        ("", "", "gained", "ok", False),
        ("", "invalid", "gained", "flagged", True),  # a flag appears: a regression by default
        ("", "optimistic", "gained", "flagged", True),  # any flag name, not only 'invalid'
        ("invalid", "optimistic", "gained", "flagged", True),  # another flag appears
        ("optimistic", "optimistic", "gained", "ok", False),
        ("invalid", "", "gained", "unflagged", False),  # a flag went away: a change ...
        ("invalid", "", "regress", "unflagged", True),  # ... and a regression where the rule says so
        ("", "invalid", "regress", "flagged", True),
        ("optimistic", float("nan"), "regress", "unflagged", True),  # an empty CSV cell reads as NaN
        (float("nan"), "", "regress", "ok", False),
        ("", "invalid", "report", "flagged", False),  # training-noise rules: reported only
        ("invalid", "", "report", "unflagged", False),
    ],
)
def test_flag_changes(flag_old, flag_new, flag_change, status, fails):
    rules = (Rule("nll_*", abs=0.5, flag_change=flag_change),)
    old = frame([("a", 1, "nll_nats", 3.0, 0.01, flag_old)])
    new = frame([("a", 1, "nll_nats", 3.0, 0.01, flag_new)])
    report = compare(new, old, rules)
    assert report.loc[0, "status"] == status and bool(report.loc[0, "fails"]) == fails
    assert len(failed(report)) == int(fails)


def test_a_reported_flag_still_fails_when_the_value_moved_too_far():
    rules = (Rule("nll_*", abs=0.5, sigmas=0.0, flag_change="report"),)
    old = frame([("a", 1, "nll_nats", 3.0, 0.01, "")])
    for value, fails in ((2.5, False), (2.5 - EPS, True)):
        report = compare(frame([("a", 1, "nll_nats", value, 0.01, "invalid")]), old, rules)
        assert report.loc[0, "status"] == "flagged" and bool(report.loc[0, "fails"]) == fails


def test_an_unflagged_row_that_also_moved_too_far_is_a_regression_and_ungated_flags_are_info():
    rules = (Rule("nll_*", abs=0.5), Rule("t_wall_s", gate=False, flag_change="regress"))
    old = frame([("a", 1, "nll_nats", 3.0, 0.01, "invalid"), ("a", 1, "t_wall_s", 1.0, math.nan, "invalid")])
    new = frame([("a", 1, "nll_nats", 4.0, 0.01, ""), ("a", 1, "t_wall_s", 1.0, math.nan, "")])
    report = compare(new, old, rules).set_index("metric")
    assert report.loc["nll_nats", "status"] == "regressed" and report.loc["nll_nats", "fails"]
    assert report.loc["t_wall_s", "status"] == "info" and not report.loc["t_wall_s", "fails"]


# outputs parsed back --------------------------------------------------------------------------

PLANTED = {
    "old": [("a", 1, "nll_nats", 3.0, 0.01, ""), ("a", 2, "nll_nats", 3.0, 0.01, "invalid"),
            ("b", 1, "energy_distance", 0.5, math.nan, ""), ("b", 1, "support_share", 0.9, math.nan, "")],
    "new": [("a", 1, "nll_nats", 3.75, 0.01, ""), ("a", 2, "nll_nats", 3.0, 0.01, ""),
            ("b", 1, "energy_distance", 0.5, math.nan, ""), ("b", 1, "calib_within", 0.2, math.nan, "")],
}


def planted_report() -> pd.DataFrame:
    return compare(frame(PLANTED["new"]), frame(PLANTED["old"]), DEFAULT_RULES)


def test_junit_has_a_case_per_row_and_failures_with_the_numbers():
    from bench.check import junit_xml

    root = ET.fromstring(junit_xml(planted_report()))
    cases = {(c.get("classname"), c.get("name")): c for c in root.iter("testcase")}
    assert root.get("tests") == "5" and root.get("failures") == "2" and len(cases) == 5
    failure = cases[("toy.a", "nfe=1 nll_nats")].find("failure")
    # nll_* default: abs 0.05 vs 3 * hypot(0.01, 0.01) = 0.0424: tolerance 0.05
    assert failure.get("type") == "regressed"
    for part in ("baseline 3,", "new 3.75,", "delta +0.75,", "tolerance 0.05 "):
        assert part in failure.get("message"), failure.get("message")
    assert cases[("toy.b", "nfe=1 support_share")].find("failure").get("type") == "missing"
    assert cases[("toy.b", "nfe=1 calib_within")].find("skipped") is not None  # only in NEW
    unflagged = cases[("toy.a", "nfe=2 nll_nats")]
    assert unflagged.find("failure") is None and "flag 'invalid' -> ''" in unflagged.find("system-out").text
    assert [list(c) for c in cases.values()].count([]) == 1  # the untouched row passes silently


def test_json_and_markdown_verdicts():
    from bench.check import summary_markdown, verdict_json

    report = planted_report()
    data = json.loads(json.dumps(verdict_json(report, {"baseline": "old.csv"}), allow_nan=False))
    assert data["verdict"] == "regression" and data["exit_code"] == 1 and data["num_failed"] == 2
    assert data["counts"] == {"missing": 1, "new": 1, "ok": 1, "regressed": 1, "unflagged": 1}
    row = next(r for r in data["rows"] if r["status"] == "regressed")
    assert (row["method"], row["nfe"], row["old"], row["new"], row["fails"]) == ("a", 1, 3.0, 3.75, True)
    assert row["delta"] == pytest.approx(0.75) and row["tol"] == pytest.approx(0.05)
    assert next(r for r in data["rows"] if r["status"] == "missing")["new"] is None  # NaN -> null
    text = summary_markdown(report, {"baseline": "old.csv"})
    assert text.startswith("### f2d2-bench check: REGRESSION")
    failing = text.split("#### Failing (2)")[1].split("####")[0]
    assert "| toy | a | 1 | nll_nats | 3 | 3.75 | 0.75 | 0.05 |  | regressed |" in failing
    assert "support_share" in failing and "unflagged" not in failing
    assert "| toy | a | 2 | nll_nats |" in text.split("Other changes")[1]
    ok = compare(frame(PLANTED["old"]), frame(PLANTED["old"]))
    assert summary_markdown(ok, {}).startswith("### f2d2-bench check: OK") and verdict_json(ok, {})["exit_code"] == 0


# the command ----------------------------------------------------------------------------------

def results_dir(tmp_path: Path, name: str, edit=None, env_edit=None) -> Path:
    """A copy of the committed ci results (results.csv, env.json, config.yaml), edited."""
    out = tmp_path / name
    out.mkdir()
    for file in ("config.yaml", "env.json"):
        shutil.copy(CI / file, out / file)
    rows = pd.read_csv(CI / "results.csv")
    if edit is not None:
        edited = edit(rows)  # edits in place, or returns the edited frame
        rows = rows if edited is None else edited
    rows.to_csv(out / "results.csv", index=False)
    if env_edit is not None:
        env = json.loads((out / "env.json").read_text())
        env_edit(env)
        (out / "env.json").write_text(json.dumps(env))
    return out


def tightest_nll(rows: pd.DataFrame) -> int:
    return rows[(rows.metric == "nll_nats") & rows.flag.isna()].stderr.idxmin()


def check(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, ["check", *map(str, args)], env=env)


def test_check_writes_every_verdict_and_appends_the_step_summary(tmp_path):
    def degrade(rows):
        rows.loc[tightest_nll(rows), "value"] += 1.0

    new = results_dir(tmp_path, "new", degrade)
    summary_file = tmp_path / "step_summary.md"
    summary_file.write_text("earlier step\n")
    out = tmp_path / "out"
    result = check(new, "--baseline", CI, "--junit", out / "j.xml", "--json", out / "v.json", "--summary", out / "s.md",
                   env={"GITHUB_STEP_SUMMARY": str(summary_file)})
    assert result.exit_code == 1, result.output
    assert "REGRESSION: 1 metric(s) regressed" in result.stderr
    root = ET.parse(out / "j.xml").getroot()
    assert root.get("tests") == str(len(pd.read_csv(CI / "results.csv"))) and root.get("failures") == "1"
    assert json.loads((out / "v.json").read_text())["num_failed"] == 1
    markdown = (out / "s.md").read_text()
    assert summary_file.read_text() == "earlier step\n" + markdown + "\n"
    # the same results against themselves: exit 0, and the step summary says so
    again = check(CI, "--baseline", CI, env={"GITHUB_STEP_SUMMARY": str(summary_file)})
    text = summary_file.read_text()
    assert again.exit_code == 0 and text.index("check: REGRESSION") < text.index("### f2d2-bench check: OK")


def test_help_documents_the_exit_codes():
    result = CliRunner().invoke(app, ["check", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "Exit status: 0 no regression, 1 a regression, 2 a usage error" in result.stdout


@pytest.mark.parametrize(
    "extra, needle",
    [
        ([], "exactly one"),
        (["--baseline", CI, "--history", CI / "env.json"], "exactly one"),
        (["--baseline", CI, "--show", "some"], "--show"),
        (["--baseline", CI, "--rules", "/nonexistent/rules.yaml"], "rules file"),
        (["--baseline", CI, "--junit", "DIR"], "is a directory"),
    ],
)
def test_usage_errors_are_one_line_and_write_nothing(tmp_path, extra, needle):
    (tmp_path / "DIR").mkdir()
    extra = [tmp_path / "DIR" if a == "DIR" else a for a in extra]
    result = check(CI, *extra, "--json", tmp_path / "v.json", "--summary", tmp_path / "s.md")
    assert result.exit_code == EXIT_USAGE, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not (tmp_path / "v.json").exists() and not (tmp_path / "s.md").exists()


def test_flag_change_rule_from_a_file(tmp_path):
    def unflag(rows):
        rows.loc[rows.flag == "invalid", "flag"] = None

    new = results_dir(tmp_path, "new", unflag)
    assert check(new, "--baseline", CI).exit_code == 0  # reported, not failing
    rules = tmp_path / "rules.yaml"
    rules.write_text('- {pattern: "nll_nats", abs: 0.05, flag_change: regress}\n')
    result = check(new, "--baseline", CI, "--rules", rules, "--json", tmp_path / "v.json")
    assert result.exit_code == 1 and "REGRESSION: 2 metric(s) regressed" in result.stderr
    rows = json.loads((tmp_path / "v.json").read_text())["rows"]
    assert sorted((r["method"], r["nfe"]) for r in rows if r["fails"]) == [("shortcut-distill-f2d2", 1), ("shortcut-distill-f2d2", 2)]


def test_cross_machine_rules_apply_only_across_machine_classes(tmp_path):
    """A move of 0.3 nats in one NLL: beyond the default tolerance, within a cross-machine rule
    of 0.5; the rule applies only when env.json says the machine class differs."""
    def shift(rows):
        rows.loc[tightest_nll(rows), "value"] += 0.3

    rules = tmp_path / "cross.yaml"
    rules.write_text('- {pattern: "nll_nats", abs: 0.5, sigmas: 0}\n')
    same = results_dir(tmp_path, "same", shift)
    other_cpu = results_dir(tmp_path, "cpu", shift, lambda env: env.update(cpu_model="Some Other CPU"))
    other_torch = results_dir(tmp_path, "torch", shift, lambda env: env["versions"].update(torch="9.9.9"))
    threads = results_dir(tmp_path, "threads", shift, lambda env: env.update(device_name="cpu (AMD EPYC, 1 threads)"))
    assert check(same, "--baseline", CI, "--cross-machine-rules", rules).exit_code == 1
    assert check(threads, "--baseline", CI, "--cross-machine-rules", rules).exit_code == 1  # same class
    assert check(other_cpu, "--baseline", CI, "--cross-machine-rules", rules).exit_code == 0
    assert check(other_torch, "--baseline", CI, "--cross-machine-rules", rules).exit_code == 0
    assert check(other_cpu, "--baseline", CI).exit_code == 1  # without the option: default rules
    # the committed baseline predates the recorded instruction set: a new file's ISA matches it
    isa = results_dir(tmp_path, "isa", shift, lambda env: env.update(cpu_capability="AVX2"))
    assert check(isa, "--baseline", CI, "--cross-machine-rules", rules).exit_code == 1
    isa_base = results_dir(tmp_path, "isa-base", None, lambda env: env.update(cpu_capability="AVX512"))
    assert check(isa, "--baseline", isa_base, "--cross-machine-rules", rules).exit_code == 0  # AVX2 vs AVX512

    def far(rows):
        rows.loc[tightest_nll(rows), "value"] += 0.5 + 1e-6

    beyond = results_dir(tmp_path, "beyond", far, lambda env: env.update(cpu_model="Some Other CPU"))
    assert check(beyond, "--baseline", CI, "--cross-machine-rules", rules).exit_code == 1


def test_load_rules_keeps_file_order_then_defaults(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text('- {pattern: "nll_nats", abs: 1.0}\n')
    b.write_text('- {pattern: "nll_*", abs: 2.0}\n')
    rules = load_rules(str(a), None, str(b))
    assert [r.abs for r in rules[:2]] == [1.0, 2.0] and rules[2:] == DEFAULT_RULES


def test_groups_the_new_run_did_not_measure_are_dashes_not_regressions(tmp_path):
    """A `--metrics nll` run against a full baseline: the quality, timing, calibration and mass rows
    are 'not measured' (exit 0); a missing row of a measured group is still 'missing' (exit 1)."""
    from bench.config import metric_group

    def likelihood_only(rows):
        return rows[[metric_group(m, meth) == "nll" for m, meth in zip(rows.metric, rows.method)]]

    new = results_dir(tmp_path, "new", likelihood_only)
    config = (new / "config.yaml").read_text()
    assert "metrics: []" in config
    (new / "config.yaml").write_text(config.replace("metrics: []", "metrics: [nll]"))
    out = tmp_path / "v.json"
    result = check(new, "--baseline", CI, "--json", out)
    assert result.exit_code == 0, result.output
    statuses = {row["status"] for row in json.loads(out.read_text())["rows"]}
    assert statuses == {"ok", "not measured"} or statuses == {"ok", "not measured", "unflagged"}

    def also_drop_an_nll_row(rows):
        rows = likelihood_only(rows)
        return rows.drop(rows.index[rows.metric == "nll_ref_nats"][:1])

    worse = results_dir(tmp_path, "worse", also_drop_an_nll_row)
    (worse / "config.yaml").write_text(config.replace("metrics: []", "metrics: [nll]"))
    result = check(worse, "--baseline", CI)
    assert result.exit_code == 1 and "missing" in result.output
    # without its config the run's groups are unknown: every baseline row is expected
    (new / "config.yaml").unlink()
    assert check(new, "--baseline", CI).exit_code == 1
