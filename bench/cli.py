"""The ``f2d2-bench`` command line.

Errors a user can cause (bad options, unknown names, missing files, bad checkpoints or configs)
print one line on stderr and exit with status 2, without a traceback and before writing anything.
The option parser's own errors get the same one-line form in :func:`main` (the console script).
Ctrl-C and SIGTERM print one line too and exit with 130 and 143, whatever exception the signal
surfaced as: torch's C++ can turn the KeyboardInterrupt raised inside a tensor constructor into a
ValueError ("could not determine the shape of object type ..."), so :func:`main` records every stop
signal it receives and reports the stop, never the side effect.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Benchmark few-step flow models with fast likelihoods (F2D2).",
)

EXIT_USAGE = 2


class UserError(Exception):
    """An error to report as one line, without a traceback."""


def _fail(message: str) -> None:
    if _STOP_SIGNALS:  # an error caused by Ctrl-C / SIGTERM arriving mid-call is the stop, not bad input
        raise typer.Exit(_say_stopped(_STOP_SIGNALS[0]))
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


def _user_errors():
    from bench.checkpoint import CheckpointError
    from bench.config import ConfigError
    from bench.datasets import DataError
    from bench.fid import WeightsError

    return (UserError, ConfigError, CheckpointError, DataError, WeightsError, PermissionError, FileNotFoundError, NotADirectoryError)


def _parse_methods(text: str) -> tuple[str, ...]:
    from baselines import FORWARD_ONLY, METHODS, get_method

    names: tuple[str, ...] = ()
    for item in (n.strip() for n in text.split(",") if n.strip()):
        names += tuple(METHODS) if item == "all" else (item,)
    unknown = []
    for name in names:
        try:
            get_method(name)
        except KeyError:
            unknown.append(name)
    if unknown or not names:
        raise UserError(
            f"unknown method {', '.join(unknown) or repr(text)}; valid: {', '.join(METHODS)} "
            f"(or 'all'; flow-map methods also as NAME{FORWARD_ONLY})"
        )
    if len(set(names)) != len(names):
        raise UserError(f"--methods has duplicates: {text}")
    return names


def _parse_checkpoints(items: list[str]) -> dict[str, str]:
    """METHOD=PATH pairs from repeated --checkpoint options."""
    pairs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--checkpoint expects METHOD=PATH, got {item!r}")
        if name.strip() in pairs:
            raise UserError(f"--checkpoint given twice for {name.strip()}")
        pairs[name.strip()] = path.strip()
    return pairs


def _resolve_config(
    dataset: Optional[str],
    profile: str,
    config: Optional[Path],
    nfe: Optional[str],
    methods: Optional[str],
    checkpoints: Optional[list[str]] = None,
    data_dir: Optional[Path] = None,
    teacher: Optional[Path] = None,
):
    """Profile defaults for the dataset, then the YAML file, then the command-line options.
    ``teacher`` is ``--checkpoint flow-matching=DIR`` except that it never narrows the methods."""
    from dataclasses import replace

    from bench.config import ConfigError, apply_sweep_yaml, parse_nfe, read_sweep_yaml
    from bench.datasets import dataset_class, get_dataset
    from bench.profiles import default_config

    data = {}
    if config is not None:
        if not config.is_file():
            raise UserError(f"sweep config {config} not found")
        data = read_sweep_yaml(str(config))
        if dataset is not None and data.get("dataset", dataset) != dataset:
            raise UserError(f"--dataset {dataset} contradicts dataset {data['dataset']!r} in {config}")
    name = dataset or data.get("dataset") or "checkerboard"
    dataset_class(str(name))
    get_dataset(str(name), str(data_dir) if data_dir else None)  # missing data files fail here, first
    cfg = default_config(str(name), profile)
    if data:
        cfg = apply_sweep_yaml(str(config), data, cfg)
    if nfe is not None:
        cfg = replace(cfg, nfe=parse_nfe(nfe))
    if methods is not None:
        cfg = replace(cfg, methods=_parse_methods(methods))
    if checkpoints:
        given = _parse_checkpoints(checkpoints)
        cfg = replace(cfg, checkpoints={**cfg.checkpoints, **given})
        if methods is None:  # evaluate exactly what was provided
            cfg = replace(cfg, methods=tuple(given))
    if teacher is not None:
        from bench.sweep import TEACHER

        if TEACHER in _parse_checkpoints(checkpoints or []):
            raise UserError(f"--teacher and --checkpoint {TEACHER}=... both name the teacher; give one")
        cfg = replace(cfg, checkpoints={**cfg.checkpoints, TEACHER: str(teacher)})
    for name in [*cfg.methods, *cfg.method_options, *cfg.train_overrides, *cfg.checkpoints]:
        _parse_methods(name)
    where = f"{config}: " if config is not None else ""
    for name in cfg.methods:  # method options and training overrides fail now, naming the file
        try:
            cfg_method_config(cfg, name)
            cfg.train_for(name)
        except ConfigError as err:
            raise ConfigError(f"{where}{err}") from None
    return cfg


@app.command()
def sweep(
    dataset: Annotated[Optional[str], typer.Option(help="Dataset name (see `f2d2-bench datasets`); default checkerboard.")] = None,
    nfe: Annotated[Optional[str], typer.Option(help="Comma-separated numbers of function evaluations, e.g. 1,2,4,8.")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated method names; 'all' stands for every registered one.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML sweep file (keys of SweepConfig) applied on top of the profile.")] = None,
    profile: Annotated[str, typer.Option(help="Budget profile: default, or ci (tiny, for regression tracking).")] = "default",
    out: Annotated[Path, typer.Option(help="Results root; outputs go to OUT/DATASET/.")] = Path("results"),
    cache_dir: Annotated[Optional[Path], typer.Option(help="Checkpoint cache (default OUT/checkpoints).")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Where file-backed datasets live.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    inception_weights: Annotated[Optional[Path], typer.Option(help="clean-fid's inception-2015-12-05.pt (or its folder) for FID on RGB data; default ~/.cache/f2d2-bench/.")] = None,
    checkpoint: Annotated[Optional[list[str]], typer.Option(help="METHOD=PATH: evaluate this trained checkpoint instead of training (repeatable).")] = None,
    teacher: Annotated[Optional[Path], typer.Option(help="A flow-matching checkpoint (e.g. from `f2d2-bench import torchcfm`) used as the teacher: --checkpoint flow-matching=DIR that keeps the methods to train.")] = None,
    jobs: Annotated[int, typer.Option(help="Parallel training processes on CPU (0: one per core, at most 2).")] = 0,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
) -> None:
    """Train what is missing, evaluate every method at every NFE, write results.csv and results.md."""
    try:
        cfg = _resolve_config(dataset, profile, config, nfe, methods, checkpoint, data_dir, teacher)
        from bench.env import resolve_device
        from bench.sweep import check_writable, run_sweep

        dev = resolve_device(device)
        check_writable(out)
        num_jobs = jobs if jobs > 0 else max(1, min(2, os.cpu_count() or 1))
        reporter = _reporter(quiet)
        with reporter:
            outcome = run_sweep(
                cfg, out, cache_dir=cache_dir, data_dir=str(data_dir) if data_dir else None,
                device=dev, jobs=num_jobs, reporter=reporter,
                inception_weights=str(inception_weights) if inception_weights else None,
            )
    except _user_errors() as err:
        _fail(str(err))
    except ValueError as err:  # e.g. an unavailable device
        _fail(str(err))
    except KeyboardInterrupt as err:
        _interrupted(err)
    if not quiet:
        typer.echo((outcome.out_dir / "results.md").read_text())
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in outcome.stage_s.items())
        typer.echo(f"wrote {outcome.out_dir}/results.csv and results.md ({stages})")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or ``kill``'s stop request), raised where the main process is so
    that it cleans up exactly as after Ctrl-C: training workers stopped, no temporary files."""


