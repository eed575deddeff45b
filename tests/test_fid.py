"""Sample quality for images: the Frechet distance's closed forms, the digits classifier and its
cache, and the clean-fid Inception path driven by a tiny TorchScript stand-in for the real weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import bench.fid as fid
from bench.datasets import TEST_SEED
from bench.fid import (
    INCEPTION_FILE, WeightsError, feature_stats, frechet_distance, load_or_train_classifier, quality_for,
    resolve_inception_weights,
)
from bench.images import Digits, ImageArrays, ImageDataset
from f2d2.units import dequantize

# Frechet distance ------------------------------------------------------------------------------


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)
    # one dimension: (m1 - m2)^2 + (sd1 - sd2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0, rel=1e-12)


def test_frechet_distance_of_identical_statistics_is_zero_and_agrees_with_clean_fid():
    from cleanfid.fid import frechet_distance as clean_fid_distance

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 32)), rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 0.2
    sa, sb = feature_stats(a), feature_stats(b)
    torch.testing.assert_close(sa.sigma, np.cov(a, rowvar=False), rtol=0, atol=0)
    assert sa.mu.dtype == np.float64 and sa.num == 400
    assert abs(frechet_distance(sa.mu, sa.sigma, sa.mu, sa.sigma)) < 1e-10
    ours = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert ours > 1.0 and ours == pytest.approx(clean_fid_distance(sa.mu, sa.sigma, sb.mu, sb.sigma), rel=1e-9)
    # rank-deficient covariances (fewer points than features) stay real and match too
    c, d = feature_stats(a[:10]), feature_stats(b[:10])
    expected = clean_fid_distance(c.mu, c.sigma, d.mu, d.sigma)
    assert frechet_distance(c.mu, c.sigma, d.mu, d.sigma) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(sa.mu, sa.sigma, sa.mu[:3], sa.sigma[:3, :3])


# Digits classifier -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train the digits classifier once for this module (about 10 s on one CPU core)."""
    cache = tmp_path_factory.mktemp("cache")
    model, info = load_or_train_classifier(Digits(), cache)
    return cache, model, info


def test_digits_classifier_accuracy_and_cache_reuse(trained, monkeypatch):
    cache, model, info = trained
    assert not info["cached"] and info["test_accuracy"] > 0.9 and info["num_test"] == 297

    def must_not_train(*args, **kwargs):
        raise AssertionError("the cached classifier was retrained")

    monkeypatch.setattr(fid, "_train_classifier", must_not_train)
    again, info2 = load_or_train_classifier(Digits(), cache)
    assert info2["cached"] and info2["test_accuracy"] == info["test_accuracy"]
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name


def test_damaged_classifier_cache_is_retrained(tmp_path, monkeypatch):
    calls = []
    original = fid._train_classifier
    monkeypatch.setattr(fid, "_train_classifier", lambda *a, **k: calls.append(1) or original(*a, **k))
    _, first = load_or_train_classifier(Digits(), tmp_path, epochs=1)  # cheap: one epoch
    weights = next((tmp_path / "classifiers").glob("*.safetensors"))
    assert load_or_train_classifier(Digits(), tmp_path, epochs=1)[1]["cached"] and calls == [1]
    weights.write_bytes(weights.read_bytes()[:-8])  # truncated: its sha256 no longer matches
    _, second = load_or_train_classifier(Digits(), tmp_path, epochs=1)
    assert calls == [1, 1] and not second["cached"] and second["key"] == first["key"]


def test_fd_digits_separates_data_from_noise(trained):
    cache, _, _ = trained
    ds = Digits()
    quality = quality_for(ds, cache)
    assert quality.name == "fd_digits" and "test acc" in quality.description
    [(name, fd_test, se_test, estimator)] = quality.metrics(ds.test_set(297))
    assert name == "fd_digits" and "bootstrap" in estimator and math.isfinite(se_test) and se_test > 0
    # dequantized data quantize back to the same integers, hence the very same number
    assert quality.levels_metrics(ds.test_levels())[0][1] == fd_test
    noise = 2 * torch.rand(297, 1, 8, 8, generator=torch.Generator().manual_seed(0)) - 1
    fd_noise = quality.metrics(noise)[0][1]
    assert fd_noise > 10 * fd_test > 0


# Inception path (clean-fid) --------------------------------------------------------------------


