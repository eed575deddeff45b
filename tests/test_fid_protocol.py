"""The FID protocol: KID's estimator, repeats on disjoint seed ranges, the keyed reference cache."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from test_fid import _TinyInception, _TinyRGB  # the tiny TorchScript stand-in for Inception

from bench.config import ConfigError, EvalConfig, key_dict
from bench.measure import per_sample_noise
from bench.fid import INCEPTION_FILE, SampleQuality, feature_stats, quality_for, uses_inception
from bench.inception import data_fingerprint, reference_key
from bench.kid import kernel_distance

# KID ----------------------------------------------------------------------------------------------


def direct_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The KID formula on whole sets by explicit loops: mean over distinct pairs of k(x, x') and
    k(y, y'), minus twice the mean over all pairs of k(x, y); k(a, b) = (a . b / F + 1)^3."""
    f = x.shape[1]
    k = lambda a, b: (float(a @ b) / f + 1.0) ** 3  # noqa: E731
    within = lambda z: sum(k(z[i], z[j]) for i in range(len(z)) for j in range(len(z)) if i != j) / (len(z) * (len(z) - 1))  # noqa: E731
    cross = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    return within(x) + within(y) - 2.0 * cross


def _features(n: int, shift: float, seed: int, dim: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, 1.0, (n, dim))


