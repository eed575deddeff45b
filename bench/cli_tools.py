"""The commands that read results and describe the harness: ``table``, ``check``, ``history``,
``reference-accuracy``, ``methods``, ``datasets``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from bench.cli_config import _resolve_config
from bench.cli_core import DEFAULT_OUT, UserError, _fail, _interrupted, _user_errors, app

@app.command()
def table(
    results: Annotated[Path, typer.Argument(help="A results.csv, or the directory holding it.")],
    layout: Annotated[str, typer.Option(help="paper, wide, diagnostics, backward, guidance or long.")] = "paper",
    format: Annotated[str, typer.Option("--format", help="markdown, latex or csv.")] = "markdown",
    output: Annotated[Optional[Path], typer.Option(help="Write here (atomically) instead of stdout.")] = None,
) -> None:
    """Render a results CSV in the paper's layout (or another), as Markdown, LaTeX or CSV."""
    try:
        from bench.tables import FORMATS, LAYOUTS, read_rows, render

        if layout not in LAYOUTS:
            raise UserError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
        if format not in FORMATS:
            raise UserError(f"unknown format {format!r}; valid: {', '.join(FORMATS)}")
        path = results / "results.csv" if results.is_dir() else results
        if not path.is_file():
            raise UserError(f"results file {path} not found")
        if output is not None and output.is_dir():
            raise UserError(f"--output {output} is a directory; give a file name")
        text = render(read_rows(str(path)), layout, format)
        if output is not None:
            from bench.io import write_text

            write_text(output, text)
        else:
            typer.echo(text, nl=False)
    except (*_user_errors(), ValueError) as err:
        _fail(str(err))


@app.command(epilog="Exit status: 0 no regression, 1 a regression, 2 a usage error (nothing written).")
def check(
    new: Annotated[Path, typer.Argument(help="New results.csv (or its directory).")],
    baseline: Annotated[Optional[Path], typer.Option(help="Baseline results.csv (or its directory).")] = None,
    history: Annotated[Optional[Path], typer.Option(help="Take the baseline from this history (sweep --record): its last entry with NEW's config hash and machine class (CPU model, torch version, accelerator), other than NEW's own.")] = None,
    rules: Annotated[Optional[Path], typer.Option(help="YAML list of tolerance rules applied before the defaults.")] = None,
    cross_machine_rules: Annotated[Optional[Path], typer.Option(help="YAML rules applied (after --rules) only when NEW and the baseline come from different machine classes (env.json).")] = None,
    show: Annotated[str, typer.Option(help="'changes' (non-ok rows) or 'all'.")] = "changes",
    junit: Annotated[Optional[Path], typer.Option(help="Write JUnit XML: a test case per metric row, failures for regressions.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the verdict and every row as JSON.")] = None,
    summary: Annotated[Optional[Path], typer.Option(help="Write a Markdown summary (also appended to $GITHUB_STEP_SUMMARY when set).")] = None,
) -> None:
    """Compare NEW with a baseline metric by metric; exit 1 if anything regressed.

    A row regresses when it moves the worse way by more than its tolerance, gains a flag, or disappears; a flag that disappears is reported ('unflagged'). A rule's flag_change says which flag changes fail: gained (default), regress (gained or lost) or report (neither).
    """
    try:
        from bench.track import run_check

        num_failed = run_check(new, baseline, history, rules, cross_machine_rules, show, junit, json_out, summary)
    except (*_user_errors(), ValueError) as err:
        _fail(str(err))
    if num_failed:
        typer.echo(f"REGRESSION: {num_failed} metric(s) regressed", err=True)
        raise typer.Exit(1)

