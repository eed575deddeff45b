"""Data-parallel training under torchrun (CPU, gloo, 2 ranks) against one process.

The multi-process tests start the real launcher (tests/torchrun_helpers.py); see that module for
what a 2-rank run must match and why only to a float tolerance.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bench import dist
from bench.checkpoint import load_checkpoint, read_meta
from bench.config import ConfigError
from bench.train import rank_batch_size, stream_seed
from torchrun_helpers import CASES, flat, reference_train, torchrun, torchrun_command, torchrun_env

# 2 ranks against the one-process reference after 50 Adam steps: worst differences measured on
# this machine (2-core CPU, torch 2.14) were 4.5e-8 in any weight (|w| <= 0.3) and a relative
# 1.5e-7 in any logged value; the tolerances leave a factor of ~20. Drawing both shares from rank
# 0's stream instead moves some weight by 0.018 to 0.029 (measured for each of the four methods).
WEIGHT_ATOL, WEIGHT_RTOL = 1e-6, 1e-5
LOG_RTOL = 2e-6


@pytest.fixture(autouse=True)
def _one_thread():
    """The reference and resumed runs here use one thread, as each rank does (and as a shared,
    busy machine needs: two threads contending for oversubscribed cores were 5-20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_rank_streams_and_the_global_batch(monkeypatch):
    assert stream_seed(7, 0) == 7  # one process draws exactly what it always drew
    seeds = {stream_seed(7, r, s) for r in range(4) for s in (0, 100)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert stream_seed(7, 1) == stream_seed(7, 1)  # deterministic (a restart re-derives it)
    assert rank_batch_size(63) == 63
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    assert rank_batch_size(64) == 32
    with pytest.raises(ConfigError, match="batch_size 63 is the global batch .* multiple of the world size 2"):
        rank_batch_size(63)


def _torchrun_env(monkeypatch, rank: int, local_world: int) -> None:
    for name, value in {"RANK": rank, "WORLD_SIZE": 2 * local_world, "LOCAL_RANK": rank % local_world,
                        "LOCAL_WORLD_SIZE": local_world, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 1}.items():
        monkeypatch.setenv(name, str(value))


def test_launch_checks(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert dist.rank_device(cuda) == cuda and not dist.launched()  # no torchrun: nothing changes
    _torchrun_env(monkeypatch, rank=3, local_world=2)
    assert (dist.rank(), dist.world_size(), dist.local_rank(), dist.is_main()) == (3, 4, 1, False)
    assert dist.rank_device(cpu) == cpu
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(dist.LaunchError, match="one GPU per local rank: 2 local ranks, 1 GPU"):
        dist.rank_device(cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dist.rank_device(cuda) == torch.device("cuda", 1)
    with pytest.raises(dist.LaunchError, match="pins one GPU for 2 local ranks"):
        dist.rank_device(torch.device("cuda", 0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(5)))
    assert dist.cpu_threads() == 2  # 5 cores shared by 2 local ranks
    _torchrun_env(monkeypatch, rank=1, local_world=1)  # one rank per node may pin its GPU
    assert dist.rank_device(torch.device("cuda", 1)) == torch.device("cuda", 1) and dist.cpu_threads() == 5


@pytest.mark.parametrize("stop", [None, ValueError, KeyboardInterrupt])
def test_the_process_group_is_torn_down_on_every_exit_path(monkeypatch, stop):
    """A one-rank torchrun environment in this process: a real gloo group, then none again."""
    from torch import distributed as tdist

    from torchrun_helpers import free_port

    env = {"RANK": 0, "WORLD_SIZE": 1, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 1, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port()}
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    with pytest.raises(stop) if stop else contextlib.nullcontext():
        with dist.process_group(torch.device("cpu")):
            assert tdist.is_initialized() and dist.backend() == "gloo" and dist.is_main()
            if stop:
                raise stop()
    assert not tdist.is_initialized()


def test_a_dead_peer_is_reported_and_other_errors_are_not_disguised():
    def gloo_reset():
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:545] Read error [10.0.0.2]:4321: Connection reset by peer. "
                           "This is typically caused by a remote worker hanging")

    with pytest.raises(dist.PeerLost, match=r"during a barrier \(Read error \[10.0.0.2\]:4321: Connection reset by peer\); another rank"):
        dist._collective("a barrier", gloo_reset)

    def misuse():
        raise RuntimeError("Tensors must be CUDA and dense")

    with pytest.raises(RuntimeError, match="^Tensors must be CUDA and dense$"):
        dist._collective("a barrier", misuse)


def test_world_size_one_helpers_are_identities():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    gathered = dist.gather_indexed(values, torch.tensor([2, 0, 1]), 3)
    torch.testing.assert_close(gathered, values[[1, 2, 0]], rtol=0, atol=0)
    for bad in (torch.tensor([0, 0, 1]), torch.tensor([0, 1, 3])):
        with pytest.raises(ValueError, match="cover 0 .. 2 exactly once"):
            dist.gather_indexed(values, bad, 3)
    assert dist.sum_float64(torch.tensor([1.5], dtype=torch.float32)).dtype == torch.float64
    assert dist.mean_scalars({"a": torch.tensor(0.1, dtype=torch.float32)}) == {"a": torch.tensor(0.1).item()}
    assert dist.broadcast_object({"x": 1}) == {"x": 1} and dist.all_gather_objects(5) == [5]
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = grad = torch.ones(2)
    assert dist.average_gradients([param], ok=True) and param.grad is grad
    assert not dist.average_gradients([param], ok=False)
    dist.barrier()


def test_a_command_line_error_is_reported_by_rank_zero_only(monkeypatch, tmp_path):
    from bench.cli import app

    for rank, lines in ((0, 1), (1, 0)):
        _torchrun_env(monkeypatch, rank=rank, local_world=2)
        result = CliRunner().invoke(app, ["sweep", "--jobs", "2", "--out", str(tmp_path), "--quiet"])
        assert result.exit_code == 2
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == lines and all("--jobs 2" in e and "torchrun" in e for e in errors)
        assert not any(tmp_path.iterdir())
    for rank, lines in ((0, 1), (1, 0)):  # no CUDA on this machine
        _torchrun_env(monkeypatch, rank=rank, local_world=2)
        result = CliRunner().invoke(app, ["sweep", "--device", "cuda", "--out", str(tmp_path), "--quiet"])
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == lines and all("CUDA is not available" in e for e in errors)


def test_two_ranks_train_as_one_process_on_the_concatenated_batch(tmp_path):
    names = ["collectives", *CASES, "resume"]
    run = torchrun(["train", tmp_path, *names], timeout_s=240)
    assert run.returncode == 0, run.stderr[-3000:]
    _check_collectives(tmp_path)
    for name in CASES:
        ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in range(2)]
        for key in ("model", "ema"):  # the ranks never drift apart
            torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0)
        ref = reference_train(name)
        got = ranks[0]
        torch.testing.assert_close(torch.cat([p.flatten() for p in got["model"]]), flat(ref.model), atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL)
        torch.testing.assert_close(torch.cat([p.flatten() for p in got["ema"]]), flat(ref.ema), atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL)
        assert [h["step"] for h in got["history"]] == [h["step"] for h in ref.history]
        for mine, theirs in zip(got["history"], ref.history):  # loss curves, grad norms, skip counts
            assert mine.keys() == theirs.keys() and mine["num_skipped"] == theirs["num_skipped"]
            for key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=LOG_RTOL), (name, key)
        assert got["num_skipped"] == ref.num_skipped == len(CASES[name].get("poison_rank1", ()))
        assert len(got["validation"]) == len(ref.validation) == (5 if CASES[name].get("validate") else 0)
        for mine, theirs in zip(got["validation"], ref.validation):
            assert mine == pytest.approx(theirs, rel=1e-5)
        assert got["best_step"] == (ref.best["step"] if ref.best else None)
    _check_resume(tmp_path)


