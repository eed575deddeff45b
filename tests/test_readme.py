"""README.md's "Latest results" section is generated from results/ (bench/readme.py): it may not
drift from the files it quotes, and every block names the command that wrote them."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.readme import BEGIN, END, ROOT, main, render, splice


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
