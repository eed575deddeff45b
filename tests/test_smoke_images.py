"""Likelihood-only sweeps of the file-backed image datasets (issue 17): CIFAR-10 from synthetic
files in the real python-pickle format and MNIST from IDX files, `--metrics nll`, no Inception file
anywhere, tiny networks and budgets. Checks the bits/dim arithmetic by hand and that sample quality
shows as a dash, never as a number."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.tables import paper_table, read_rows
from test_images import cifar_batch, write_idx

TINY_IMAGES = """
methods: [flow-matching, meanflow-f2d2]
model: {arch: unet, channels: 8, channel_mult: [1, 2], num_res_blocks: 1}
teacher_train: {batch_size: 16, warmup_steps: 2, checkpoint_every: 100}
train: {batch_size: 16, warmup_steps: 2, checkpoint_every: 100}
eval: {batch_size: 16, num_repeats: 1, reference_estimator: "hutchinson:2", rtol: 1.0e-3, atol: 1.0e-3}
figures: false
"""
SMOKE = ["--nfe", "1,2", "--metrics", "nll", "--steps", "8", "--num-test", "12", "--jobs", "1", "--quiet"]


def write_cifar_archive(root, num_train: int = 40, num_test: int = 20) -> None:
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        for seed, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
            raw, _, _ = cifar_batch(num_test if name == "test_batch" else num_train, seed, name)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def write_mnist_files(root, num_train: int = 200, num_test: int = 20) -> None:
    rng = np.random.default_rng(0)
    (root / "mnist").mkdir(parents=True)
    write_idx(root / "mnist" / "train-images-idx3-ubyte", rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8))
    write_idx(root / "mnist" / "train-labels-idx1-ubyte", rng.integers(0, 10, num_train, dtype=np.uint8))
    write_idx(root / "mnist" / "t10k-images-idx3-ubyte", rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8), compress=True)
    write_idx(root / "mnist" / "t10k-labels-idx1-ubyte", rng.integers(0, 10, num_test, dtype=np.uint8))


@pytest.mark.parametrize("dataset, writer, dims, profile", [
    ("cifar10", write_cifar_archive, 3 * 32 * 32, "smoke"),  # the smoke profile itself
    ("mnist", write_mnist_files, 28 * 28, "config"),  # the default profile shrunk by a YAML and the shortcuts
])
def test_a_likelihood_only_sweep_needs_no_inception_file_and_gets_bits_per_dim_right(dataset, writer, dims, profile, tmp_path, monkeypatch):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    writer(data)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.cache/f2d2-bench/inception-2015-12-05.pt anywhere
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_IMAGES)
    shrink = ["--profile", "smoke", "--methods", "flow-matching,meanflow-f2d2"] if profile == "smoke" else ["--config", str(config)]
    args = ["sweep", "--dataset", dataset, "--data-dir", str(data), *shrink, "--out", str(out), *SMOKE]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    frame = read_rows(str(out / dataset / "results.csv"))
    assert not frame["metric"].isin(["fid", "fd_mnist", "energy_distance", "nll_wall_s", "mass"]).any()
    assert set(frame["method"]) == {"flow-matching", "meanflow-f2d2"} and set(frame["nfe"]) == {1, 2}
    # bits/dim by hand from the per-point NLLs in nats the cell keeps: nll / (D ln 2) + log2(256) - 1
    with np.load(out / dataset / "cells" / "meanflow-f2d2.npz") as cell:
        for k in (1, 2):
            by_hand = cell[f"nfe{k}"].mean() / (dims * math.log(2)) + 8 - 1
            got = frame[(frame.method == "meanflow-f2d2") & (frame.nfe == k) & (frame.metric == "nll_bpd")].value.item()
            assert got == pytest.approx(by_hand, rel=1e-6)  # the sweep converts float32 per-point NLLs
        ref = cell["ref"].mean() / (dims * math.log(2)) + 7
    assert frame[(frame.method == "meanflow-f2d2") & (frame.metric == "nll_ref_bpd")].value.iloc[0] == pytest.approx(ref, rel=1e-6)
    resolved = (out / dataset / "config.yaml").read_text()
    assert "steps: 8" in resolved and "- nll" in resolved and "num_test: 12" in resolved
    table = paper_table(frame)
    assert "| meanflow-f2d2 |" in table and " - |" in table and "Sample quality: not measured" in table
    env = json.loads((out / dataset / "env.json").read_text())
    assert env["sample_quality_of_test_data"] == {}


def test_cifar10_with_sample_quality_still_requires_the_inception_file_before_training(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    write_cifar_archive(data, num_train=2, num_test=2)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, ["sweep", "--dataset", "cifar10", "--data-dir", str(data), "--out", str(tmp_path / "out"),
                                      "--metrics", "nll,quality", "--steps", "1"])
    assert result.exit_code == 2 and "Inception weights not found" in result.stderr
    assert not (tmp_path / "out").exists()
