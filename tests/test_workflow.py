"""The example GitHub Actions workflow cannot run here; this checks what can be checked locally:
it parses, installs and tests with the README's make targets, caches the environment by
pyproject.toml, and every f2d2-bench command it runs parses with the real command line."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml

from bench.cli import app

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


def steps() -> list[dict]:
    data = yaml.safe_load(WORKFLOW.read_text())
    assert set(data[True]) == {"push", "pull_request", "workflow_dispatch"}  # YAML 1.1 reads `on:` as True
    return data["jobs"]["regression"]["steps"]


def commands() -> list[list[str]]:
    return [shlex.split(line) for step in steps() if "run" in step for line in step["run"].splitlines() if line.strip()]


def parse(argv: list[str]) -> typer.Context:
    """Parse (without running) an f2d2-bench command line; raises the parser's usage errors."""
    group = typer.main.get_command(app)
    name, *rest = argv
    command = group.get_command(typer.Context(group), name)
    assert command is not None, f"unknown command {name}"
    return command.make_context(name, rest)


def test_every_f2d2_bench_command_of_the_workflow_parses():
    runs = [argv for argv in commands() if argv[0].endswith("/f2d2-bench")]
    assert {argv[1] for argv in runs} == {"sweep", "check", "history"}
    for argv in runs:
        assert argv[0] == ".venv/bin/f2d2-bench"  # the environment `make install` made
        parse(argv[1:])
    with pytest.raises(typer.TyperException):  # the parser does reject what it does not know
        parse(["check", "x", "--no-such-option"])


def test_install_and_tests_use_the_readme_make_targets_and_a_keyed_cache():
    makefile = (ROOT / "Makefile").read_text()
    make = [argv for argv in commands() if argv[0] == "make"]
    assert make == [["make", "install"], ["make", "test"]]
    for _, target in make:
        assert re.search(rf"^{target}:", makefile, re.M), target
    cache = next(s for s in steps() if s.get("uses", "").startswith("actions/cache@"))
    assert cache["with"]["path"] == ".venv" and "hashFiles('pyproject.toml')" in cache["with"]["key"]
    assert re.search(r"^VENV \?= \.venv$", makefile, re.M)  # the path the cache keeps


def test_the_ci_sweep_is_checked_against_the_committed_baseline_and_uploaded():
    by_name = {argv[1]: argv for argv in commands() if argv[0].endswith("/f2d2-bench") and ("--baseline" in argv or "--record" in argv)}
    sweep, check = by_name["sweep"], by_name["check"]
    assert sweep[sweep.index("--profile") + 1] == "ci" and sweep[sweep.index("--jobs") + 1] == "1"
    out = sweep[sweep.index("--out") + 1]
    assert check[2] == f"{out}/checkerboard"
    for option, path in (("--baseline", "results/ci/checkerboard"), ("--cross-machine-rules", "results/ci/rules.yaml")):
        assert check[check.index(option) + 1] == path and (ROOT / path).exists()
    junit = check[check.index("--junit") + 1]
    upload = next(s for s in steps() if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"] == "always()" and f"{out}/" in upload["with"]["path"] and junit.startswith(f"{out}/")
