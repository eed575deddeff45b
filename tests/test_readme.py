"""README.md's "Latest results" section is generated from results/ (bench/readme.py): it may not
drift from the files it quotes, and every block names the command that wrote them."""

from __future__ import annotations

from pathlib import Path

import pytest

import pandas as pd

from bench.readme import BEGIN, END, ROOT, main, reference_phrase, render, splice


def test_readme_results_section_matches_the_committed_results():
    assert main(["--check"]) == 0, "README.md is out of date: run `python -m bench.readme` (make readme)"


def test_every_results_block_names_its_command():
    section = render(ROOT)
    blocks = section.split("\n### ")[1:]
    assert blocks, "results/ holds no sweep"
    for block in blocks:
        assert "```bash\n" in block and ("f2d2-bench " in block or "make " in block), block[:80]


def test_an_empty_results_tree_renders_only_the_markers(tmp_path: Path):
    (tmp_path / "results").mkdir()
    assert render(tmp_path) == f"{BEGIN}\n\n{END}\n"


def test_splice_replaces_between_the_markers_and_refuses_without_them():
    readme = f"intro\n{BEGIN}\nold numbers\n{END}\noutro\n"
    assert splice(readme, f"{BEGIN}\nnew\n{END}\n") == f"intro\n{BEGIN}\nnew\n{END}\noutro\n"
    with pytest.raises(ValueError, match="markers"):
        splice("no markers here", "x")


def test_check_fails_on_a_stale_section(tmp_path: Path):
    (tmp_path / "results").mkdir()
    (tmp_path / "README.md").write_text(f"# x\n{BEGIN}\nstale 3.14 nats\n{END}\n")
    assert main(["--check", "--root", str(tmp_path)]) == 1
    assert main(["--root", str(tmp_path)]) == 0
    assert main(["--check", "--root", str(tmp_path)]) == 0
    assert "stale" not in (tmp_path / "README.md").read_text()


def test_the_main_job_writes_only_where_git_does_not_look():
    # README's two commands in either order: `make sweep` must leave every tracked file alone, so
    # the README check of `make test` still passes after it. The sweep's default output and cache
    # are under DEFAULT_OUT, which .gitignore must ignore.
    import inspect
    import shutil
    import subprocess

    from bench.cli_core import DEFAULT_OUT
    from bench.cli_run import sweep

    defaults = {name: p.default for name, p in inspect.signature(sweep).parameters.items()}
    out_default = getattr(defaults["out"], "default", defaults["out"])
    assert Path(str(out_default)) == Path(DEFAULT_OUT)
    assert not Path(DEFAULT_OUT).is_absolute() and Path(DEFAULT_OUT).parts[0] not in ("results", ".")
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in (f"{DEFAULT_OUT}/checkerboard/results.csv", f"{DEFAULT_OUT}/checkpoints/checkerboard/x/checkpoint.json"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert ignored.returncode == 0, f"{path} is not ignored by git"


@pytest.mark.parametrize(
    "estimators, phrase",
    [
        (["dopri5/exact"], "its own exact-trace reference"),
        (["dopri5/hutchinson:2", "dopri5/hutchinson:2"], "its own 2-probe Hutchinson reference"),
        (["euler:1024/gaussian:4"], "its own 4-probe Gaussian Hutchinson reference"),
        ([], "its own reference"),
        (["dopri5/some-future-kind"], "its own some-future-kind reference"),  # unknown: named as written
        (["dopri5/exact", "dopri5/hutchinson:2"], "its own exact-trace / 2-probe Hutchinson reference"),
    ],
)
def test_the_calibration_caption_names_the_reference_the_results_used(estimators, phrase):
    """A caption typed by hand said "Hutchinson" after the digits job moved to the exact trace."""
    rows = [{"metric": "nll_ref_bpd", "estimator": e} for e in estimators]
    rows.append({"metric": "nll_bpd", "estimator": "naive/hutchinson:1"})  # not a reference: ignored
    assert reference_phrase(pd.DataFrame(rows)) == phrase
