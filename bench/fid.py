"""Sample quality for images: Frechet distances between feature statistics (METHOD.md Sec. 4).

- "fid" (RGB, 32 x 32 and up): clean-fid's Inception-v3 features (bench/inception.py: the user's
  inception-2015-12-05.pt, nothing downloaded, clean-fid's "clean" resize), against the training
  images' features, computed once and cached under a key with the data files' and the weights'
  sha256. From the same features "kid", clean-fid's kernel distance (bench/kid.py).
- "fd_digits", "fd_mnist" (grayscale): the same distance in the 128-d penultimate features of a
  small CNN classifier trained once on the training split (seeded, cached as safetensors + JSON).
  It is not comparable to FID and is named accordingly.

Samples arrive as y in [-1, 1] and are quantized to integer levels (:func:`f2d2.units.to_levels`)
before feature extraction, exactly as the data are stored. With ``eval.fid_seeds`` = R > 1 the
sampling is repeated on R disjoint per-sample seed ranges (:meth:`SampleQuality.seed_metrics`).

Frechet distance (M. Heusel et al., "GANs Trained by a Two Time-Scale Update Rule", arXiv:1706.08500):
    d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)),
in float64, with Tr (S_1 S_2)^(1/2) = Tr (S_1^(1/2) S_2 S_1^(1/2))^(1/2) from two symmetric
eigendecompositions: the same number as clean-fid's ``frechet_distance`` (scipy sqrtm; cross-checked
in tests/test_fid.py), real by construction for rank-deficient covariances, and about 6x faster
for 2048 features (a bootstrap needs many of them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from bench import dist
from bench.checkpoint import sha256_file
from bench.config import stable_hash
from bench.inception import (  # noqa: F401 (re-exported: the Inception names have always lived here)
    DEFAULT_INCEPTION_WEIGHTS, FEATURE_BATCH, INCEPTION_FILE, INCEPTION_URL, WeightsError, inception_extractor,
    inception_reference, resolve_inception_weights,
)
from bench.io import write_json, write_with
from bench.kid import KID_SUBSETS, kernel_distance
from f2d2.units import to_levels

INCEPTION_MIN_SIZE = 32  # below this, Inception features of upsampled images say little
NUM_BOOTSTRAP = 50  # resamples of the samples for the classifier FD's standard error

CLASSIFIER_VERSION = 1  # bump when the architecture or training recipe changes (new cache key)
CLASSIFIER_EPOCHS = {"digits": 40, "mnist": 3}
CLASSIFIER_BATCH, CLASSIFIER_LR, CLASSIFIER_SEED = 64, 2e-3, 0
FEATURE_DIM, NUM_CLASSES = 128, 10


# Statistics and the distance -------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureStats:
    """Mean (F,) and unbiased covariance (F, F) of N feature vectors, float64 numpy arrays."""

    mu: np.ndarray
    sigma: np.ndarray
    num: int


def feature_stats(features: np.ndarray | Tensor) -> FeatureStats:
    """(N, F) features -> their float64 mean and covariance (rowvar=False, as clean-fid)."""
    feats = np.asarray(features.detach().cpu() if isinstance(features, Tensor) else features, dtype=np.float64)
    return FeatureStats(feats.mean(0), np.cov(feats, rowvar=False), len(feats))


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clipped)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet distance of N(mu1, sigma1) and N(mu2, sigma2), computed in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: {mu1.shape}, {sigma1.shape} vs {mu2.shape}, {sigma2.shape}")
    root = _psd_sqrt(sigma1)
    cross = np.linalg.eigvalsh((root @ sigma2 @ root + (root @ sigma2 @ root).T) / 2)
    tr_covmean = np.sqrt(np.clip(cross, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fd_to(features: np.ndarray, ref: FeatureStats) -> float:
    stats = feature_stats(features)
    return frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)


def bootstrap_stderr(features: np.ndarray, ref: FeatureStats, num: int, seed: int = 0) -> float:
    """Std of the FD over ``num`` resamples (with replacement) of the sample features; NaN if num < 2."""
    if num < 2:
        return math.nan
    rng = np.random.default_rng(seed)
    values = [fd_to(features[rng.integers(0, len(features), len(features))], ref) for _ in range(num)]
    return float(np.std(values, ddof=1))


# The evaluator ---------------------------------------------------------------------------------


Metric = tuple[str, float, float, str]  # (metric, value, stderr, estimator)


class SampleQuality:
    """A Frechet distance of samples to fixed reference statistics in one feature space, and the
    kernel distance (KID) when reference features are given.

    Args:
        name: metric name ("fid", "fd_digits", ...). levels: values per pixel of the data.
        extract: (B, C, H, W) uint8 levels -> (B, F) float features (numpy).
        reference: the reference statistics. description: estimator text for result rows.
        num_bootstrap: resamples for the standard error (0: NaN).
        kid_reference: (N, F) reference features for "kid" (None: no KID row).
        device: where KID's Gram matrices are computed.
    """

    def __init__(
        self,
        name: str,
        levels: int,
        extract: Callable[[Tensor], np.ndarray],
        reference: FeatureStats,
        description: str,
        num_bootstrap: int = 0,
        kid_reference: np.ndarray | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.name, self.levels, self.extract = name, levels, extract
        self.reference, self.description, self.num_bootstrap = reference, description, num_bootstrap
        self.kid_reference, self.device = kid_reference, device

    def levels_metrics(self, k: Tensor, kid: bool = True) -> list[Metric]:
        """[(metric, value, stderr, estimator)] for integer images k (N, C, H, W); ``kid=False``
        skips the kernel distance (its 100 subset rounds cost more than the Frechet distance)."""
        feats = sharded_features(self.extract, k.detach().cpu())
        value = fd_to(feats, self.reference)
        stderr = bootstrap_stderr(feats, self.reference, self.num_bootstrap)
        rows = [(self.name, value, stderr, self.description + (", bootstrap" if self.num_bootstrap > 1 else ""))]
        if kid and self.kid_reference is not None:
            result = kernel_distance(self.kid_reference, feats, device=self.device)
            text = f"kernel/clean-fid inception, {KID_SUBSETS} subsets of {result.subset_size} vs train[{len(self.kid_reference)}]"
            rows.append(("kid", result.value, math.nan, text))
        return rows

    def metrics(self, samples_y: Tensor, kid: bool = True) -> list[Metric]:
        """Metrics of samples y (N, C, H, W) in [-1, 1], quantized to the data's levels first."""
        return self.levels_metrics(to_levels(samples_y.detach().cpu(), self.levels).to(torch.uint8), kid)

    def seed_metrics(self, first: Tensor, more: Iterable[Tensor] = ()) -> list[Metric]:
        """Metrics of samples ``first`` (seed range 0), as :meth:`metrics`; with further samples
        ``more`` (seed ranges 1 .. R - 1, drawn one at a time) also, per metric M, "M_mean" (stderr:
        std / sqrt(R)), "M_std" (sample std over the R ranges, ddof 1) and "M_min" (EDM reports
        the minimum of three FIDs)."""
        rows = self.metrics(first)
        values = {name: [value] for name, value, _, _ in rows}
        count = len(first)
        for samples in more:
            for name, value, _, _ in self.metrics(samples):
                values[name].append(value)
        repeats = len(next(iter(values.values())))
        if repeats < 2:
            return rows
        for name, value, _, estimator in list(rows):
            runs = np.asarray(values[name])
            note = f"{estimator}; over {repeats} disjoint seed ranges of {count} samples"
            std = float(runs.std(ddof=1))
            rows += [
                (f"{name}_mean", float(runs.mean()), std / math.sqrt(repeats), note),
                (f"{name}_std", std, math.nan, note),
                (f"{name}_min", float(runs.min()), math.nan, note),
            ]
        return rows