def test_kid_with_whole_sets_equals_the_direct_double_loop():
    ref, gen = _features(9, 0.0, 0), _features(9, 0.4, 1)
    exact = direct_mmd2(gen, ref)
    # m = 9 = both set sizes: every round uses all points (permuted), so every round is exact
    result = kernel_distance(ref, gen, num_subsets=3, max_subset_size=50, dtype=torch.float64)
    assert result.subset_size == 9
    torch.testing.assert_close(torch.tensor(result.per_subset), torch.full((3,), exact, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # float32 Gram matrices (the default): products of O(1) features, relative error ~ 1e-6
    torch.testing.assert_close(kernel_distance(ref, gen, num_subsets=1).value, exact, rtol=1e-5, atol=1e-6)


def test_kid_over_random_subsets_is_unbiased_for_the_whole_set_formula():
    ref, gen = _features(14, 0.0, 2), _features(11, 0.3, 3)
    exact = direct_mmd2(gen, ref)
    result = kernel_distance(ref, gen, num_subsets=3000, max_subset_size=5, dtype=torch.float64)
    assert result.subset_size == 5
    mc_error = result.per_subset.std(ddof=1) / math.sqrt(len(result.per_subset))
    assert abs(result.value - exact) < 4 * mc_error, (result.value, exact, mc_error)


def test_kid_matches_clean_fids_kernel_distance_draw_for_draw():
    from cleanfid.fid import kernel_distance as clean_kernel_distance

    ref, gen = _features(30, 0.0, 4, dim=16), _features(25, 0.2, 5, dim=16)
    np.random.seed(11)  # clean-fid draws its subsets from numpy's global RandomState
    theirs = clean_kernel_distance(ref, gen, num_subsets=7, max_subset_size=10)
    ours = kernel_distance(ref, gen, num_subsets=7, max_subset_size=10, rng=np.random.RandomState(11), dtype=torch.float64)
    torch.testing.assert_close(ours.value, theirs, rtol=1e-12, atol=1e-15)


def test_kid_refuses_mismatched_or_too_small_feature_sets():
    with pytest.raises(ValueError, match="one width"):
        kernel_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least 2"):
        kernel_distance(np.zeros((4, 3)), np.zeros((1, 3)))
    kernel_distance(np.zeros((4, 3)), np.ones((2, 3)), num_subsets=1)  # two points: the smallest valid set


# Repeats on disjoint seed ranges ----------------------------------------------------------------


@pytest.fixture
def tiny_weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "weights" / INCEPTION_FILE
    path.parent.mkdir()
    torch.jit.script(_TinyInception()).save(str(path))
    return path


def _small_quality() -> SampleQuality:
    """FID and KID machinery on 6 cheap features (per-channel mean and std of the levels)."""
    extract = lambda k: torch.cat([k.double().mean((2, 3)), k.double().std((2, 3))], 1).numpy() / 64  # noqa: E731
    ref = extract(torch.randint(0, 256, (40, 3, 4, 4), generator=torch.Generator().manual_seed(9)))
    return SampleQuality("fid", 256, extract, feature_stats(ref), "toy", kid_reference=ref)


def test_seed_metrics_report_mean_std_and_min_over_the_ranges():
    quality = _small_quality()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(12, 3, 4, 4, generator=gen) * 2 - 1 for _ in range(3)]
    single = {name: value for name, value, _, _ in quality.seed_metrics(batches[0])}
    assert set(single) == {"fid", "kid"}  # one range: no aggregate rows
    rows = {name: (value, se) for name, value, se, _ in quality.seed_metrics(batches[0], iter(batches[1:]))}
    for metric in ("fid", "kid"):
        runs = np.array([quality.metrics(b)[("fid", "kid").index(metric)][1] for b in batches])
        assert rows[metric][0] == runs[0] == single[metric]  # the first range's row is today's row
        torch.testing.assert_close(rows[f"{metric}_mean"][0], runs.mean(), rtol=1e-12, atol=0)
        torch.testing.assert_close(rows[f"{metric}_mean"][1], runs.std(ddof=1) / math.sqrt(3), rtol=1e-12, atol=0)
        torch.testing.assert_close(rows[f"{metric}_std"][0], runs.std(ddof=1), rtol=1e-12, atol=0)
        assert rows[f"{metric}_min"][0] == runs.min()
        assert runs.std() > 0  # the ranges differ, so the aggregates are not trivially equal
    assert quality.metrics(batches[0], kid=False)[0][1] == single["fid"] and len(quality.metrics(batches[0], kid=False)) == 1


class _RecordingQuality:
    """Stands in for SampleQuality: records the sample batches it is given, scores their mean."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def seed_metrics(self, first, more=()):
        self.seen = [first, *more]
        values = [float(b.mean()) for b in self.seen]
        rows = [("fid", values[0], math.nan, "mean")]
        return rows + ([("fid_min", min(values), math.nan, "mean")] if len(values) > 1 else [])


@pytest.mark.parametrize("fid_seeds", [1, 3])
def test_sample_quality_rows_draw_disjoint_seed_ranges(fid_seeds):
    from bench.cells import CellContext, sample_quality_rows
    from bench.images import Digits

    cfg = EvalConfig(num_samples=4, seed=5, fid_seeds=fid_seeds)
    noise = per_sample_noise(4, (1, 8, 8), 5, torch.device("cpu"))
    ctx = CellContext(Digits(), torch.zeros(1), noise, None, cfg, torch.device("cpu"), "cpu", _RecordingQuality())
    drawn = []
    rows = sample_quality_rows("m", 2, noise, ctx, lambda z: drawn.append(z) or z)
    assert len(drawn) == fid_seeds - 1 and len(ctx.quality.seen) == fid_seeds
    whole = per_sample_noise(4 * fid_seeds, (1, 8, 8), 5, torch.device("cpu"))  # one stream, cut in ranges
    for r, batch in enumerate(ctx.quality.seen):
        torch.testing.assert_close(batch, whole[4 * r : 4 * (r + 1)], rtol=0, atol=0)
    assert [r.metric for r in rows] == (["fid"] if fid_seeds == 1 else ["fid", "fid_min"])


def test_fid_seeds_is_validated_and_left_out_of_keys_at_its_default():
    with pytest.raises(ConfigError, match=r"fid_seeds must lie in \[1, 100\], got 0"):
        EvalConfig(fid_seeds=0)
    with pytest.raises(ConfigError, match="fid_seeds"):
        EvalConfig(fid_seeds=101)
    EvalConfig(fid_seeds=100)
    assert "fid_seeds" not in key_dict(EvalConfig()) and key_dict(EvalConfig(fid_seeds=3))["fid_seeds"] == 3


def test_cifar10_profile_samples_50k_for_fid_and_other_profiles_keep_theirs():
    from bench.images import CIFAR10
    from bench.profiles import default_config

    assert uses_inception(CIFAR10) and default_config("cifar10").eval.num_samples == 50_000
    assert default_config("digits").eval.num_samples == 1000 and default_config("mnist").eval.num_samples == 50_000
    assert default_config("checkerboard").eval.num_samples == 2000


# The reference cache key --------------------------------------------------------------------------


def test_reference_key_follows_the_data_files_and_the_weights(tiny_weights, tmp_path):
    from test_images import write_cifar

    from bench.images import CIFAR10

    write_cifar(tmp_path, as_archive=False)
    ds = CIFAR10(str(tmp_path))
    assert [p.name for p in ds.source_files()] == [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    first = quality_for(ds, tmp_path / "cache", str(tiny_weights))
    key = reference_key(ds, _sha(tiny_weights), 10)
    assert (tmp_path / "cache" / "fid_reference" / f"cifar10-{key}.safetensors").is_file()
    assert "(cached)" in quality_for(CIFAR10(str(tmp_path)), tmp_path / "cache", str(tiny_weights)).description
    # a changed data file: a new key, even where no training image changed (the key names the files)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes() + b"\0")
    assert reference_key(CIFAR10(str(tmp_path)), _sha(tiny_weights), 10) != key
    # other weights: a new key
    other = tmp_path / "other" / INCEPTION_FILE
    other.parent.mkdir()
    torch.manual_seed(1)
    torch.jit.script(_TinyInception()).save(str(other))
    assert reference_key(ds, _sha(other), 10) != reference_key(ds, _sha(tiny_weights), 10)
    shutil.rmtree(tmp_path / "cifar-10-batches-py")
    write_cifar(tmp_path, as_archive=True)
    assert [p.name for p in CIFAR10(str(tmp_path)).source_files()] == ["cifar-10-python.tar.gz"]
    assert first.kid_reference.shape == (10, 2048) and first.kid_reference.dtype == np.float32


def test_fingerprint_of_in_memory_data_follows_the_images():
    ds = _TinyRGB()
    before = data_fingerprint(ds)
    assert data_fingerprint(_TinyRGB()) == before
    ds.train_levels()[0, 0, 0, 0] ^= 1  # one pixel of one training image
    assert data_fingerprint(ds) != before


def _sha(path) -> str:
    from bench.checkpoint import sha256_file

    return sha256_file(path)


def test_guided_rows_score_samples_from_guided_noise():
    """guided_rows draws through one sampler (so that extra seed ranges can reuse it): its samples
    are the K-step samples of the guided noise, chunked by eval.batch_size."""
    from baselines import get_method
    from bench.cells import CellContext, guided_rows
    from bench.config import ModelConfig
    from bench.datasets import Checkerboard
    from bench.metrics import energy_distance_estimate
    from bench.models import build_model
    from f2d2.guidance import guide_noise
    from f2d2.sampling import sample

    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=16, depth=2), (2,), get_method("meanflow-f2d2").build().capabilities, kappa=10.0, sigma_0=2.0).eval()
    cfg = EvalConfig(num_samples=6, batch_size=4, guidance_etas=(0.1,))
    noise = per_sample_noise(6, (2,), 0, torch.device("cpu"))
    x_test = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    ctx = CellContext(Checkerboard(), x_test, noise, None, cfg, torch.device("cpu"), "cpu", None)
    rows = {r.metric: r for r in guided_rows("m", model, 2, ctx) if r.method == "m+guided@0.1"}
    x0 = model.sigma_0 * noise
    guided = torch.cat([guide_noise(model, c, 0.1) for c in x0.split(4)])
    x = torch.cat([sample(model, c, 2, track_log_p=False).x for c in guided.split(4)]).detach()
    expected = energy_distance_estimate(x, x_test, seed=cfg.seed)
    assert rows["energy_distance"].value == expected.value and rows["network_calls_forward"].value == 3
