"""The ``f2d2-bench`` command line.

Errors a user can cause (bad options, unknown names, missing files, bad checkpoints or configs)
print one line on stderr and exit with status 2, without a traceback and before writing anything.
The option parser's own errors get the same one-line form in :func:`main` (the console script).
Ctrl-C and SIGTERM print one line too and exit with 130 and 143, whatever exception the signal
surfaced as: torch's C++ can turn the KeyboardInterrupt raised inside a tensor constructor into a
ValueError ("could not determine the shape of object type ..."), so :func:`main` records every stop
signal it receives and reports the stop, never the side effect.

Under torchrun (``torchrun --nproc_per_node N $(which f2d2-bench) sweep ...``) the commands run on
every rank inside :func:`bench.dist.process_group`; rank 0 alone prints progress, errors and the
stop line, and writes files. A rank that loses its peers says so on its own line and exits 1.
"""

from __future__ import annotations

import os
import re
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
DEFAULT_OUT = "runs"  # ignored by git: a sweep never rewrites the committed results/ unless asked to


class UserError(Exception):
    """An error to report as one line, without a traceback."""


EXIT_PEER_LOST = 1


def _fail(message: str) -> None:
    from bench import dist

    if _STOP_SIGNALS:  # an error caused by Ctrl-C / SIGTERM arriving mid-call is the stop, not bad input
        raise typer.Exit(_say_stopped(_STOP_SIGNALS[0]))
    if dist.is_main():  # every rank finds the same bad option: one line, from rank 0
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


def _peer_lost():
    from bench.dist import PeerLost

    return PeerLost


def _lost(err: Exception) -> None:
    """A rank whose peers died says so on its own line (unless it is being stopped), exit 1."""
    if not _STOP_SIGNALS:
        typer.echo(f"error: {err}", err=True)
    raise typer.Exit(_say_stopped(_STOP_SIGNALS[0]) if _STOP_SIGNALS else EXIT_PEER_LOST)


def _training_processes(jobs: Optional[int]) -> int:
    """--jobs: independent CPU training processes (default one per core, at most 2), or 1 under
    torchrun (its ranks train each model together)."""
    from bench import dist

    if dist.launched():
        if jobs is not None and jobs > 1:
            raise UserError(f"--jobs {jobs} starts its own training processes; under torchrun the ranks train each model together: drop --jobs")
        return 1
    return jobs if jobs is not None else max(1, min(2, os.cpu_count() or 1))


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


ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _parse_checkpoints(items: list[str]) -> dict[str, str]:
    """METHOD=PATH or NAME=package.module:loader pairs from repeated --checkpoint options."""
    from bench.loaders import is_loader_spec

    pairs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--checkpoint expects METHOD=PATH or NAME=package.module:loader, got {item!r}")
        if is_loader_spec(path.strip()) and not ROW_NAME.match(name.strip()):
            raise UserError(f"--checkpoint {item!r}: row name {name.strip()!r} must be letters, digits and _ . + -")
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
    shortcuts: Optional[dict] = None,
    need_files: bool = True,
):
    """Profile defaults for the dataset, then the YAML file, then the command-line options
    (``shortcuts``: --metrics, --num-test, --num-samples, --steps). ``need_files=False`` (the cost
    plan) resolves a file-backed dataset without its files."""
    from dataclasses import replace

    from bench.config import ConfigError, apply_sweep_yaml, parse_nfe, read_sweep_yaml
    from bench.datasets import dataset_class, get_dataset
    from bench.loaders import is_loader_spec
    from bench.profiles import default_config

    data = {}
    if config is not None:
        if not config.is_file():
            raise UserError(f"sweep config {config} not found")
        data = read_sweep_yaml(str(config))
        if dataset is not None and data.get("dataset", dataset) != dataset:
            raise UserError(f"--dataset {dataset} contradicts dataset {data['dataset']!r} in {config}")
    name = dataset if dataset is not None else data.get("dataset", "checkerboard")
    dataset_class(str(name))
    if need_files:
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
        else:  # rows named by a loader join the named methods
            extra = tuple(n for n, spec in given.items() if is_loader_spec(spec) and n not in cfg.methods)
            cfg = replace(cfg, methods=cfg.methods + extra)
    cfg = _apply_shortcuts(cfg, shortcuts or {})
    loaders = {n for n, spec in cfg.checkpoints.items() if is_loader_spec(spec)}
    for name in [*cfg.methods, *cfg.method_options, *cfg.train_overrides, *cfg.checkpoints]:
        if name not in loaders:
            _parse_methods(name)
    where = f"{config}: " if config is not None else ""
    for name in (n for n in cfg.methods if n not in loaders):  # method options and training overrides fail now, naming the file
        try:
            cfg_method_config(cfg, name)
            cfg.train_for(name)
        except ConfigError as err:
            raise ConfigError(f"{where}{err}") from None
    return cfg


