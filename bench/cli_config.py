"""Command-line options into a resolved :class:`~bench.config.SweepConfig`: profile defaults, then
the YAML file, then the options; option values are checked before any work starts."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from bench.cli_core import UserError

def _training_processes(jobs: Optional[int]) -> int:
    """--jobs: independent CPU training processes (default one per core, at most 2), or 1 under
    torchrun (its ranks train each model together)."""
    from bench import dist

    if dist.launched():
        if jobs is not None and jobs > 1:
            raise UserError(f"--jobs {jobs} starts its own training processes; under torchrun the ranks train each model together: drop --jobs")
        return 1
    return jobs if jobs is not None else max(1, min(2, os.cpu_count() or 1))

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
    teacher: Optional[Path] = None,
):
    """Profile defaults for the dataset, then the YAML file, then the command-line options
    (``shortcuts``: --metrics, --num-test, --num-samples, --steps). ``need_files=False`` (the cost
    plan) resolves a file-backed dataset without its files. ``teacher`` is ``--checkpoint
    flow-matching=DIR`` except that it never narrows the methods."""
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
    if teacher is not None:
        from bench.sweep import TEACHER

        if TEACHER in _parse_checkpoints(checkpoints or []):
            raise UserError(f"--teacher and --checkpoint {TEACHER}=... both name the teacher; give one")
        cfg = replace(cfg, checkpoints={**cfg.checkpoints, TEACHER: str(teacher)})
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
    """--metrics, --num-test, --num-samples, --steps and --batch-size on top of the resolved config;
    --steps and --batch-size set the training steps and batch of every model (teacher and
    per-method overrides included)."""
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
    train = {k: shortcuts[k] for k in ("steps", "batch_size") if shortcuts.get(k) is not None}
    if train:
        cfg = replace(
            cfg,
            train=merge(cfg.train, train, "train"),
            teacher_train=merge(cfg.teacher_train, train, "teacher_train"),
            train_overrides={m: {**o, **train} for m, o in cfg.train_overrides.items()},
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

def cfg_method_config(cfg, method: str):
    from baselines import get_method
    from bench.config import merge

    return merge(get_method(method).config, cfg.options_for(method), f"method_options.{method}")
