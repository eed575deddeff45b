"""Trust (issue 5): safe checkpoints, crash-safe sweeps, clear errors on bad input.

Every bad input must give exactly one ``error: ...`` line on stderr, exit status 2, no traceback,
and write nothing. Sweeps interrupted by SIGINT or SIGKILL must leave only complete files and,
rerun, reach the same numbers as an uninterrupted run (wall-clock metrics excepted).

Sweeps run in subprocesses with one torch thread: on this shared two-core machine two threads
competing with other work made training steps up to seventy times slower, and every run of a
comparison uses the same setting.

Set F2D2_BAD_INPUT_TABLE=path to have ``test_bad_input_table`` write the observed stderr line and
exit status of every bad-input case there (Markdown).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from bench.checkpoint import META, CheckpointError, read_tensors
from bench.cli import app
from bench.config import SweepConfig

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "bench.cli"]
METHODS = ("flow-matching", "meanflow", "meanflow-f2d2")
EXIT_USAGE = 2
POLL_S = 0.02
RUN_TIMEOUT_S = 600
TABLE_ENV = "F2D2_BAD_INPUT_TABLE"
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# tests/test_cli.py's budgets; figures (if this version draws them) cost seconds and are not under test
TINY = """
methods: [flow-matching, meanflow, meanflow-f2d2]
teacher_train: {steps: 150, batch_size: 256, warmup_steps: 10, checkpoint_every: 100}
train: {steps: 150, batch_size: 128, warmup_steps: 10, checkpoint_every: 100}
eval: {num_test: 200, num_samples: 200, batch_size: 200, num_repeats: 2}
""" + ("figures: false\n" if "figures" in {f.name for f in dataclasses.fields(SweepConfig)} else "")
# checkpoint_every is bookkeeping (outside the cache key): more partial checkpoints, same weights
TINY_FREQUENT_CHECKPOINTS = TINY.replace("checkpoint_every: 100", "checkpoint_every: 25")


def is_wall_clock(metric: str) -> bool:
    return metric.endswith("_wall_s") or metric == "nll_speedup"


# Subprocess sweeps ----------------------------------------------------------------------------


def sweep_args(config: Path, out: Path) -> list[str]:
    """The one tiny command every crash and determinism test runs (progress output on)."""
    return [
        "sweep", "--dataset", "checkerboard", "--nfe", "1,2", "--config", str(config), "--out", str(out), "--jobs", "1",
    ]


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )


def run_until(args: list[str], ready: Callable[[], bool], sig: int, logs: Path) -> int:
    """Start the CLI, send ``sig`` as soon as ``ready()`` holds, return its exit status.
    Output goes to files so that a full pipe can never stall the child while we poll."""
    with open(logs / "stdout.txt", "w") as out, open(logs / "stderr.txt", "w") as err:
        proc = subprocess.Popen([*CLI, *args], cwd=REPO, env=SUBPROCESS_ENV, stdout=out, stderr=err)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(f"sweep ended (status {proc.returncode}) before the interruption point")
            time.sleep(POLL_S)
        proc.send_signal(sig)
        return proc.wait(timeout=120)


def partial_checkpoint(root: Path, method: str) -> bool:
    for path in root.glob(f"checkpoints/*/*/{META}"):
        try:
            meta = json.loads(path.read_text())
            if meta["method"] == method and meta["complete"] is False:
                return True
        except (OSError, ValueError, KeyError):
            continue  # not there yet
    return False


def audit(root: Path) -> dict:
    """Every file under ``root`` is complete: no temporary files, JSON/CSV/NPZ parse, and every
    checkpoint's weights match the sha256 in its metadata."""
    report = {"tmp": [], "broken": [], "checkpoints": {}}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if re.fullmatch(r"\..*\.tmp", path.name):
            report["tmp"].append(str(path))
            continue
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".csv":
                pd.read_csv(path)
            elif path.suffix == ".yaml":
                yaml.safe_load(path.read_text())
            elif path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as npz:
                    [npz[name] for name in npz.files]
            if path.name == META:
                read_tensors(path.parent)
                report["checkpoints"][path.parent.name] = json.loads(path.read_text())
        except (ValueError, OSError, CheckpointError, yaml.YAMLError) as err:
            report["broken"].append(f"{path}: {err}")
    return report