def _apply_shortcuts(cfg, shortcuts: dict):
    """--metrics, --num-test, --num-samples and --steps on top of the resolved config; --steps sets
    the training steps of every model (teacher and per-method overrides included)."""
    from dataclasses import replace

    from bench.config import merge

    if shortcuts.get("metrics") is not None:
        groups = tuple(g.strip() for g in shortcuts["metrics"].split(","))
        if not all(groups):
            raise UserError(f"--metrics must be a comma-separated list of metric groups, got {shortcuts['metrics']!r}")
        cfg = replace(cfg, eval=merge(cfg.eval, {"metrics": list(groups)}, "--metrics"))
    counts = {k: shortcuts.get(k) for k in ("num_test", "num_samples") if shortcuts.get(k) is not None}
    if counts:
        cfg = replace(cfg, eval=merge(cfg.eval, counts, "eval"))
    steps = shortcuts.get("steps")
    if steps is not None:
        cfg = replace(
            cfg,
            train=merge(cfg.train, {"steps": steps}, "train"),
            teacher_train=merge(cfg.teacher_train, {"steps": steps}, "teacher_train"),
            train_overrides={m: {**o, "steps": steps} for m, o in cfg.train_overrides.items()},
        )
    return cfg


def _check_options(jobs: Optional[int], out: str, cache_dir: Optional[Path] = None) -> Path:
    """Option values checked before any work starts (the parser only checks their types); returns
    --out as a path. --out is taken as a string because Path('') is silently the current directory."""
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs must be >= 1 (or left out: one per core, at most 2), got {jobs}")
    if not out.strip():
        raise UserError("--out must name a directory, got an empty string")
    if cache_dir is not None and str(cache_dir) in ("", "."):
        raise UserError("--cache-dir must name a directory")
    return Path(out)


@app.command()
def sweep(
    dataset: Annotated[Optional[str], typer.Option(help="Dataset name (see `f2d2-bench datasets`); default checkerboard.")] = None,
    nfe: Annotated[Optional[str], typer.Option(help="Comma-separated numbers of function evaluations, e.g. 1,2,4,8.")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated method names; 'all' stands for every registered one.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML sweep file (keys of SweepConfig) applied on top of the profile.")] = None,
    profile: Annotated[str, typer.Option(help="Budget profile: default, ci (tiny, for regression tracking), or paper (the authors' CIFAR-10 recipe; cifar10 only).")] = "default",
    out: Annotated[str, typer.Option(help="Results root; outputs go to OUT/DATASET/ (runs/ is ignored by git; the committed results/ is refreshed only when you name it).")] = DEFAULT_OUT,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Checkpoint cache (default OUT/checkpoints).")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Where file-backed datasets live.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    inception_weights: Annotated[Optional[Path], typer.Option(help="clean-fid's inception-2015-12-05.pt (or its folder) for FID on RGB data; default ~/.cache/f2d2-bench/.")] = None,
    checkpoint: Annotated[Optional[list[str]], typer.Option(help="METHOD=PATH: evaluate this trained checkpoint instead of training; NAME=package.module:loader: evaluate the FlowMap your function returns under row NAME (repeatable).")] = None,
    metrics: Annotated[Optional[str], typer.Option(help="Comma-separated metric groups: nll, calibration, quality, timing, mass, guidance (default: all the dataset supports).")] = None,
    num_test: Annotated[Optional[int], typer.Option(help="Test points for likelihoods (eval.num_test).")] = None,
    num_samples: Annotated[Optional[int], typer.Option(help="Samples for sample quality (eval.num_samples).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps of every model (teacher included); part of the cache key.")] = None,
    jobs: Annotated[Optional[int], typer.Option(help="Parallel training processes on CPU (default: one per core, at most 2).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the cost plan (see `f2d2-bench plan`) and exit; nothing runs or is written.")] = False,
) -> None:
    """Train what is missing, evaluate every method at every NFE, write results.csv and results.md."""
    from bench import dist

    try:
        out = _check_options(jobs, out, cache_dir)
        shortcuts = {"metrics": metrics, "num_test": num_test, "num_samples": num_samples, "steps": steps}
        cfg = _resolve_config(dataset, profile, config, nfe, methods, checkpoint, data_dir, shortcuts, need_files=not dry_run)
        if dry_run:
            text = _plan_text(cfg, out, cache_dir, data_dir, quiet)
            typer.echo(text, nl=False)
            return
        from bench.env import resolve_device
        from bench.sweep import check_writable, run_sweep

        dev = dist.rank_device(resolve_device(device))
        num_jobs = _training_processes(jobs)
        check_writable(out)
        with dist.process_group(dev), _reporter(quiet) as reporter:
            outcome = run_sweep(
                cfg, out, cache_dir=cache_dir, data_dir=str(data_dir) if data_dir else None,
                device=dev, jobs=num_jobs, reporter=reporter,
                inception_weights=str(inception_weights) if inception_weights else None,
            )
    except _user_errors() as err:
        _fail(str(err))
    except _peer_lost() as err:
        _lost(err)
    except ValueError as err:  # e.g. an unavailable device
        _fail(str(err))
    except KeyboardInterrupt as err:
        _interrupted(err)
    if not quiet and dist.is_main():
        typer.echo((outcome.out_dir / "results.md").read_text())
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in outcome.stage_s.items())
        typer.echo(f"wrote {outcome.out_dir}/results.csv and results.md ({stages})")