def sharded_features(extract: Callable[[Tensor], np.ndarray], k: Tensor) -> np.ndarray:
    """``extract`` over batches of FEATURE_BATCH images, sharded across ranks under torchrun and
    gathered in image order (bench/shards.py): every rank gets every feature row."""
    from bench.shards import map_chunks

    rows = map_chunks(lambda chunk, _: (torch.from_numpy(np.ascontiguousarray(extract(chunk))),), k, FEATURE_BATCH)[0]
    return rows.numpy()


def uses_inception(dataset) -> bool:
    """Whether :func:`quality_for` scores this dataset with Inception FID (RGB images >= 32 px)."""
    shape = tuple(dataset.data_shape)
    return len(shape) == 3 and bool(getattr(dataset, "levels", None)) and shape[0] == 3 and min(shape[1:]) >= INCEPTION_MIN_SIZE


def quality_for(
    dataset,
    cache_dir: str | Path,
    inception_weights: str | None = None,
    device: torch.device | str = "cpu",
    *,
    num_reference: int | None = None,
) -> SampleQuality | None:
    """The sample-quality evaluator of an image dataset (None for non-image data).

    Single-channel images get the classifier FD ("fd_<dataset>"), trained or loaded from
    ``cache_dir``. RGB images of size >= 32 get clean-fid's FID ("fid") and KID ("kid") with the
    Inception file ``inception_weights`` (default DEFAULT_INCEPTION_WEIGHTS) against the features
    of the first ``num_reference`` (default all) training images, computed once and cached in
    ``cache_dir`` (bench/inception.py). clean-fid's own precomputed statistics are not used: their
    data files and weights are not known, and KID needs the features themselves.
    """
    shape = tuple(dataset.data_shape)
    if len(shape) != 3 or not getattr(dataset, "levels", None):
        return None
    device = torch.device(device)
    if uses_inception(dataset):
        return _inception_quality(dataset, Path(cache_dir), inception_weights, device, num_reference)
    if shape[0] == 1:
        if not dist.is_main():
            dist.barrier()  # under torchrun rank 0 trains (or loads) the classifier first, the others load it
        model, info = load_or_train_classifier(dataset, cache_dir)
        if dist.is_main():
            dist.barrier()
        model = model.to(device)
        extract = lambda k: classifier_features(model, k, dataset.levels)
        reference = feature_stats(sharded_features(extract, dataset.train_levels()))
        text = f"frechet/cnn-{dataset.name} features (test acc {info['test_accuracy']:.3f}) vs train[{reference.num}]"
        return SampleQuality(f"fd_{dataset.name}", dataset.levels, extract, reference, text, NUM_BOOTSTRAP)
    return None