class _TinyLayers(nn.Module):
    """Stands in for Inception's trunk: per-channel means -> 2048 features, shape (B, 2048, 1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x.mean(dim=(2, 3))))[:, :, None, None]


class _TinyInception(nn.Module):
    """Same call convention as clean-fid's TorchScript file: ``layers`` and forward(x, return_features)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _TinyLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


@pytest.fixture
def tiny_weights(tmp_path):
    torch.manual_seed(0)
    model = _TinyInception()
    path = tmp_path / "weights" / INCEPTION_FILE
    path.parent.mkdir()
    torch.jit.script(model).save(str(path))
    return path, model


class _TinyRGB(ImageDataset):
    name, data_shape, levels = "tinyrgb", (3, 32, 32), 256

    def load(self) -> ImageArrays:
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (24, 3, 32, 32), generator=gen, dtype=torch.uint8)
        labels = torch.zeros(24, dtype=torch.long)
        return ImageArrays(images[:16], labels[:16], images[16:], labels[16:])


def test_missing_or_misnamed_inception_weights_raise_weights_error(tmp_path):
    with pytest.raises(WeightsError) as err:
        resolve_inception_weights(str(tmp_path))
    message = str(err.value)
    assert str(tmp_path / INCEPTION_FILE) in message and "download" in message and "\n" not in message
    other = tmp_path / "inception.pt"
    other.write_bytes(b"x")
    with pytest.raises(WeightsError, match=INCEPTION_FILE):
        resolve_inception_weights(str(other))
    with pytest.raises(WeightsError, match="not found"):
        quality_for(_TinyRGB(), tmp_path / "cache", str(tmp_path / "nowhere" / INCEPTION_FILE))


def test_inception_extractor_uses_clean_fids_resize_and_normalisation(tiny_weights):
    path, model = tiny_weights
    extract = fid.inception_extractor(path, torch.device("cpu"))
    colours = torch.tensor([[0, 128, 255], [30, 60, 90]], dtype=torch.uint8)
    k = colours[:, :, None, None].expand(2, 3, 32, 32).contiguous()
    # a constant image stays constant under bicubic resizing; clean-fid maps pixels p to (p - 128) / 128
    with torch.no_grad():
        expected = torch.tanh(model.layers.proj((colours.float() - 128) / 128)).double()
    torch.testing.assert_close(torch.from_numpy(extract(k)), expected, rtol=1e-5, atol=1e-5)


def test_fid_is_zero_on_the_reference_images_and_cached(tiny_weights, tmp_path):
    path, _ = tiny_weights
    ds = _TinyRGB()
    quality = quality_for(ds, tmp_path / "cache", str(path))
    assert quality.name == "fid" and "train[16]" in quality.description
    same = dequantize(ds.train_levels(), 256, torch.Generator().manual_seed(TEST_SEED))
    [(name, value, stderr, _), (kid_name, *_)] = quality.metrics(same)
    assert name == "fid" and abs(value) < 1e-6 and math.isnan(stderr) and kid_name == "kid"
    darker = (ds.train_levels() // 2).to(torch.uint8)
    assert quality.levels_metrics(darker)[0][1] > 1e-2
    again = quality_for(ds, tmp_path / "cache", str(path.parent))
    assert "(cached)" in again.description
    np.testing.assert_array_equal(again.reference.mu, quality.reference.mu)
    np.testing.assert_array_equal(again.kid_reference, quality.kid_reference)


def test_clean_fids_precomputed_statistics_are_not_used(tiny_weights, tmp_path, monkeypatch):
    """Statistics of unknown data files and weights would break the keyed reference (and KID
    needs features): a clean-fid stats file in its folder is ignored."""
    import cleanfid

    path, _ = tiny_weights
    stats_dir = tmp_path / "cleanfid"
    (stats_dir / "stats").mkdir(parents=True)
    np.savez(stats_dir / "stats" / "tinyrgb_clean_train_32.npz", mu=np.full(2048, 0.5), sigma=np.eye(2048) * 0.1)
    monkeypatch.setattr(cleanfid, "__file__", str(stats_dir / "__init__.py"))
    quality = quality_for(_TinyRGB(), tmp_path / "cache", str(path))
    assert "train[16]" in quality.description and not np.allclose(quality.reference.mu, 0.5)
    assert (tmp_path / "cache" / "fid_reference").is_dir()


def test_quality_for_skips_non_image_data(tmp_path):
    from bench.datasets import Checkerboard

    assert quality_for(Checkerboard(), tmp_path) is None
