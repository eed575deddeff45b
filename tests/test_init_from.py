"""Warm starts (train.init_from): what is copied, what stays fresh, the cache key, the errors, and
the order in which a sweep trains a source and the model that starts from it."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from baselines import get_method
from bench.checkpoint import prefixed, read_meta, read_tensors
from bench.cli import app
from bench.config import ModelConfig, SweepConfig, TrainConfig
from bench.datasets import get_dataset
from bench.jobs import Job, run_job
from bench.models import build_model
from bench.warmstart import warm_start

SMALL = ModelConfig(hidden=16, depth=2, x_frequencies=2, t_frequencies=2)
TINY = TrainConfig(steps=4, batch_size=32, warmup_steps=1, checkpoint_every=100)


def job(method: str, cache, train: TrainConfig = TINY, init=None, model: ModelConfig = SMALL) -> Job:
    spec = get_method(method)
    return Job(method, spec.config, model, train, "checkerboard", None, 10.0, 2.31, None, str(cache), init_source=init)


@pytest.fixture(scope="module")
def shortcut_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return run_job(job("shortcut", tmp_path_factory.mktemp("cache")))


def fresh(method: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(SMALL, (2,), get_method(method).build().capabilities, kappa=10.0, sigma_0=2.31)


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_warm_start_copies_exactly_the_shared_weights_and_leaves_the_head_fresh(shortcut_dir, weights):
    model, untouched = fresh("shortcut-f2d2"), fresh("shortcut-f2d2")
    record = warm_start(model, shortcut_dir, weights)
    source = prefixed(read_tensors(shortcut_dir), f"{weights}/")
    state, before = model.state_dict(), untouched.state_dict()
    head = [name for name in state if ".div_head." in name]
    assert head and set(record["fresh"]) == set(head) and record["unused"] == []
    assert set(record["loaded"]) == set(source) == set(state) - set(head)
    for name in record["loaded"]:
        torch.testing.assert_close(state[name], source[name], rtol=0, atol=0)
    for name in head:
        torch.testing.assert_close(state[name], before[name], rtol=0, atol=0)
    assert record["weights"] == weights and record["method"] == "shortcut" and record["step"] == TINY.steps
    other = prefixed(read_tensors(shortcut_dir), "model/" if weights == "ema" else "ema/")
    assert any(not torch.equal(source[n], other[n]) for n in source)  # EMA and raw weights differ: the choice matters


def test_a_sweep_job_starts_from_its_source_and_records_it(shortcut_dir, tmp_path):
    source = job("shortcut", shortcut_dir.parent.parent)
    assert source.directory == shortcut_dir
    # one step at lr 1e-12 moves no weight by more than ~1e-12: the start is visible in the result
    child = job("shortcut-f2d2", tmp_path, replace(TINY, steps=1, lr=1e-12, init_from="shortcut"), init=source)
    meta = read_meta(run_job(child))
    assert meta["init_from"]["cache_key"] == source.key and meta["identity"]["init_from"] == {"cache_key": source.key, "weights": "ema"}
    trained = prefixed(read_tensors(child.directory), "model/")
    ema = prefixed(read_tensors(shortcut_dir), "ema/")
    for name in meta["init_from"]["loaded"]:
        torch.testing.assert_close(trained[name], ema[name], rtol=0, atol=1e-9)
    head = fresh("shortcut-f2d2").state_dict()
    for name in meta["init_from"]["fresh"]:
        torch.testing.assert_close(trained[name], head[name], rtol=0, atol=1e-9)


def test_the_cache_key_follows_the_source(shortcut_dir, tmp_path):
    cache = shortcut_dir.parent.parent
    source, other_source = job("shortcut", cache), job("shortcut", cache, replace(TINY, seed=1))
    warm = replace(TINY, init_from="shortcut")
    keys = {
        "none": job("shortcut-f2d2", tmp_path).key,
        "source": job("shortcut-f2d2", tmp_path, warm, source).key,
        "other source": job("shortcut-f2d2", tmp_path, warm, other_source).key,
        "raw weights": job("shortcut-f2d2", tmp_path, replace(warm, init_weights="model"), source).key,
        "path": job("shortcut-f2d2", tmp_path, replace(warm, init_from=str(shortcut_dir)), str(shortcut_dir)).key,
    }
    assert len(set(keys.values())) == len(keys), keys
    assert job("shortcut-f2d2", tmp_path, warm, job("shortcut", cache)).key == keys["source"]
    # a path source is keyed by its weights' sha256, not by where it lies
    moved = shutil.copytree(shortcut_dir, tmp_path / "elsewhere")
    assert job("shortcut-f2d2", tmp_path, replace(warm, init_from=str(moved)), str(moved)).key == keys["path"]


def _plan(tmp_path, overrides: dict, methods=("flow-matching", "shortcut", "meanflow")):
    config = {"methods": list(methods), "model": {"hidden": 16, "depth": 2, "x_frequencies": 2, "t_frequencies": 2}, "train": {"steps": 4, "batch_size": 32},
              "teacher_train": {"steps": 4, "batch_size": 32}, "eval": {"num_test": 8, "num_samples": 8}, **overrides}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(config))
    return CliRunner().invoke(app, ["plan", "--config", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o"), "--quiet"])


def test_bad_warm_starts_are_one_error_line(shortcut_dir, tmp_path):
    wide = tmp_path / "wide"
    wide_dir = run_job(job("shortcut", wide, model=replace(SMALL, hidden=24)))
    cases = {
        "cycle": ({"train_overrides": {"shortcut": {"init_from": "meanflow"}, "meanflow": {"init_from": "shortcut"}}},
                  "error: train.init_from forms a cycle: shortcut -> meanflow -> shortcut"),
        "self": ({"train_overrides": {"shortcut": {"init_from": "shortcut"}}}, "error: train.init_from forms a cycle: shortcut -> shortcut"),
        "unknown": ({"train_overrides": {"shortcut": {"init_from": "shortcutt"}}},
                    "error: train.init_from 'shortcutt' of shortcut is neither a method name nor a readable checkpoint ("),
        "teacher": ({"teacher_train": {"steps": 4, "batch_size": 32, "init_from": "shortcut"}},
                    "error: teacher_train.init_from must be a checkpoint path"),
        "shapes": ({"train_overrides": {"shortcut": {"init_from": str(wide_dir)}}}, "cannot warm-start, shapes differ: net."),
    }
    for name, (overrides, expected) in cases.items():
        result = _plan(tmp_path, overrides)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], (name, result.output)
    assert _plan(tmp_path, {"train_overrides": {"shortcut": {"init_from": str(shortcut_dir)}}}).exit_code == 0


class Recorder:
    def __init__(self) -> None:
        self.order: list[str] = []

    def stage(self, text) -> None: ...

    def drain(self) -> None: ...

    def queue(self):
        return None

    def train_progress(self, name, step, total, log) -> None:
        if name not in self.order:
            self.order.append(name)


def test_a_sweep_trains_the_source_first_and_even_when_it_is_not_evaluated(tmp_path):
    from bench.sweep import plan_jobs, train_all

    cfg = SweepConfig(
        dataset="checkerboard", methods=("flow-matching", "shortcut-distill-f2d2"), model=SMALL, train=TINY, teacher_train=TINY,
        train_overrides={"shortcut-distill-f2d2": {"init_from": "shortcut-distill"}},
    )
    sources = plan_jobs(cfg, get_dataset("checkerboard"), None, tmp_path, 10.0, 2.31)
    assert list(sources) == ["flow-matching", "shortcut-distill", "shortcut-distill-f2d2"]
    recorder = Recorder()
    trained = train_all(sources, torch.device("cpu"), 1, recorder)
    assert trained == recorder.order == ["flow-matching", "shortcut-distill", "shortcut-distill-f2d2"]
    meta = read_meta(sources["shortcut-distill-f2d2"].directory)
    assert meta["init_from"]["cache_key"] == sources["shortcut-distill"].key == read_meta(sources["shortcut-distill"].directory)["cache_key"]
    assert train_all(sources, torch.device("cpu"), 1, Recorder()) == []  # all complete: nothing retrained


def test_waves_wait_for_their_source_and_run_the_rest_in_parallel(tmp_path, monkeypatch):
    import bench.sweep as sweep

    cfg = SweepConfig(
        dataset="checkerboard", methods=("flow-matching", "shortcut-f2d2", "shortcut", "meanflow"), model=SMALL, train=TINY,
        teacher_train=TINY, train_overrides={"shortcut-f2d2": {"init_from": "shortcut"}},
    )
    sources = sweep.plan_jobs(cfg, get_dataset("checkerboard"), None, tmp_path, 10.0, 2.31)
    calls = []
    monkeypatch.setattr(sweep, "run_job", lambda j, *a, **k: calls.append([j.method]))
    monkeypatch.setattr(sweep, "train_in_workers", lambda jobs, *a, **k: calls.append(sorted(j.method for j in jobs)))
    sweep.train_all(sources, torch.device("cpu"), 2, Recorder())
    assert calls == [["flow-matching"], ["meanflow", "shortcut"], ["shortcut-f2d2"]]
    no_warm = replace(cfg, train_overrides={})
    calls.clear()
    sweep.train_all(sweep.plan_jobs(no_warm, get_dataset("checkerboard"), None, tmp_path, 10.0, 2.31), torch.device("cpu"), 2, Recorder())
    assert calls == [["flow-matching"], ["meanflow", "shortcut", "shortcut-f2d2"]]  # as before warm starts existed
