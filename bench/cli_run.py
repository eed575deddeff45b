"""The commands that train and evaluate: ``sweep``, ``plan`` (and ``sweep --dry-run``), ``guide``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bench.cli_config import _check_options, _resolve_config, _training_processes, cfg_method_config
from bench.cli_core import (
    DEFAULT_OUT,
    UserError,
    _fail,
    _interrupted,
    _lost,
    _peer_lost,
    _reporter,
    _user_errors,
    app,
)

@app.command()
def sweep(
    dataset: Annotated[Optional[str], typer.Option(help="Dataset name (see `f2d2-bench datasets`); default checkerboard.")] = None,
    nfe: Annotated[Optional[str], typer.Option(help="Comma-separated numbers of function evaluations, e.g. 1,2,4,8.")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated method names; 'all' stands for every registered one.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML sweep file (keys of SweepConfig) applied on top of the profile.")] = None,
    profile: Annotated[str, typer.Option(help="Budget profile: default, ci (tiny, 2D, for regression tracking), paper (the authors' CIFAR-10 recipe; cifar10 only) or smoke (tiny images pipeline check).")] = "default",
    out: Annotated[str, typer.Option(help="Results root; outputs go to OUT/DATASET/ (runs/ is ignored by git; the committed results/ is refreshed only when you name it).")] = DEFAULT_OUT,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Checkpoint cache (default OUT/checkpoints).")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Where file-backed datasets live.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    inception_weights: Annotated[Optional[Path], typer.Option(help="clean-fid's inception-2015-12-05.pt (or its folder) for FID on RGB data; default ~/.cache/f2d2-bench/.")] = None,
    checkpoint: Annotated[Optional[list[str]], typer.Option(help="METHOD=PATH: evaluate this trained checkpoint instead of training; NAME=package.module:loader: evaluate the FlowMap your function returns under row NAME (repeatable).")] = None,
    teacher: Annotated[Optional[Path], typer.Option(help="A flow-matching checkpoint (e.g. from `f2d2-bench import torchcfm`) used as the teacher: --checkpoint flow-matching=DIR that keeps the methods to train.")] = None,
    metrics: Annotated[Optional[str], typer.Option(help="Comma-separated metric groups: nll, calibration, quality, timing, mass, guidance (default: all the dataset supports).")] = None,
    num_test: Annotated[Optional[int], typer.Option(help="Test points for likelihoods (eval.num_test).")] = None,
    num_samples: Annotated[Optional[int], typer.Option(help="Samples for sample quality (eval.num_samples).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps of every model (teacher included); part of the cache key.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Training batch of every model (the global batch under torchrun); part of the cache key.")] = None,
    jobs: Annotated[Optional[int], typer.Option(help="Parallel training processes on CPU (default: one per core, at most 2).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the cost plan (see `f2d2-bench plan`) and exit; nothing runs or is written.")] = False,
    record: Annotated[Optional[Path], typer.Option(help="Append this sweep (commit, machine, config hash, every metric row) to a JSON-lines history file.")] = None,
) -> None:
    """Train what is missing, evaluate every method at every NFE, write results.csv and results.md."""
    from bench import dist

    try:
        out = _check_options(jobs, out, cache_dir)
        shortcuts = {"metrics": metrics, "num_test": num_test, "num_samples": num_samples, "steps": steps, "batch_size": batch_size}
        cfg = _resolve_config(dataset, profile, config, nfe, methods, checkpoint, data_dir, shortcuts,
                              need_files=not dry_run, teacher=teacher)
        if dry_run:
            text = _plan_text(cfg, out, cache_dir, data_dir, quiet)
            typer.echo(text, nl=False)
            return
        from bench.env import resolve_device
        from bench.sweep import check_writable, run_sweep

        dev = dist.rank_device(resolve_device(device))
        num_jobs = _training_processes(jobs)
        check_writable(out)
        if record is not None:
            from bench.history import check_record_path

            check_record_path(record)
        with dist.process_group(dev), _reporter(quiet) as reporter:
            outcome = run_sweep(
                cfg, out, cache_dir=cache_dir, data_dir=str(data_dir) if data_dir else None,
                device=dev, jobs=num_jobs, reporter=reporter,
                inception_weights=str(inception_weights) if inception_weights else None,
            )
        if record is not None and dist.is_main():
            from bench.config import stable_hash
            from bench.history import record as record_sweep

            record_sweep(record, outcome.out_dir, stable_hash(cfg), profile)
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
    profile: Annotated[str, typer.Option(help="Budget profile: default, ci, paper (the authors' CIFAR-10 recipe) or smoke (tiny images pipeline check).")] = "default",
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
    batch_size: Annotated[Optional[int], typer.Option(help="Training batch of every model, as for sweep.")] = None,
    jobs: Annotated[Optional[int], typer.Option(help="Accepted as by sweep.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress lines on stderr.")] = False,
    tflops: Annotated[float, typer.Option(help="Device peak throughput in TFLOP/s (default: A100 dense TF32).")] = PLAN_TFLOPS,
    mfu: Annotated[float, typer.Option(help="Assumed model FLOP utilisation, in (0, 1].")] = PLAN_MFU,
    dopri5_nfe: Annotated[int, typer.Option(help="Assumed network evaluations per dopri5 reference solve.")] = PLAN_DOPRI5_NFE,
    output: Annotated[Optional[Path], typer.Option(help="Also write the plan to this file (atomically).")] = None,
) -> None:
    """Print what a sweep with these options would train or reuse and what it would cost (FLOPs,
    disk, GPU-hours), without data files, weights or a GPU; nothing is run or written (but --output)."""
    try:
        out = _check_options(jobs, out, cache_dir)
        if output is not None:
            from bench.sweep import check_writable

            if output.is_dir():
                raise UserError(f"--output {output} is a directory; give a file name")
            check_writable(output.parent, "--output directory")
        shortcuts = {"metrics": metrics, "num_test": num_test, "num_samples": num_samples, "steps": steps, "batch_size": batch_size}
        cfg = _resolve_config(dataset, profile, config, nfe, methods, checkpoint, data_dir, shortcuts, need_files=False)
        text = _plan_text(cfg, out, cache_dir, data_dir, quiet, tflops, mfu, dopri5_nfe)
        if output is not None:
            from bench.io import write_text

            write_text(output, text)
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
    profile: Annotated[str, typer.Option(help="Budget profile: default, ci, paper (the authors' CIFAR-10 recipe) or smoke (tiny images pipeline check).")] = "default",
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