def _check_collectives(out: Path) -> None:
    for r in range(2):
        res = torch.load(out / f"collectives-rank{r}.pt")
        # batches sharded over ranks, rows back in order, probes from the batch's own seed: as one process
        from bench.shards import chunk_seed

        x = torch.arange(9.0)[:, None]
        draws = torch.cat([torch.randn(len(c), generator=torch.Generator().manual_seed(chunk_seed(7, i))) for i, c in enumerate(x.split(2))])
        for key, rows in (("mapped", 9), ("mapped_one_batch", 2), ("alone", 9)):
            scaled, absent, draw, owner = res[key]
            torch.testing.assert_close(scaled, 10.0 * x[:rows], rtol=0, atol=0)
            assert absent is None
            torch.testing.assert_close(draw, draws[:rows], rtol=0, atol=0)
        assert res["mapped"][3].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0]  # batch c computed by rank c mod 2
        assert res["mapped_one_batch"][3].tolist() == [0, 0] and res["alone"][3].tolist() == [0.0] * 9
        # sample-quality features extracted in batches by both ranks: the one-process features and
        # the statistics FID/FD is computed from, exactly
        from bench.fid import FEATURE_BATCH, feature_stats
        from torchrun_entry import toy_features

        images = torch.randint(0, 256, (2 * FEATURE_BATCH + 37, 3, 4, 4), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
        one = toy_features(images)
        assert (res["features"].numpy() == one).all()
        stats = feature_stats(one)
        assert (res["feature_stats"][0].numpy() == stats.mu).all() and (res["feature_stats"][1].numpy() == stats.sigma).all()
        expected_rows = torch.stack([10.0 * torch.arange(5.0), -torch.arange(5.0, dtype=torch.float64)], dim=1)
        torch.testing.assert_close(res["gathered"], expected_rows, rtol=0, atol=0)
        assert res["sum"].dtype == torch.float64 and res["sum"].tolist() == [2.0**24 + 1.0, 3.0]
        assert res["means"] == {"a": 0.5, "b": 1.5}
        assert res["broadcast"] == {"from": 0} and res["objects"] == ["rank0", "rank1"]
        assert res["agreed"] is True and res["refused"] is False
        weight, unused, only_one = res["grads"]
        torch.testing.assert_close(weight, torch.full((3,), 1.5), rtol=0, atol=0)  # (1 + 2) / 2
        assert unused is None  # no rank touched it: Adam must leave it alone, as in one process
        torch.testing.assert_close(only_one, torch.full((2,), 2.0), rtol=0, atol=0)  # (0 + 4) / 2


def _check_resume(out: Path) -> None:
    """At the same world size a resumed run continues every rank's stream: bit for bit."""
    full, cut = out / "full" / "checkerboard", out / "cut" / "checkerboard"
    (full_dir,), (cut_dir,) = list(full.iterdir()), list(cut.iterdir())
    meta = read_meta(cut_dir)
    assert meta["complete"] and meta["world_size"] == 2 and meta["world_sizes"] == [{"from_step": 0, "world_size": 2}]
    for a, b in zip(load_checkpoint(full_dir).parameters(), load_checkpoint(cut_dir).parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert read_meta(full_dir)["history"] == meta["history"]


TINY_SWEEP = """
methods: [flow-matching, meanflow-f2d2]
nfe: [1, 2]
model: {hidden: 16, depth: 2, x_frequencies: 2, t_frequencies: 2}
teacher_train: {steps: 40, batch_size: 64, warmup_steps: 5, checkpoint_every: 20, log_every: 10}
train: {steps: 30, batch_size: 64, warmup_steps: 5, checkpoint_every: 20, log_every: 10}
eval: {num_test: 64, num_samples: 64, batch_size: 24, num_repeats: 1, num_mass: 40, reference_estimator: "hutchinson:2", naive_estimator: "hutchinson:1"}
figures: false
"""  # eval batches of 24: three per set (24, 24, 16), sharded over the ranks; Hutchinson probes per batch
TIMING = ("nll_wall_s", "ref_wall_s", "sample_wall_s", "nll_speedup")


def _results(path: Path):
    from bench.tables import read_rows

    frame = read_rows(str(path))
    return frame[~frame["metric"].isin(TIMING)].drop(columns=["device"]).reset_index(drop=True)


def test_sweep_under_torchrun_trains_on_two_ranks_and_only_rank_zero_writes(tmp_path):
    from bench.cli import app

    config, out, audit = tmp_path / "tiny.yaml", tmp_path / "out", tmp_path / "audit"
    config.write_text(TINY_SWEEP)
    audit.mkdir()
    run = torchrun(["cli", "sweep", "--config", config, "--out", out, "--device", "cpu"], timeout_s=240, F2D2_TEST_AUDIT=str(audit))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1 and "error" not in run.stderr.lower()
    writes = {r: [line for line in (audit / f"rank{r}.log").read_text().splitlines() if str(out) in line] for r in range(2)}
    assert writes[1] == []
    assert any(line.startswith("os.rename") and line.endswith("results.csv") for line in writes[0])  # the audit sees writes
    env = json.loads((out / "checkerboard" / "env.json").read_text())
    assert env["world_size"] == 2 and env["backend"] == "gloo"
    metas = [read_meta(d) for d in (out / "checkpoints" / "checkerboard").iterdir()]
    assert len(metas) == 2
    for meta in metas:
        assert meta["complete"] and meta["world_size"] == 2 and meta["world_sizes"] == [{"from_step": 0, "world_size": 2}]
    # One process with the same cache: nothing is retrained (the cache key leaves the world size
    # out) and rank 0's evaluation gave the one-process numbers (same thread count: 1).
    args = ["sweep", "--config", str(config), "--out", str(tmp_path / "one"), "--cache-dir", str(out / "checkpoints")]
    result = CliRunner().invoke(app, [*args, "--quiet", "--jobs", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "one" / "checkerboard" / "env.json").read_text())["trained"] == []
    one, two = _results(tmp_path / "one" / "checkerboard" / "results.csv"), _results(out / "checkerboard" / "results.csv")
    assert len(one) > 20 and one.drop(columns=["value", "stderr"]).equals(two.drop(columns=["value", "stderr"]))
    for column in ("value", "stderr"):
        torch.testing.assert_close(torch.tensor(two[column].to_numpy()), torch.tensor(one[column].to_numpy()), rtol=1e-6, atol=0, equal_nan=True)


def test_bad_combination_under_torchrun_is_one_error_line(tmp_path):
    run = torchrun(["cli", "sweep", "--jobs", "2", "--out", tmp_path / "out", "--quiet"], timeout_s=120)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--jobs 2" in errors[0], run.stderr[-2000:]
    assert run.returncode != 0 and "exitcode  : 2" in run.stderr  # torchrun's summary of our status
    assert not (tmp_path / "out").exists()


KILL_SWEEP = """
methods: [flow-matching]
nfe: [1]
model: {hidden: 16, depth: 2, x_frequencies: 2, t_frequencies: 2}
teacher_train: {steps: 400, batch_size: 64, warmup_steps: 5, checkpoint_every: 20, log_every: 20}
eval: {num_test: 32, num_samples: 32, batch_size: 32, num_repeats: 1}
figures: false
"""
EXIT_TIMEOUT_S = 60  # torchrun's agent stops the survivors at once; gloo reports the lost peer in < 1 s


def test_a_killed_rank_stops_the_others_and_one_process_resumes(tmp_path):
    from bench.cli import app

    config, out, pids = tmp_path / "kill.yaml", tmp_path / "out", tmp_path / "pids"
    config.write_text(KILL_SWEEP)
    pids.mkdir()
    args = ["cli", "sweep", "--config", config, "--out", out, "--device", "cpu", "--quiet"]
    proc = subprocess.Popen(torchrun_command(args), env=torchrun_env(F2D2_TEST_PIDS=str(pids)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        saved = _wait_for_checkpoint(out / "checkpoints" / "checkerboard", proc)
        os.kill(int((pids / "rank1.pid").read_text()), signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = proc.communicate(timeout=EXIT_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - killed < EXIT_TIMEOUT_S and proc.returncode != 0
    said = [line for line in stderr.splitlines() if "lost contact with the other ranks" in line or line.startswith("terminated: ")]
    assert said, stderr[-3000:]
    assert "rank      : 1" in stderr and "SIGKILL" in stderr  # torchrun's summary names the killed rank
    partial = read_meta(saved)
    assert not partial["complete"] and partial["world_size"] == 2 and partial["step"] % 20 == 0
    result = CliRunner().invoke(app, ["sweep", "--config", str(config), "--out", str(out), "--quiet", "--jobs", "1"])
    assert result.exit_code == 0, result.output
    final = read_meta(saved)
    assert final["complete"] and final["step"] == 400
    assert final["world_sizes"] == [{"from_step": 0, "world_size": 2}, {"from_step": partial["step"], "world_size": 1}]
    kept = [h for h in final["history"] if h["step"] <= partial["step"]]
    assert kept == partial["history"]  # the resumed run continued the saved one


def _wait_for_checkpoint(root: Path, proc: subprocess.Popen, timeout_s: float = 180) -> Path:
    """The directory of the first periodic checkpoint rank 0 writes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        found = list(root.glob("*/checkpoint.json")) if root.is_dir() else []
        if found:
            return found[0].parent
        time.sleep(0.01)
    raise AssertionError("no checkpoint written in time")


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [400, 150])  # the ci profile's one batch, and three (150, 150, 100)
def test_ci_profile_evaluated_on_two_ranks_gives_the_one_process_results(tmp_path, batch_size):
    """Issue 12's acceptance test, on the ci profile itself (the default suite runs the same
    comparison on a tiny sweep): train once in one process, evaluate the same checkpoints in one
    process and on two ranks; every non-timing value agrees to 1e-6 relative."""
    from bench.cli import app

    config = tmp_path / "eval.yaml"
    config.write_text(f"eval: {{batch_size: {batch_size}}}\n")
    one = ["sweep", "--profile", "ci", "--config", str(config), "--out", str(tmp_path / "one"), "--jobs", "1", "--quiet"]
    result = CliRunner().invoke(app, one)
    assert result.exit_code == 0, result.output
    cache = tmp_path / "one" / "checkpoints"
    run = torchrun(["cli", "sweep", "--profile", "ci", "--config", config, "--out", tmp_path / "two", "--cache-dir", cache,
                    "--device", "cpu", "--quiet"], timeout_s=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "checkerboard" / "env.json").read_text())["trained"] == []
    a, b = _results(tmp_path / "one" / "checkerboard" / "results.csv"), _results(tmp_path / "two" / "checkerboard" / "results.csv")
    assert len(a) > 500 and a.drop(columns=["value", "stderr"]).equals(b.drop(columns=["value", "stderr"]))
    for column in ("value", "stderr"):
        torch.testing.assert_close(torch.tensor(b[column].to_numpy()), torch.tensor(a[column].to_numpy()), rtol=1e-6, atol=0, equal_nan=True)