PLAN_TFLOPS, PLAN_MFU, PLAN_DOPRI5_NFE = 156.0, 0.30, 200  # A100 dense TF32 peak, a typical utilisation


@app.command()
def plan(
    dataset: Annotated[Optional[str], typer.Option(help="Dataset name; its files are not needed.")] = None,
    nfe: Annotated[Optional[str], typer.Option(help="Comma-separated numbers of function evaluations.")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated method names, or 'all'.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML sweep file applied on top of the profile.")] = None,
    profile: Annotated[str, typer.Option(help="Budget profile: default, ci, or paper (the authors' CIFAR-10 recipe; cifar10 only).")] = "default",
    out: Annotated[str, typer.Option(help="Results root (its checkpoint cache is inspected, nothing is written).")] = DEFAULT_OUT,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Checkpoint cache (default OUT/checkpoints).")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Accepted as by sweep; not read.")] = None,
    device: Annotated[str, typer.Option(help="Accepted as by sweep; the plan never uses a GPU.")] = "auto",
    inception_weights: Annotated[Optional[Path], typer.Option(help="Accepted as by sweep; not read.")] = None,
    checkpoint: Annotated[Optional[list[str]], typer.Option(help="METHOD=PATH: a trained checkpoint the sweep would evaluate (checked).")] = None,
    metrics: Annotated[Optional[str], typer.Option(help="Metric groups, as for sweep.")] = None,
    num_test: Annotated[Optional[int], typer.Option(help="Test points, as for sweep.")] = None,
    num_samples: Annotated[Optional[int], typer.Option(help="Samples, as for sweep.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps of every model, as for sweep.")] = None,
    jobs: Annotated[Optional[int], typer.Option(help="Accepted as by sweep.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress lines on stderr.")] = False,
    tflops: Annotated[float, typer.Option(help="Device peak throughput in TFLOP/s (default: A100 dense TF32).")] = PLAN_TFLOPS,
    mfu: Annotated[float, typer.Option(help="Assumed model FLOP utilisation, in (0, 1].")] = PLAN_MFU,
    dopri5_nfe: Annotated[int, typer.Option(help="Assumed network evaluations per dopri5 reference solve.")] = PLAN_DOPRI5_NFE,
) -> None:
    """Print what a sweep with these options would train or reuse and what it would cost (FLOPs,
    disk, GPU-hours), without data files, weights or a GPU; nothing is run or written."""
    try:
        out = _check_options(jobs, out, cache_dir)
        shortcuts = {"metrics": metrics, "num_test": num_test, "num_samples": num_samples, "steps": steps}
        cfg = _resolve_config(dataset, profile, config, nfe, methods, checkpoint, data_dir, shortcuts, need_files=False)
        text = _plan_text(cfg, out, cache_dir, data_dir, quiet, tflops, mfu, dopri5_nfe)
    except (*_user_errors(), ValueError) as err:
        _fail(str(err))
    except KeyboardInterrupt as err:
        _interrupted(err)
    typer.echo(text, nl=False)