def assert_same_numbers(new: pd.DataFrame, ref: pd.DataFrame) -> None:
    """Same rows in the same order and every column equal, except values of wall-clock metrics."""
    key = ["dataset", "method", "nfe", "metric"]
    assert list(new.columns) == list(ref.columns)
    assert new[key].values.tolist() == ref[key].values.tolist()
    wall = ref["metric"].map(is_wall_clock)
    assert wall.sum() >= len(METHODS) and (~wall).sum() >= 20 * len(METHODS)
    a, b = new.reset_index(drop=True), ref.reset_index(drop=True)
    same = (a == b) | (a.isna() & b.isna())
    same.loc[wall, ["value", "stderr"]] = True
    bad = ~same.all(axis=1)
    table = pd.concat({"new": a[bad], "reference": b[bad]}, axis=1).to_string()
    assert not bad.any(), f"{bad.sum()} rows differ:\n{table}"


def results(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "checkerboard" / "results.csv")


def env_of(out: Path) -> dict:
    return json.loads((out / "checkerboard" / "env.json").read_text())


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def frequent_config(config) -> Path:
    path = config.parent / "tiny-frequent-checkpoints.yaml"
    path.write_text(TINY_FREQUENT_CHECKPOINTS)
    return path


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> Path:
    """The uninterrupted tiny sweep (three methods, two NFEs): the yardstick of the crash tests."""
    out = tmp_path_factory.mktemp("reference") / "A"
    done = run_cli(sweep_args(config, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(env_of(out)["trained"]) == sorted(METHODS)
    return out


@pytest.fixture(scope="module")
def teacher_dir(reference) -> Path:
    (path,) = (reference / "checkpoints" / "checkerboard").glob("flow-matching-*")
    return path


def tiny_job(dataset: str, cache: Path, **train):
    """A flow-matching training job on ``dataset`` with a few-step budget."""
    from baselines import get_method
    from bench.config import ModelConfig, TrainConfig
    from bench.datasets import dataset_class
    from bench.jobs import Job

    scales = dataset_class(dataset)
    budget = TrainConfig(**{"steps": 5, "batch_size": 64, "warmup_steps": 1, **train})
    return Job(
        "flow-matching", get_method("flow-matching").config, ModelConfig(), budget, dataset, None,
        scales.kappa, scales.sigma_0, None, str(cache),
    )


def train_in_process(job) -> Path:
    from bench.jobs import run_job

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the module docstring
    try:
        return run_job(job)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gaussians_dir(tmp_path_factory) -> Path:
    """A flow-matching checkpoint of 8gaussians (2D like checkerboard), five steps."""
    return train_in_process(tiny_job("8gaussians", tmp_path_factory.mktemp("cache")))


# Bad input ------------------------------------------------------------------------------------


class Skip(Exception):
    """A case that cannot be set up here (e.g. permissions under root)."""


def copy_checkpoint(src: Path, dst: Path, edit: Callable[[dict], None] | None = None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        meta = json.loads((dst / META).read_text())
        edit(meta)
        (dst / META).write_text(json.dumps(meta))
    return dst


def truncated(tmp: Path, request) -> tuple:
    ckpt = copy_checkpoint(request.getfixturevalue("teacher_dir"), tmp / "ckpt")
    weights = ckpt / json.loads((ckpt / META).read_text())["weights_file"]
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return ["--checkpoint", f"flow-matching={ckpt}"], [str(weights)]


def edited(method: str, edit: Callable[[dict], None] | None, *names: str) -> Callable:
    """A copy of the reference teacher, its metadata edited, given as ``method``."""

    def build(tmp: Path, request) -> tuple:
        ckpt = copy_checkpoint(request.getfixturevalue("teacher_dir"), tmp / "ckpt", edit)
        return ["--checkpoint", f"{method}={ckpt}"], [str(ckpt / META), *names]

    return build


def malformed(tmp: Path, request) -> tuple:
    ckpt = copy_checkpoint(request.getfixturevalue("teacher_dir"), tmp / "ckpt")
    (ckpt / META).write_text('{"method": "flow-matching", "dataset": ')
    return ["--checkpoint", f"flow-matching={ckpt}"], [str(ckpt / META), "JSON"]


def other_dataset(tmp: Path, request) -> tuple:
    ckpt = copy_checkpoint(request.getfixturevalue("gaussians_dir"), tmp / "ckpt")
    return ["--dataset", "checkerboard", "--checkpoint", f"flow-matching={ckpt}"], [str(ckpt / META), "8gaussians"]


def yaml_file(text: str, *names: str) -> Callable:
    def build(tmp: Path, request) -> tuple:
        path = tmp / "sweep.yaml"
        path.write_text(text)
        return ["--config", str(path)], [str(path), *names]

    return build


def missing_data(tmp: Path, request) -> tuple:
    data = tmp / "nonexistent"
    return ["--dataset", "mnist", "--data-dir", str(data)], [str(data / "mnist"), "train-images-idx3-ubyte"]


def missing_inception_weights(tmp: Path, request) -> tuple:
    from test_images import write_cifar  # the real CIFAR-10 archive format, in miniature

    data, weights, config = tmp / "data", tmp / "weights" / "inception-2015-12-05.pt", tmp / "sweep.yaml"
    data.mkdir()
    write_cifar(data, as_archive=True)
    # a tiny model and budget: should the check move after training again, this fails in
    # seconds ("files were written") instead of training a GPU-sized UNet on the CPU
    config.write_text(
        "methods: [flow-matching]\nmodel: {channels: 8, channel_mult: [1]}\n"
        "teacher_train: {steps: 2, batch_size: 4, warmup_steps: 1}\n"
    )
    args = ["--dataset", "cifar10", "--config", str(config), "--nfe", "1", "--data-dir", str(data),
            "--inception-weights", str(weights)]
    return args, [str(weights), "--inception-weights"]


def out_is_file(tmp: Path, request) -> tuple:
    out = tmp / "results"
    out.write_text("not a directory\n")
    return [], [str(out)], out


def cache_is_file(tmp: Path, request) -> tuple:
    cache, config = tmp / "cache", tmp / "sweep.yaml"
    cache.write_text("not a directory\n")
    config.write_text("methods: [flow-matching]\nteacher_train: {steps: 5, batch_size: 32, warmup_steps: 1}\n")
    return ["--config", str(config), "--nfe", "1", "--cache-dir", str(cache)], [str(cache)]


def out_unwritable(tmp: Path, request) -> tuple:
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):
        raise Skip("running as root: a 0o500 directory stays writable")
    return [], [str(locked / "out")], locked / "out"


def _del(key: str) -> Callable[[dict], None]:
    return lambda meta: meta.pop(key)


def _set(key: str, value) -> Callable[[dict], None]:
    return lambda meta: meta.__setitem__(key, value)


def _datasets() -> list[str]:
    from bench.datasets import DATASETS

    return list(DATASETS)


def _methods() -> list[str]:
    from baselines import METHODS as REGISTERED

    return list(REGISTERED)


# case -> builder(tmp_path, request) -> (extra args, substrings the error line must hold[, --out])
CASES: dict[str, Callable] = {
    "nfe=0": lambda tmp, request: (["--nfe", "0"], ["nfe", "0"]),
    "nfe=-1": lambda tmp, request: (["--nfe", "-1"], ["nfe", "-1"]),
    "nfe=abc": lambda tmp, request: (["--nfe", "abc"], ["nfe", "abc"]),
    "nfe=(empty)": lambda tmp, request: (["--nfe", ""], ["nfe"]),
    "nfe=1,2,2": lambda tmp, request: (["--nfe", "1,2,2"], ["nfe", "duplicate"]),
    "unknown dataset": lambda tmp, request: (["--dataset", "cifar11"], ["cifar11", *_datasets()]),
    "unknown method": lambda tmp, request: (["--methods", "meanflow,nope"], ["nope", *_methods()]),
    "checkpoint: missing path": lambda tmp, request: (
        ["--checkpoint", f"meanflow={tmp / 'no-such-checkpoint'}"], [str(tmp / "no-such-checkpoint")]
    ),
    "checkpoint: truncated weights": truncated,
    "checkpoint: other method": edited("meanflow", None, "flow-matching", "meanflow"),
    "checkpoint: other dataset": other_dataset,
    "checkpoint: other data shape": edited("flow-matching", _set("data_shape", [3]), "shape"),
    "checkpoint: field removed": edited("flow-matching", _del("data_shape"), "data_shape"),
    "checkpoint: malformed json": malformed,
    "checkpoint: field of wrong type": edited("flow-matching", _set("data_shape", None), "data_shape"),
    "yaml: unknown key": yaml_file("train: {stepz: 5}\n", "train.stepz"),
    "yaml: wrong type": yaml_file("train: {steps: many}\n", "train.steps"),
    "missing data dir": missing_data,
    "missing inception weights": missing_inception_weights,  # before any training
    "out: unwritable dir": out_unwritable,
    "out: regular file": out_is_file,
    "cache dir: regular file": cache_is_file,
    # option values are checked before any work starts (issue 15: each of these once started a sweep)
    "device=tpu9": lambda tmp, request: (["--device", "tpu9"], ["tpu9", "cpu", "cuda"]),
    "device=cuda:7 (absent)": lambda tmp, request: (["--device", "cuda:7"], ["cuda:7"]),
    "jobs=0": lambda tmp, request: (["--jobs", "0"], ["--jobs", "0"]),
    "jobs=-3": lambda tmp, request: (["--jobs", "-3"], ["--jobs", "-3"]),
    "dataset=(empty)": lambda tmp, request: (["--dataset", ""], ["unknown dataset", "checkerboard"]),
    "nfe=99999999999999999999": lambda tmp, request: (["--nfe", "99999999999999999999"], ["nfe", "4096"]),
    "nfe=1,5000": lambda tmp, request: (["--nfe", "1,5000"], ["nfe", "4096", "5000"]),
    "metrics: unknown group": lambda tmp, request: (
        ["--metrics", "nll,fidd"], ["fidd", "nll", "calibration", "quality", "timing", "mass", "guidance"]
    ),
    "metrics: empty item": lambda tmp, request: (["--metrics", "nll,,quality"], ["--metrics"]),
    "metrics: duplicated": lambda tmp, request: (["--metrics", "nll,nll"], ["duplicated"]),
    "metrics: guidance without etas": lambda tmp, request: (["--metrics", "guidance"], ["guidance_etas"]),
    "num-test=0": lambda tmp, request: (["--num-test", "0"], ["num_test", "0"]),
    "num-samples=1e11": lambda tmp, request: (["--num-samples", "100000000000"], ["num_samples"]),
    "steps=0": lambda tmp, request: (["--steps", "0"], ["steps", "0"]),
    "out=(empty)": lambda tmp, request: (["--out", ""], ["--out"]),
    "checkpoint: loader module missing": lambda tmp, request: (["--checkpoint", "mine=nosuchpkg.models:load"], ["nosuchpkg"]),
    "checkpoint: loader returns no FlowMap": lambda tmp, request: (["--checkpoint", "mine=os:getcwd"], ["os:getcwd", "FlowMap"]),
    "yaml: NaN learning rate": yaml_file("train: {lr: .nan}\n", "train.lr", "finite"),
    "yaml: infinite kappa": yaml_file("kappa: .inf\n", "kappa", "finite"),
    "yaml: zero-width network": yaml_file("model: {hidden: 0}\n", "model.hidden"),
    "yaml: no gradient step (grad_clip 0)": yaml_file("train: {grad_clip: 0}\n", "train.grad_clip"),
    "yaml: negative rtol": yaml_file("eval: {rtol: -1}\n", "eval.rtol"),
    "yaml: a 10^12-step Euler reference": yaml_file("eval: {reference_solver: 'euler:999999999999'}\n", "reference_solver"),
    "yaml: one mass sample": yaml_file("eval: {num_mass: 1}\n", "num_mass"),
    "steps=10^20": lambda tmp, request: (["--steps", "99999999999999999999"], ["train.steps"]),
}


@dataclasses.dataclass
class Observed:
    case: str
    stderr: str
    exit_code: int
    problems: list[str]


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def invoke(args: list[str], in_process: bool) -> tuple[int, str, str, str]:
    """(exit status, stdout, stderr, the uncaught exception if the CLI crashed in-process)."""
    if in_process:
        result = CliRunner().invoke(app, args)
        crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
        return result.exit_code, result.stdout, result.stderr, repr(result.exception) if crashed else ""
    done = run_cli(args)
    return done.returncode, done.stdout, done.stderr, ""


# Errors the option parser itself finds. Only the console script formats them as one line
# (bench.cli.main); typer's in-process runner keeps its own boxed format, so they run as processes.
PARSER_CASES: dict[str, Callable] = {
    "flag with a value": lambda tmp, request: (["--nfe", "1", "--quiet=maybe"], ["--quiet"]),
    "unknown option": lambda tmp, request: (["--nfe", "1", "--nfee", "2"], ["--nfee"]),
}


def observe(case: str, tmp: Path, request, in_process: bool = True) -> Observed:
    """Run one bad-input case through the CLI (with its default progress output) and list every
    way it breaks the contract: status 2, one 'error: ' line naming the culprit, nothing written."""
    built = {**CASES, **PARSER_CASES}[case](tmp, request)
    extra, names, out = (*built, tmp / "out") if len(built) == 2 else built
    existed, before = out.exists(), snapshot(tmp)
    # the case's own options come last: for a repeated option the last value wins
    code, stdout, stderr, crash = invoke(["sweep", "--out", str(out), "--jobs", "1", *extra], in_process)
    lines, problems = stderr.splitlines(), []
    if code != EXIT_USAGE:
        problems.append(f"exit status {code}, expected {EXIT_USAGE}")
    if len(lines) != 1 or not lines[0].startswith("error: "):
        problems.append(f"stderr has {len(lines)} line(s), expected one 'error: ' line")
    missing = [name for name in names if not any(name in line for line in lines if line.startswith("error: "))]
    if missing:
        problems.append(f"error line does not name {missing}")
    if crash or "Traceback" in stdout + stderr:
        problems.append(f"crashed: {crash or (stdout + stderr)[-2000:]!r}")
    if out.exists() != existed or snapshot(tmp) != before:
        problems.append("files were written or changed")
    return Observed(case, stderr, code, problems)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_error_line_exit_2_nothing_written(case, tmp_path, request, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a case that wrongly starts a sweep writes where the snapshot sees it
    try:
        seen = observe(case, tmp_path, request)
    except Skip as why:
        pytest.skip(str(why))
    assert not seen.problems, "\n".join([*seen.problems, f"stderr: {seen.stderr!r}"])


@pytest.mark.parametrize("case", ["nfe=0", "checkpoint: other method", *PARSER_CASES])
def test_bad_input_in_a_real_process(case, tmp_path, request):
    """A real process: no warnings or tracebacks leak onto stderr around the error line."""
    seen = observe(case, tmp_path, request, in_process=False)
    assert not seen.problems, "\n".join([*seen.problems, f"stderr: {seen.stderr!r}"])


def test_bad_input_table(tmp_path, request):
    """Every case at once; writes the observed table to $F2D2_BAD_INPUT_TABLE if set."""
    observed = []
    for number, case in enumerate(CASES):
        tmp = tmp_path / f"case{number}"
        tmp.mkdir()
        try:
            observed.append(observe(case, tmp, request))
        except Skip as why:
            observed.append(Observed(case, f"(skipped: {why})", -1, []))
    if os.environ.get(TABLE_ENV):
        rows = ["| case | exit | stderr (repr) | contract violations |", "|---|---|---|---|"]
        for seen in observed:
            cells = [seen.case, str(seen.exit_code), f"`{seen.stderr!r}`", "; ".join(seen.problems) or "none"]
            rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        Path(os.environ[TABLE_ENV]).write_text("\n".join(rows) + "\n")
    failures = {seen.case: seen.problems for seen in observed if seen.problems}
    assert len(observed) == len(CASES) and not failures, json.dumps(failures, indent=1)


# Crash safety, resume and determinism -----------------------------------------------------------


def test_sigint_after_first_cell_leaves_complete_files_and_resumes_exactly(config, reference, tmp_path):
    """SIGINT once the first evaluation cell is written: nothing half-written; the rerun trains
    nothing, reuses the finished cells and ends with the uninterrupted numbers."""
    out = tmp_path / "B"
    cells = out / "checkerboard" / "cells"
    status = run_until(sweep_args(config, out), lambda: any(cells.glob("*.json")), signal.SIGINT, tmp_path)
    said = (tmp_path / "stderr.txt").read_text()
    assert status == 130 and not (out / "checkerboard" / "results.csv").exists(), f"not interrupted ({status}): {said[-3000:]}"
    assert "interrupted: every file on disk is complete; rerun the same command" in said and "Traceback" not in said, said
    found = audit(out)
    assert found["tmp"] == [] and found["broken"] == [], found
    assert len(found["checkpoints"]) == len(METHODS)
    done_cells = sorted(p.stem for p in cells.glob("*.json"))
    assert 1 <= len(done_cells) < len(METHODS)
    kept = {name: (cells / f"{name}.json").read_bytes() for name in done_cells}

    rerun = run_cli(sweep_args(config, out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    env = env_of(out)
    assert env["trained"] == [] and sorted(env["reused_cells"]) == done_cells
    assert all((cells / f"{name}.json").read_bytes() == data for name, data in kept.items())
    final = audit(out)
    assert final["tmp"] == [] and final["broken"] == [], final
    assert_same_numbers(results(out), results(reference))


def test_sigkill_during_training_resumes_bit_for_bit(frequent_config, reference, tmp_path):
    """SIGKILL while the second method trains (teacher complete, meanflow partial): what is on
    disk verifies; the rerun reuses the teacher, resumes meanflow (reported as partial) and
    reaches the uninterrupted weights and numbers."""
    out = tmp_path / "D"
    killed = run_until(
        sweep_args(frequent_config, out), lambda: partial_checkpoint(out, "meanflow"), signal.SIGKILL, tmp_path
    )
    assert killed == -signal.SIGKILL
    found = audit(out)
    assert found["broken"] == [], found
    state = {meta["method"]: (meta["complete"], meta["step"]) for meta in found["checkpoints"].values()}
    assert state["flow-matching"] == (True, 150) and not state["meanflow"][0] and 0 < state["meanflow"][1] < 150, state

    rerun = run_cli(sweep_args(frequent_config, out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    stages = " ".join(rerun.stderr.split())  # rich wraps long lines
    assert "flow-matching [complete], meanflow [partial], meanflow-f2d2 [missing]" in stages, stages[-3000:]
    env = env_of(out)
    assert env["trained"] == ["meanflow", "meanflow-f2d2"] and env["reused_cells"] == []
    final = audit(out)
    assert final["tmp"] == [] and final["broken"] == [], final
    assert sha256s(final) == sha256s(audit(reference))
    assert_same_numbers(results(out), results(reference))


def group_ends(pgid: int, within_s: float) -> bool:
    """True once no process of the group is left (an exited helper may linger briefly as a
    zombie until init reaps it); False if one is still there after ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_stopping_parallel_training_stops_every_worker(stop, tmp_path):
    """A terminal Ctrl-C reaches the whole process group; a scheduler's SIGTERM reaches the main
    process only. Either way, with two training workers and a third job queued, the sweep must
    stop both workers where they are (their periodic checkpoints stay valid), never start the
    queued job, and leave no process or temporary file behind."""
    config = tmp_path / "three.yaml"
    long_students = TINY_FREQUENT_CHECKPOINTS.replace(  # long enough that no student finishes first
        "\ntrain: {steps: 150,", "\ntrain: {steps: 20000,"
    ).replace("methods: [flow-matching, meanflow, meanflow-f2d2]", "methods: [flow-matching, meanflow, meanflow-f2d2, shortcut]")
    assert "teacher_train: {steps: 150," in long_students and "\ntrain: {steps: 20000," in long_students
    config.write_text(long_students)
    out = tmp_path / "E"
    args = [*sweep_args(config, out)[:-2], "--jobs", "2"]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            [*CLI, *args], cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True,  # its own process group, as a terminal's foreground job
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # in case ours is ignored
        )
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (partial_checkpoint(out, "meanflow") and partial_checkpoint(out, "meanflow-f2d2")):
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"sweep ended (status {proc.wait()}) before both workers saved a checkpoint")
            time.sleep(POLL_S)
        if stop == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the sweep did not stop within 120 s")
    said = (tmp_path / "stderr.txt").read_text()
    expected = {"ctrl-c": (130, "interrupted"), "sigterm": (143, "terminated")}[stop]
    assert (status, said.strip().splitlines()[-1].split(":")[0]) == expected, said
    assert "every file on disk is complete" in said and "Traceback" not in said, said
    assert group_ends(proc.pid, within_s=30), "a process of the sweep outlived it"
    found = audit(out)
    assert found["tmp"] == [] and found["broken"] == [], found
    state = {meta["method"]: meta["complete"] for meta in found["checkpoints"].values()}
    assert state == {"flow-matching": True, "meanflow": False, "meanflow-f2d2": False}, state


# Torch can turn the KeyboardInterrupt raised inside its C++ into another exception (seen in CI:
# a SIGINT during a checkpoint load ended the sweep with "error: could not determine the shape of
# object type 'torch.storage.UntypedStorage'", status 2). This stands in for that conversion.
SIGNAL_SURFACES_AS_VALUE_ERROR = """
import os, signal, sys, time
import bench.sweep
from bench.cli import main

def run_sweep(*args, **kwargs):
    try:
        os.kill(os.getpid(), signal.{sig})
        time.sleep(30)
    except KeyboardInterrupt:
        raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")
    raise AssertionError("the signal did not arrive")

bench.sweep.run_sweep = run_sweep
sys.argv = ["f2d2-bench", "sweep", "--profile", "ci", "--out", sys.argv[1], "--quiet"]
main()
"""


@pytest.mark.parametrize("sig, expected", [("SIGINT", (130, "interrupted")), ("SIGTERM", (143, "terminated"))])
def test_a_stop_signal_is_reported_as_a_stop_whatever_exception_it_surfaced_as(sig, expected, tmp_path):
    """Ctrl-C / SIGTERM is reported as the stop (one line, 130 / 143), not as the bad-input error
    that the exception torch turned it into would otherwise give (status 2)."""
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_SURFACES_AS_VALUE_ERROR.format(sig=sig), str(tmp_path / "out")],
        cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    lines = done.stderr.strip().splitlines()
    assert (done.returncode, lines[-1].split(":")[0] if lines else "") == expected, done.stderr
    assert len(lines) == 1 and "every file on disk is complete" in lines[0], done.stderr


def sha256s(found: dict) -> dict[str, str]:
    return {name: meta["sha256"] for name, meta in found["checkpoints"].items()}


def test_training_removes_what_a_killed_save_left(tmp_path):
    """SIGKILL during a save leaves the save's temporary file (no cleanup can run); the next
    training of that model deletes it and still reaches the uninterrupted weights."""
    clean = train_in_process(tiny_job("checkerboard", tmp_path / "clean", steps=10, checkpoint_every=5))
    job = tiny_job("checkerboard", tmp_path / "killed", steps=10, checkpoint_every=5)
    job.directory.mkdir(parents=True)
    stale = [job.directory / ".weights-0123456789abcdef.safetensors.k3j9x.tmp", job.directory / ".checkpoint.json.a8b2c.tmp"]
    for path in stale:
        path.write_bytes(b"half a save")
    keep = job.directory / "notes.txt"  # not ours to delete
    keep.write_text("user file")
    done = train_in_process(job)
    assert not any(path.exists() for path in stale) and keep.read_text() == "user file"
    assert json.loads((done / META).read_text())["sha256"] == json.loads((clean / META).read_text())["sha256"]


def test_interrupt_between_the_two_checkpoint_files_stays_resumable(tmp_path, monkeypatch):
    """Ctrl-C (or a kill) can land after a checkpoint's new weights replaced the old ones and
    before its metadata did; the job must still resume (or restart) and reach the same weights."""
    import bench.checkpoint

    clean = train_in_process(tiny_job("checkerboard", tmp_path / "clean", steps=20, checkpoint_every=5))
    job = tiny_job("checkerboard", tmp_path / "interrupted", steps=20, checkpoint_every=5)
    write_json, calls = bench.checkpoint.write_json, []

    def metadata_interrupted(path, data):
        calls.append(data["step"])
        if len(calls) == 2:  # the step-10 weights are on disk, their metadata is not
            raise KeyboardInterrupt
        write_json(path, data)

    monkeypatch.setattr(bench.checkpoint, "write_json", metadata_interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(job)
    monkeypatch.setattr(bench.checkpoint, "write_json", write_json)
    assert calls == [5, 10] and job.status() == "partial"
    resumed = train_in_process(job)
    assert json.loads((resumed / META).read_text())["sha256"] == json.loads((clean / META).read_text())["sha256"]


def test_same_command_twice_gives_identical_numbers(config, reference, tmp_path):
    out = tmp_path / "C"
    again = run_cli(sweep_args(config, out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(env_of(out)["trained"]) == sorted(METHODS)  # fresh cache: really trained again
    assert sha256s(audit(out)) == sha256s(audit(reference))
    assert_same_numbers(results(out), results(reference))


# Regression check ------------------------------------------------------------------------------


def check(*args: str):
    return CliRunner().invoke(app, ["check", *args])


def test_check_passes_on_identical_results(reference, tmp_path):
    baseline = tmp_path / "baseline.csv"
    shutil.copy(reference / "checkerboard" / "results.csv", baseline)
    result = check(str(reference / "checkerboard"), "--baseline", str(baseline))
    assert result.exit_code == 0, result.output
    num_rows = len(results(reference))
    assert f"{num_rows} metrics compared: {num_rows} ok" in result.stdout


def test_check_fails_naming_a_degraded_nll(reference, tmp_path):
    frame = results(reference)
    nll = frame[(frame.metric == "nll_nats") & frame.stderr.notna()]
    row = nll.stderr.idxmin()  # the tightest row, so +1 nat is far beyond its 3-sigma tolerance
    assert 3 * np.sqrt(2) * frame.loc[row, "stderr"] < 1.0
    frame.loc[row, "value"] += 1.0
    degraded = tmp_path / "results.csv"
    frame.to_csv(degraded, index=False)
    result = check(str(degraded), "--baseline", str(reference / "checkerboard" / "results.csv"))
    assert result.exit_code == 1, result.output
    cells = [line.split("│")[1:-1] for line in result.stdout.splitlines() if line.startswith("│")]
    regressed = [[c.strip() for c in cell] for cell in cells if cell[-1].strip() == "regressed"]
    method, nfe = frame.loc[row, "method"], frame.loc[row, "nfe"]
    assert len(regressed) == 1, result.stdout
    assert regressed[0][1:4] == [method, str(nfe), "nll_nats"], regressed
    assert float(regressed[0][6]) == pytest.approx(1.0)  # the delta column
    assert f"{len(frame) - 1} ok, 1 regressed" in result.stdout
    assert "REGRESSION: 1 metric(s) regressed" in result.stderr


def test_check_missing_baseline_is_a_usage_error(reference, tmp_path):
    missing = tmp_path / "nowhere" / "results.csv"
    result = check(str(reference / "checkerboard"), "--baseline", str(missing))
    assert result.exit_code == EXIT_USAGE
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "nowhere").exists()


def test_atomic_writes_get_ordinary_permissions_and_leave_nothing_on_failure(tmp_path):
    """Results are renamed from mkstemp files (mode 0600); they must end with the mode an ordinary
    write gives (0666 minus the umask), and a failed writer must leave neither target nor temp."""
    from bench.io import write_text, write_with

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.md", "x\n")
        assert (tmp_path / "a.md").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        write_text(tmp_path / "b.md", "y\n")
        assert (tmp_path / "b.md").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)

    def failing(path: Path) -> None:
        path.write_text("half")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        write_with(tmp_path / "c.md", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "b.md"]


# guide: its own options, the same contract (one error line, exit 2, nothing written)
GUIDE_CASES = {
    "eta=nan": (["--eta", "nan"], ["eta", "finite"]),
    "eta=0": (["--eta", "0"], ["eta", "> 0"]),
    "eta=-0.1": (["--eta", "-0.1"], ["eta", "> 0"]),
    "eta=0.1,0.1": (["--eta", "0.1,0.1"], ["eta", "duplicated"]),
    "eta=abc": (["--eta", "abc"], ["eta", "abc"]),
    "steps=0": (["--steps", "0"], ["guidance_steps", "0"]),
    "teacher-steps=-1": (["--teacher-steps", "-1"], ["teacher_steps", "-1"]),
    "teacher-steps=10^6": (["--teacher-steps", "1000000"], ["teacher_steps", "4096"]),
    "method without a head": (["--method", "meanflow"], ["meanflow", "divergence head"]),
    "unknown method": (["--method", "nope"], ["nope"]),
    "device=tpu9": (["--device", "tpu9"], ["tpu9"]),
    "out=(empty)": (["--out", ""], ["--out"]),
}


@pytest.mark.parametrize("case", list(GUIDE_CASES))
def test_guide_bad_input_one_error_line_exit_2_nothing_written(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a case that wrongly starts work writes where the snapshot sees it
    extra, names = GUIDE_CASES[case]
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    args = ["guide", "--method", "meanflow-f2d2", "--eta", "0.1", "--out", str(out), *extra]
    code, stdout, stderr, crash = invoke(args, in_process=True)
    lines = stderr.splitlines()
    assert code == EXIT_USAGE and not crash, (code, crash, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert all(name in lines[0] for name in names), (names, lines[0])
    assert snapshot(tmp_path) == before


def test_the_main_job_writes_only_where_git_ignores_it():
    """`make sweep` (the CLI's default --out) never rewrites the committed results/, so the README's
    two commands work in either order: results/ and README.md stay as committed."""
    import inspect

    from bench.cli import DEFAULT_OUT, guide, sweep

    for command in (sweep, guide):
        assert inspect.signature(command).parameters["out"].default == DEFAULT_OUT
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        pytest.skip("not a git clone")
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{DEFAULT_OUT}/checkerboard/results.csv"], cwd=root)
    assert ignored.returncode == 0, f"{DEFAULT_OUT}/ is not ignored by git"
    makefile = (root / "Makefile").read_text()
    assert "--out" not in makefile.split("sweep: $(STAMP)")[1].split("\n\n")[0]  # make sweep uses the default


def one_error_line(result) -> str:
    lines = result.stderr.splitlines()
    assert result.exit_code == EXIT_USAGE and len(lines) == 1 and lines[0].startswith("error: "), (result.exit_code, result.stderr)
    return lines[0]


def test_reading_commands_refuse_bad_files_and_values_with_one_line(tmp_path):
    """table, plan and check: a non-numeric value column, an --output that is a directory, a NaN
    throughput, a header-only baseline, a guidance table without guided rows."""
    baseline = Path(__file__).resolve().parent.parent / "results" / "ci" / "checkerboard"
    runner = CliRunner()
    text = (baseline / "results.csv").read_text().splitlines()
    bad = tmp_path / "bad.csv"
    header, first = text[0], text[1].split(",")
    first[4] = "oops"  # the value column
    bad.write_text("\n".join([header, ",".join(first), *text[2:5]]) + "\n")
    assert "non-number" in one_error_line(runner.invoke(app, ["table", str(bad)]))
    assert "is a directory" in one_error_line(runner.invoke(app, ["table", str(baseline), "--output", str(tmp_path)]))
    assert "guided rows" in one_error_line(runner.invoke(app, ["table", str(baseline), "--layout", "guidance"]))
    for value in ("nan", "inf", "0"):
        assert "--tflops" in one_error_line(runner.invoke(app, ["plan", "--tflops", value, "--quiet"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "results.csv").write_text(header + "\n")
    assert "no result rows" in one_error_line(runner.invoke(app, ["check", str(baseline), "--baseline", str(empty)]))
    assert "non-number" in one_error_line(runner.invoke(app, ["check", str(baseline), "--baseline", str(bad)]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "empty"]