_STOP_SIGNALS: list[int] = []  # the stop signals received so far (main installs the handler)
_STOP_REPORTED: list[bool] = []


def _on_stop_signal(signum, frame) -> None:
    import signal

    _STOP_SIGNALS.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _interrupted(err: KeyboardInterrupt) -> None:
    import signal

    signum = _STOP_SIGNALS[0] if _STOP_SIGNALS else signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT
    raise typer.Exit(_say_stopped(signum))


def _say_stopped(signum: int) -> int:
    """Ctrl-C or SIGTERM: one line instead of a traceback; returns the shell's status (128 + signal).
    Every file is written by rename, so what is on disk is complete; finished checkpoints and
    evaluation cells are reused by the rerun, an unfinished training resumes from its last save."""
    import signal

    if not _STOP_REPORTED:
        what = "terminated" if signum == signal.SIGTERM else "interrupted"
        typer.echo(
            f"{what}: every file on disk is complete; rerun the same command to resume "
            "(finished models and evaluation cells are reused)",
            err=True,
        )
        _STOP_REPORTED.append(True)
    return 128 + signum


def _reporter(quiet: bool):
    from bench.progress import RichReporter, SilentReporter

    return SilentReporter() if quiet else RichReporter()


@app.command()
def guide(
    method: Annotated[str, typer.Option(help="A method with a divergence head, e.g. meanflow-f2d2.")],
    eta: Annotated[str, typer.Option(help="Comma-separated Adam step sizes on the noise, e.g. 0.01,0.03,0.1.")],
    dataset: Annotated[Optional[str], typer.Option(help="Dataset name; default checkerboard.")] = None,
    nfe: Annotated[Optional[str], typer.Option(help="Comma-separated numbers of sampling steps.")] = None,
    prior: Annotated[bool, typer.Option(help="Keep -log p_0(x_0) in the objective (--no-prior: kappa D only).")] = True,
    steps: Annotated[int, typer.Option(help="Adam steps on the noise (the paper: 1).")] = 1,
    teacher_steps: Annotated[int, typer.Option(help="Also sample the teacher with this many Euler steps (0: skip).")] = 200,
    config: Annotated[Optional[Path], typer.Option(help="YAML sweep file applied on top of the profile.")] = None,
    profile: Annotated[str, typer.Option(help="Budget profile: default or ci.")] = "default",
    out: Annotated[Path, typer.Option(help="Results root; outputs go to OUT/guidance/DATASET/.")] = Path("results"),
    cache_dir: Annotated[Optional[Path], typer.Option(help="Checkpoint cache (default OUT/checkpoints, shared with sweep).")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Where file-backed datasets live.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
) -> None:
    """Self-guidance: sample quality with and without one Adam step on the noise, per NFE and eta."""
    try:
        from dataclasses import replace

        from baselines import get_method
        from bench.env import resolve_device
        from bench.sweep import TEACHER, check_writable, run_sweep

        cfg = _resolve_config(
            dataset, profile, config, nfe, f"{TEACHER},{method}" if method != TEACHER else TEACHER, None, data_dir
        )
        if not get_method(method).build(cfg_method_config(cfg, method)).capabilities.divergence_head:
            raise UserError(f"{method} has no divergence head; self-guidance needs one (e.g. meanflow-f2d2)")
        try:
            etas = tuple(float(v) for v in eta.split(","))
        except ValueError:
            raise UserError(f"--eta must be comma-separated numbers, got {eta!r}") from None
        cfg = replace(cfg, eval=replace(cfg.eval, guidance_etas=etas, guidance_prior=prior, guidance_steps=steps, teacher_steps=teacher_steps))
        dev = resolve_device(device)
        check_writable(out)
        with _reporter(quiet) as reporter:
            outcome = run_sweep(
                cfg, out / "guidance", cache_dir=cache_dir or out / "checkpoints",
                data_dir=str(data_dir) if data_dir else None, device=dev, reporter=reporter,
            )
        from bench.io import write_text
        from bench.tables import guidance_table, rows_frame

        text = guidance_table(rows_frame(outcome.rows))
        write_text(outcome.out_dir / "guidance.md", text)
    except (*_user_errors(), ValueError) as err:
        _fail(str(err))
    except KeyboardInterrupt as err:
        _interrupted(err)
    if not quiet:
        typer.echo(text)
        typer.echo(f"wrote {outcome.out_dir}/results.csv and guidance.md")


def cfg_method_config(cfg, method: str):
    from baselines import get_method
    from bench.config import merge

    return merge(get_method(method).config, cfg.options_for(method), f"method_options.{method}")


@app.command()
def table(
    results: Annotated[Path, typer.Argument(help="A results.csv, or the directory holding it.")],
    layout: Annotated[str, typer.Option(help="paper, wide, backward or long.")] = "paper",
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
        text = render(read_rows(str(path)), layout, format)
        if output is not None:
            from bench.io import write_text

            write_text(output, text)
        else:
            typer.echo(text, nl=False)
    except (*_user_errors(), ValueError) as err:
        _fail(str(err))


@app.command()
def check(
    new: Annotated[Path, typer.Argument(help="New results.csv (or its directory).")],
    baseline: Annotated[Path, typer.Option(help="Baseline results.csv (or its directory).")],
    rules: Annotated[Optional[Path], typer.Option(help="YAML list of tolerance rules applied before the defaults.")] = None,
    show: Annotated[str, typer.Option(help="'changes' (non-ok rows) or 'all'.")] = "changes",
) -> None:
    """Compare NEW with BASELINE metric by metric; exit 1 if anything regressed."""
    try:
        from bench.check import compare, failed, load_rules
        from bench.tables import read_rows

        frames = []
        for path in (new, baseline):
            path = path / "results.csv" if path.is_dir() else path
            if not path.is_file():
                raise UserError(f"results file {path} not found")
            frames.append(read_rows(str(path)))
        if rules is not None and not rules.is_file():
            raise UserError(f"rules file {rules} not found")
        report = compare(frames[0], frames[1], load_rules(str(rules) if rules else None))
    except (*_user_errors(), ValueError) as err:
        _fail(str(err))
    _print_report(report if show == "all" else report[report["status"] != "ok"])
    bad = failed(report)
    counts = report["status"].value_counts().to_dict()
    typer.echo(f"{len(report)} metrics compared: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    if len(bad):
        typer.echo(f"REGRESSION: {len(bad)} metric(s) regressed", err=True)
        raise typer.Exit(1)


def _print_report(report) -> None:
    from rich.console import Console
    from rich.table import Table

    if not len(report):
        return
    table = Table("dataset", "method", "nfe", "metric", "baseline", "new", "delta", "tolerance", "status")
    style = {"regressed": "red", "flagged": "red", "missing": "red", "info": "yellow", "new": "cyan"}
    for r in report.itertuples(index=False):
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (r.old, r.new, r.delta, r.tol)]
        table.add_row(str(r.dataset), str(r.method), str(r.nfe), str(r.metric), *cells, r.status, style=style.get(r.status))
    Console(width=160).print(table)


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


def main() -> None:
    from bench.env import quiet_known_warnings

    quiet_known_warnings()
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_stop_signal)
    command = typer.main.get_command(app)
    try:
        status = command.main(standalone_mode=False)
    except typer.TyperException as err:  # the parser's usage errors: one line, as for our own
        context = getattr(err, "ctx", None)
        if type(err).__name__ != "NoArgsIsHelpError":  # a bare `f2d2-bench` has printed its help
            where = f" (see '{context.command_path} --help')" if context is not None else ""
            typer.echo(f"error: {err.format_message()}{where}", err=True)
        raise SystemExit(getattr(err, "exit_code", EXIT_USAGE)) from None
    except typer.Abort:
        if not _STOP_SIGNALS:
            typer.echo("aborted", err=True)
            raise SystemExit(1) from None
    except Exception:
        if not _STOP_SIGNALS:
            raise
        status = None  # a stop signal surfaced as another exception (torch: ValueError): reported below
    if _STOP_SIGNALS:  # also when typer turned an interrupt outside a command's handler into 130
        raise SystemExit(_say_stopped(_STOP_SIGNALS[0]))
    raise SystemExit(status if isinstance(status, int) else 0)


from bench import cli_import  # noqa: E402 - its commands use the helpers above

cli_import.register(app, sys.modules[__name__])

if __name__ == "__main__":
    main()