def _plan_text(cfg, out: Path, cache_dir: Optional[Path], data_dir: Optional[Path], quiet: bool,
               tflops: float = PLAN_TFLOPS, mfu: float = PLAN_MFU, dopri5_nfe: int = PLAN_DOPRI5_NFE) -> str:
    """The cost plan of a resolved sweep config (``plan`` and ``sweep --dry-run``)."""
    from bench.plan import make_plan, render

    say = (lambda text: None) if quiet else (lambda text: typer.echo(text, err=True))
    result = make_plan(cfg, cache_dir or out / "checkpoints", str(data_dir) if data_dir else None,
                       tflops=tflops, mfu=mfu, dopri5_nfe=dopri5_nfe, progress=say)
    return render(result)


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

    from bench import dist

    if not _STOP_REPORTED and dist.is_main():
        what = "terminated" if signum == signal.SIGTERM else "interrupted"
        typer.echo(
            f"{what}: every file on disk is complete; rerun the same command to resume "
            "(finished models and evaluation cells are reused)",
            err=True,
        )
        _STOP_REPORTED.append(True)
    return 128 + signum


def _reporter(quiet: bool):
    """Progress on stderr, from rank 0 only."""
    from bench import dist
    from bench.progress import RichReporter, SilentReporter

    return SilentReporter() if quiet or not dist.is_main() else RichReporter()


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
    profile: Annotated[str, typer.Option(help="Budget profile: default, ci, or paper (the authors' CIFAR-10 recipe; cifar10 only).")] = "default",
    out: Annotated[str, typer.Option(help="Results root; outputs go to OUT/guidance/DATASET/.")] = DEFAULT_OUT,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Checkpoint cache (default OUT/checkpoints, shared with sweep).")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Where file-backed datasets live.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
) -> None:
    """Self-guidance: sample quality with and without one Adam step on the noise, per NFE and eta."""
    from bench import dist

    try:
        from dataclasses import replace

        from baselines import get_method
        from bench.env import resolve_device
        from bench.sweep import TEACHER, check_writable, run_sweep

        out = _check_options(None, out, cache_dir)
        cfg = _resolve_config(
            dataset, profile, config, nfe, f"{TEACHER},{method}" if method != TEACHER else TEACHER, None, data_dir
        )
        if not get_method(method).build(cfg_method_config(cfg, method)).capabilities.divergence_head:
            raise UserError(f"{method} has no divergence head; self-guidance needs one (e.g. meanflow-f2d2)")
        try:
            etas = tuple(float(v) for v in eta.split(","))
        except ValueError:
            raise UserError(f"--eta must be comma-separated numbers, got {eta!r}") from None
        if len(set(etas)) != len(etas):
            raise UserError(f"--eta has duplicated values: {eta}")
        cfg = replace(cfg, eval=replace(cfg.eval, guidance_etas=etas, guidance_prior=prior, guidance_steps=steps, teacher_steps=teacher_steps))
        dev = dist.rank_device(resolve_device(device))
        check_writable(out)
        with dist.process_group(dev), _reporter(quiet) as reporter:
            outcome = run_sweep(
                cfg, out / "guidance", cache_dir=cache_dir or out / "checkpoints",
                data_dir=str(data_dir) if data_dir else None, device=dev, reporter=reporter,
            )
        if not dist.is_main():  # rank 0 evaluated and writes
            return
        from bench.io import write_text
        from bench.tables import guidance_table, rows_frame

        text = guidance_table(rows_frame(outcome.rows))
        write_text(outcome.out_dir / "guidance.md", text)
    except _peer_lost() as err:
        _lost(err)
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


@app.command("reference-accuracy")
def reference_accuracy_command(
    dataset: Annotated[Optional[str], typer.Option(help="Dataset name; default checkerboard.")] = None,
    method: Annotated[str, typer.Option(help="Whose instantaneous field to solve (a trained checkpoint in the cache).")] = "flow-matching",
    rtol: Annotated[str, typer.Option(help="Comma-separated tolerances (rtol = atol); the tightest exact solve is the truth.")] = "1e-5,1e-6,1e-7,1e-9",
    estimator: Annotated[str, typer.Option(help="Comma-separated divergence estimators to compare (exact, hutchinson:P).")] = "exact",
    num_test: Annotated[Optional[int], typer.Option(help="Test points (default: the profile's eval.num_test).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML sweep file applied on top of the profile (to find the checkpoint).")] = None,
    profile: Annotated[str, typer.Option(help="Budget profile: default, ci, or paper (the authors' CIFAR-10 recipe; cifar10 only).")] = "default",
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


if __name__ == "__main__":
    main()
