"""End to end through the CLI on a tiny budget, checking numbers; and bad input."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from bench.cli import app

TINY = """
methods: [flow-matching, meanflow, meanflow-f2d2]
teacher_train: {steps: 150, batch_size: 256, warmup_steps: 10, checkpoint_every: 100}
train: {steps: 150, batch_size: 128, warmup_steps: 10, checkpoint_every: 100}
eval: {num_test: 200, num_samples: 200, batch_size: 200, num_repeats: 2}
"""


def run(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    config = root / "tiny.yaml"
    config.write_text(TINY)
    out = root / "results"
    first = run("sweep", "--dataset", "checkerboard", "--nfe", "1,2,4", "--config", str(config), "--out", str(out), "--jobs", "1", "--quiet")
    assert first.exit_code == 0, first.output + str(first.exception)
    frame = pd.read_csv(out / "checkerboard" / "results.csv")
    second = run("sweep", "--dataset", "checkerboard", "--nfe", "1,2,4", "--config", str(config), "--out", str(out), "--jobs", "1", "--quiet")
    assert second.exit_code == 0, second.output
    return out, frame, pd.read_csv(out / "checkerboard" / "results.csv")


def value(frame, method, nfe, metric):
    rows = frame[(frame.method == method) & (frame.nfe == nfe) & (frame.metric == metric)]
    assert len(rows) == 1, (method, nfe, metric)
    return rows.iloc[0]


def test_sweep_writes_tidy_rows_for_every_method_and_nfe(tiny_sweep):
    out, frame, _ = tiny_sweep
    assert list(frame.columns[:6]) == ["dataset", "method", "nfe", "metric", "value", "stderr"]
    for method in ("flow-matching", "meanflow", "meanflow-f2d2"):
        for k in (1, 2, 4):
            for metric in ("nll_nats", "nll_ref_nats", "nll_teacher_nats", "nll_gap_nats", "entropy_nats",
                           "energy_distance", "support_share", "sample_wall_s", "nll_wall_s", "nll_speedup"):
                value(frame, method, k, metric)
    for name in ("results.md", "config.yaml", "env.json", "training.json"):
        assert (out / "checkerboard" / name).is_file()
    training = json.loads((out / "checkerboard" / "training.json").read_text())
    env = json.loads((out / "checkerboard" / "env.json").read_text())
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    for method in ("flow-matching", "meanflow", "meanflow-f2d2"):  # how each model was trained, for reproducing it
        assert training[method]["world_sizes"] == [{"from_step": 0, "world_size": 1}]
        (segment,) = training[method]["torch_threads"]
        assert segment["from_step"] == 0 and segment["threads"] >= 1


def test_sweep_numbers_are_consistent(tiny_sweep):
    _, frame, _ = tiny_sweep
    entropy = value(frame, "flow-matching", 1, "entropy_nats").value
    assert entropy == pytest.approx(math.log(32))
    teacher = value(frame, "flow-matching", 1, "nll_teacher_nats")
    # a barely trained teacher is worse than the truth, never better
    assert entropy - 3 * teacher.stderr < teacher.value < 8.0
    # the teacher's own reference is the teacher reference; every row shares it
    assert value(frame, "flow-matching", 2, "nll_ref_nats").value == teacher.value
    assert value(frame, "meanflow", 4, "nll_teacher_nats").value == teacher.value
    for method in ("meanflow", "meanflow-f2d2"):
        for k in (1, 2, 4):
            nll, ref, gap = (value(frame, method, k, m).value for m in ("nll_nats", "nll_ref_nats", "nll_gap_nats"))
            assert gap == pytest.approx(nll - ref, abs=1e-4)
            share = value(frame, method, k, "support_share").value
            assert 0.0 <= share <= 1.0
    assert value(frame, "meanflow-f2d2", 1, "nll_nats").estimator == "f2d2-trained"
    assert value(frame, "meanflow", 1, "nll_nats").estimator == "naive/exact"
    # one network call against an adaptive solve: much faster
    assert value(frame, "meanflow-f2d2", 1, "nll_speedup").value > 10


def test_second_run_reuses_checkpoints_and_cells(tiny_sweep):
    out, first, second = tiny_sweep
    import json

    env = json.loads((out / "checkerboard" / "env.json").read_text())
    assert env["trained"] == []
    assert sorted(env["reused_cells"]) == ["flow-matching", "meanflow", "meanflow-f2d2"]
    pd.testing.assert_frame_equal(first, second)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--nfe", "0"], "nfe values must be integers >= 1"),
        (["--nfe", "-1"], "nfe values must be integers >= 1"),
        (["--nfe", "abc"], "is not an integer"),
        (["--nfe", ""], "comma-separated"),
        (["--nfe", "1,2,2"], "duplicated"),
        (["--methods", "meanflow,nope"], "unknown method nope; valid: flow-matching"),
        (["--dataset", "cifar11"], "unknown dataset 'cifar11'; valid:"),
        (["--profile", "huge"], "unknown profile 'huge'"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(args, message, tmp_path):
    out = tmp_path / "out"
    result = run("sweep", *args, "--out", str(out), "--quiet")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def test_bad_yaml_names_the_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("eval:\n  num_tests: 5\n")
    result = run("sweep", "--config", str(config), "--out", str(tmp_path / "out"), "--quiet")
    assert result.exit_code == 2
    assert "unknown key 'eval.num_tests'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_methods_command_lists_capabilities():
    from baselines import METHODS

    result = run("methods")
    assert result.exit_code == 0
    listed = {line.split("│")[1].strip() for line in result.output.splitlines() if line.startswith("│")} - {""}
    assert listed == set(METHODS), listed  # every name whole (piped output used to cut the long ones)
