"""CI regression tracking: the 'ci' sweep profile against the baseline committed under results/ci.

The baseline is regenerated, deliberately, with
    f2d2-bench sweep --profile ci --out results/ci --jobs 1
On the machine kind that produced it (same CPU model and torch) the sweep is bit-for-bit
reproducible and bench/check.py's default rules apply; elsewhere results/ci/rules.yaml allows for
the ci profile's training noise (see that file).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from bench.check import compare, failed, load_rules
from bench.cli import app
from bench.env import cpu_capability, cpu_model, environment, package_version
from bench.history import machine_class, same_class
from bench.tables import read_rows

CI = Path(__file__).resolve().parent.parent / "results" / "ci"
BASELINE = CI / "checkerboard" / "results.csv"


def same_machine_kind(env: dict) -> bool:
    """The machine class of bench/history.py (CPU model, its kernels' instruction set where recorded,
    torch version as env.json records it, i.e. without a local build suffix such as '+cu130', and
    the accelerator). Comparing torch.__version__
    ('2.14.1+cu130') with the recorded '2.14.1' once made the loose cross-machine rules apply everywhere."""
    return same_class(machine_class(env), machine_class(environment(torch.device("cpu"))))


def test_ci_profile_matches_the_committed_baseline(tmp_path):
    result = CliRunner().invoke(app, ["sweep", "--profile", "ci", "--out", str(tmp_path), "--jobs", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    env = json.loads((CI / "checkerboard" / "env.json").read_text())
    rules = load_rules(None if same_machine_kind(env) else str(CI / "rules.yaml"))
    baseline = read_rows(str(BASELINE))
    report = compare(read_rows(str(tmp_path / "checkerboard" / "results.csv")), baseline, rules)
    assert len(report) >= len(baseline) and (report["status"] != "missing").all()
    bad = failed(report)
    assert bad.empty, "regressions against results/ci:\n" + bad.to_string()


def test_the_committed_baseline_was_made_on_this_kind_of_machine_or_says_why_not():
    """Guards the rule above: on the development machine kind the strict default rules must be the
    ones that apply (a version-string mismatch once made the loose rules apply everywhere)."""
    env = json.loads((CI / "checkerboard" / "env.json").read_text())
    here = (cpu_model(), cpu_capability())
    made = (env.get("cpu_model"), env.get("cpu_capability") or here[1])  # unrecorded ISA: the model name decides
    if made != here:
        import pytest

        pytest.skip(f"CI runs on {here}, the baseline was made on {made}")
    assert same_machine_kind(env), (env["versions"].get("torch"), package_version("torch"))