@app.command("history")
def show_history(
    file: Annotated[Path, typer.Argument(help="A history file written by `sweep --record`.")],
    metric: Annotated[Optional[str], typer.Option(help="Metric name (default nll_nats, else nll_bpd).")] = None,
    method: Annotated[Optional[str], typer.Option(help="Only this method.")] = None,
    nfe: Annotated[Optional[int], typer.Option(help="Only this NFE.")] = None,
    last: Annotated[int, typer.Option(help="Most recent entries shown as columns (the figure shows all).")] = 8,
    all_entries: Annotated[bool, typer.Option("--all", help="Every entry; default: those with the last entry's config hash and machine class.")] = False,
    rules: Annotated[Optional[Path], typer.Option(help="YAML tolerance rules for the band (before the defaults).")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a trend figure (PNG) with the check's tolerance band.")] = None,
) -> None:
    """Show a metric's trajectory per method and NFE over the entries of a history file."""
    try:
        from bench.track import run_history

        run_history(file, metric, method, nfe, last, all_entries, rules, plot)
    except (*_user_errors(), ValueError) as err:
        _fail(str(err))

@app.command("reference-accuracy")
def reference_accuracy_command(
    dataset: Annotated[Optional[str], typer.Option(help="Dataset name; default checkerboard.")] = None,
    method: Annotated[str, typer.Option(help="Whose instantaneous field to solve (a trained checkpoint in the cache).")] = "flow-matching",
    rtol: Annotated[str, typer.Option(help="Comma-separated tolerances (rtol = atol); the tightest exact solve is the truth.")] = "1e-5,1e-6,1e-7,1e-9",
    estimator: Annotated[str, typer.Option(help="Comma-separated divergence estimators to compare (exact, hutchinson:P).")] = "exact",
    num_test: Annotated[Optional[int], typer.Option(help="Test points (default: the profile's eval.num_test).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML sweep file applied on top of the profile (to find the checkpoint).")] = None,
    profile: Annotated[str, typer.Option(help="Budget profile: default, ci, paper (the authors' CIFAR-10 recipe) or smoke (tiny images pipeline check).")] = "default",
    cache_dir: Annotated[Path, typer.Option(help="Checkpoint cache holding the trained model.")] = Path(DEFAULT_OUT) / "checkpoints",
    data_dir: Annotated[Optional[Path], typer.Option(help="Where file-backed datasets live.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write OUT/DATASET.md and .json here (atomically).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Per-point error of the exact-ODE reference NLL at several solver tolerances (and with
    Hutchinson probes) against a much tighter exact solve: how to choose eval.rtol."""
    try:
        from dataclasses import asdict

        from bench.accuracy import accuracy_markdown, reference_accuracy
        from bench.cells import Units
        from bench.datasets import get_dataset
        from bench.env import resolve_device
        from bench.io import write_json, write_text
        from bench.sweep import TEACHER, load_source, plan_jobs
        from f2d2.divergence import parse_estimator

        cfg = _resolve_config(dataset, profile, config, None, method if method != TEACHER else None, None, data_dir,
                              {"num_test": num_test})
        try:
            tols = sorted({float(v) for v in rtol.split(",")})
        except ValueError:
            raise UserError(f"--rtol must be comma-separated numbers, got {rtol!r}") from None
        if not tols or not all(0 < t < 1 for t in tols):
            raise UserError(f"--rtol values must lie in (0, 1), got {rtol!r}")
        estimators = [e.strip() for e in estimator.split(",")]
        for spec in estimators:
            parse_estimator(spec)
        dev = resolve_device(device)
        ds = get_dataset(cfg.dataset, str(data_dir) if data_dir else None)
        kappa, sigma_0 = cfg.kappa or ds.kappa, cfg.sigma_0 or ds.sigma_0
        source = plan_jobs(cfg, ds, str(data_dir) if data_dir else None, cache_dir, kappa, sigma_0)[method]
        if getattr(source, "status", lambda: "")() not in ("complete", "provided", "loader"):
            raise UserError(f"no trained {method} checkpoint for this config under {cache_dir}; train it first with f2d2-bench sweep")
        model = load_source(source, cfg, ds, dev)
        units = Units(ds)
        rows = reference_accuracy(model, ds.test_set(cfg.eval.num_test).to(dev), cfg.eval, tols, estimators, units.scale(), dev)
        text = accuracy_markdown(rows, units.name, f"Reference accuracy: {ds.name}, {method}, {cfg.eval.num_test} test points")
        if out is not None:
            write_text(out / f"{ds.name}.md", text)
            write_json(out / f"{ds.name}.json", {"dataset": ds.name, "method": method, "rows": [asdict(r) for r in rows]})
    except (*_user_errors(), ValueError) as err:
        _fail(str(err))
    except KeyboardInterrupt as err:
        _interrupted(err)
    typer.echo(text)

@app.command("methods")
def list_methods() -> None:
    """List the registered methods and their capabilities."""
    from rich.table import Table

    from baselines import METHODS

    table = Table()
    table.add_column("method", no_wrap=True)  # names are what users copy: never cut them
    for header in ("flow map", "div head", "backward", "teacher", "summary"):
        table.add_column(header)
    for name, spec in METHODS.items():
        method = spec.build()
        caps = method.capabilities
        yes = lambda b: "yes" if b else "-"  # noqa: E731
        table.add_row(name, yes(caps.flow_map), yes(caps.divergence_head), yes(caps.backward), yes(method.needs_teacher), spec.summary)
    _listing_console().print(table)

def _listing_console():
    """A terminal's own width; piped or redirected output (rich's 80 columns) gets 120, so that
    listings in logs and READMEs keep one line per entry."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal or "COLUMNS" in os.environ else Console(width=120)

@app.command("datasets")
def list_datasets() -> None:
    """List the registered datasets."""
    from rich.table import Table

    from bench.datasets import DATASETS

    table = Table("dataset", "shape", "levels", "sigma_0", "kappa", "true entropy")
    for name, cls in DATASETS.items():
        entropy = "-" if getattr(cls, "needs_files", False) else _entropy_text(cls())
        table.add_row(name, str(cls.data_shape), str(cls.levels or "-"), str(cls.sigma_0), str(cls.kappa), entropy)
    _listing_console().print(table)

def _entropy_text(dataset) -> str:
    h = dataset.entropy()
    return "-" if h is None else f"{h.nats:.4f} nats" + (f" ± {h.stderr:.4f}" if h.stderr else "")