def _inception_quality(
    dataset, cache_dir: Path, weights_path: str | None, device: torch.device, num_reference: int | None
) -> SampleQuality:
    if dataset.levels != 256:
        raise ValueError(f"FID needs 8-bit images, {dataset.name} has {dataset.levels} levels")
    weights = resolve_inception_weights(weights_path)
    extract = inception_extractor(weights, device)
    ref = inception_reference(dataset, extract, weights, cache_dir, num_reference)
    stats = FeatureStats(ref.mu, ref.sigma, len(ref.features))
    text = f"frechet/clean-fid inception vs {ref.source}"
    return SampleQuality("fid", dataset.levels, extract, stats, text, kid_reference=ref.features, device=device)


# Small classifier for grayscale digits ---------------------------------------------------------


class DigitCNN(nn.Module):
    """Conv net for (B, 1, H, W) images in [-1, 1]; ``features`` (B, 128), ``forward`` logits (B, 10).

    A stride-2 first layer for images of 16 pixels and up keeps MNIST training cheap.
    """

    def __init__(self, in_channels: int, size: int) -> None:
        super().__init__()
        stride = 2 if size >= 16 else 1
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, stride=stride, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(64 * 4, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))


def level_centres(k: Tensor, levels: int) -> Tensor:
    """Integer levels (N, C, H, W) -> bin centres 2 (k + 1/2) / L - 1 in [-1, 1], float32."""
    return 2.0 * (k.float() + 0.5) / levels - 1.0


@torch.no_grad()
def classifier_features(model: DigitCNN, k: Tensor, levels: int) -> np.ndarray:
    """(N, C, H, W) levels -> (N, 128) float64 penultimate features."""
    device = next(model.parameters()).device
    model.eval()
    chunks = k.split(FEATURE_BATCH)
    return torch.cat([model.features(level_centres(c, levels).to(device)).cpu() for c in chunks]).double().numpy()


@torch.no_grad()
def classifier_accuracy(model: DigitCNN, k: Tensor, labels: Tensor, levels: int) -> float:
    model.eval()
    logits = torch.cat([model(level_centres(chunk, levels)) for chunk in k.split(FEATURE_BATCH)])
    return (logits.argmax(1) == labels).double().mean().item()


def _train_classifier(model: DigitCNN, k: Tensor, labels: Tensor, levels: int, epochs: int, seed: int) -> None:
    """Adam on cross-entropy, seeded mini-batch order; in place."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=CLASSIFIER_LR)
    x = level_centres(k, levels)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(CLASSIFIER_BATCH):
            loss = nn.functional.cross_entropy(model(x[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def load_or_train_classifier(
    dataset, cache_dir: str | Path, *, epochs: int | None = None, seed: int = CLASSIFIER_SEED
) -> tuple[DigitCNN, dict]:
    """The dataset's feature classifier from ``<cache_dir>/classifiers/`` or trained now and cached.

    Returns the model (CPU, eval mode) and its JSON info (test_accuracy, train_wall_s, sha256, ...;
    ``cached`` tells whether it was loaded). A cache whose weights do not match their recorded
    sha256 is retrained.
    """
    from safetensors.torch import load_file, save_file

    arrays = dataset.arrays
    channels, size = dataset.data_shape[0], dataset.data_shape[1]
    epochs = epochs if epochs is not None else CLASSIFIER_EPOCHS.get(dataset.name, CLASSIFIER_EPOCHS["mnist"])
    key = stable_hash({
        "version": CLASSIFIER_VERSION, "dataset": dataset.name, "shape": list(dataset.data_shape),
        "levels": dataset.levels, "num_train": len(arrays.train), "epochs": epochs, "seed": seed,
    })
    stem = Path(cache_dir) / "classifiers" / f"{dataset.name}-{key}"
    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # initialisation, without touching the caller's RNG
        model = DigitCNN(channels, size)
    info = _read_info(meta, weights)
    if info is not None:
        model.load_state_dict(load_file(str(weights)))
        return model.eval(), info | {"cached": True}
    start = time.perf_counter()
    _train_classifier(model, arrays.train, arrays.train_labels, dataset.levels, epochs, seed)
    info = {
        "dataset": dataset.name, "key": key, "epochs": epochs, "seed": seed,
        "train_wall_s": time.perf_counter() - start, "num_test": len(arrays.test),
        "test_accuracy": classifier_accuracy(model, arrays.test, arrays.test_labels, dataset.levels),
    }
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    write_with(weights, lambda tmp: save_file(state, str(tmp)))
    write_json(meta, info | {"sha256": sha256_file(weights)})
    return model.eval(), info | {"cached": False}


def _read_info(meta: Path, weights: Path) -> dict | None:
    import json

    try:
        info = json.loads(meta.read_text())
        return info if weights.is_file() and sha256_file(weights) == info["sha256"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
