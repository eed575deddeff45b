"""Sample quality for images: Frechet distances between feature statistics (METHOD.md Sec. 4).

- "fid" (RGB, 32 x 32 and up): clean-fid's Inception-v3 features (the TorchScript file
  inception-2015-12-05.pt, which the user provides; nothing is downloaded) after clean-fid's "clean"
  resize to 299 x 299 (PIL bicubic on float pixels). G. Parmar et al., "On Aliased Resizing and
  Surprising Subtleties in GAN Evaluation", CVPR 2022, arXiv:2104.11222. The reference statistics
  are clean-fid's precomputed "<dataset>_clean_train_<res>.npz" if present locally, else computed
  from the dataset's own training images and cached.
- "fd_digits", "fd_mnist" (grayscale): the same distance in the 128-d penultimate features of a
  small CNN classifier trained once on the training split (seeded, cached as safetensors + JSON).
  It is not comparable to FID and is named accordingly.

Samples arrive as y in [-1, 1] and are quantized to integer levels (:func:`f2d2.units.to_levels`)
before feature extraction, exactly as the data are stored.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from bench.checkpoint import sha256_file
from bench.config import stable_hash
from bench.io import write_json, write_with
from f2d2.units import to_levels

INCEPTION_FILE = "inception-2015-12-05.pt"
DEFAULT_INCEPTION_WEIGHTS = f"~/.cache/f2d2-bench/{INCEPTION_FILE}"
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILE}"
INCEPTION_MIN_SIZE = 32  # below this, Inception features of upsampled images say little
FEATURE_BATCH = 250  # images per feature-extraction call
NUM_BOOTSTRAP = 50  # resamples of the samples for the classifier FD's standard error

CLASSIFIER_VERSION = 1  # bump when the architecture or training recipe changes (new cache key)
CLASSIFIER_EPOCHS = {"digits": 40, "mnist": 3}
CLASSIFIER_BATCH, CLASSIFIER_LR, CLASSIFIER_SEED = 64, 2e-3, 0
FEATURE_DIM, NUM_CLASSES = 128, 10


class WeightsError(ValueError):
    """A feature extractor's weights file is missing or misnamed; the message says what to do."""


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


class SampleQuality:
    """A Frechet distance of samples to fixed reference statistics in one feature space.

    Args:
        name: metric name ("fid", "fd_digits", ...). levels: values per pixel of the data.
        extract: (B, C, H, W) uint8 levels -> (B, F) float features (numpy).
        reference: the reference statistics. description: estimator text for result rows.
        num_bootstrap: resamples for the standard error (0: NaN).
    """

    def __init__(
        self,
        name: str,
        levels: int,
        extract: Callable[[Tensor], np.ndarray],
        reference: FeatureStats,
        description: str,
        num_bootstrap: int = 0,
    ) -> None:
        self.name, self.levels, self.extract = name, levels, extract
        self.reference, self.description, self.num_bootstrap = reference, description, num_bootstrap

    def levels_metrics(self, k: Tensor) -> list[tuple[str, float, float, str]]:
        """[(metric, value, stderr, estimator)] for integer images k (N, C, H, W)."""
        feats = self.extract(k.detach().cpu())
        value = fd_to(feats, self.reference)
        stderr = bootstrap_stderr(feats, self.reference, self.num_bootstrap)
        return [(self.name, value, stderr, self.description + (", bootstrap" if self.num_bootstrap > 1 else ""))]

    def metrics(self, samples_y: Tensor) -> list[tuple[str, float, float, str]]:
        """Metrics of samples y (N, C, H, W) in [-1, 1], quantized to the data's levels first."""
        return self.levels_metrics(to_levels(samples_y.detach().cpu(), self.levels).to(torch.uint8))


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
    precomputed_dir: str | Path | None = None,
) -> SampleQuality | None:
    """The sample-quality evaluator of an image dataset (None for non-image data).

    Single-channel images get the classifier FD ("fd_<dataset>"), trained or loaded from
    ``cache_dir``. RGB images of size >= 32 get clean-fid's FID ("fid") with the Inception file
    ``inception_weights`` (default DEFAULT_INCEPTION_WEIGHTS). Its reference: clean-fid's precomputed
    "<dataset>_clean_train_<res>.npz" when it exists in ``precomputed_dir`` (default: clean-fid's own
    stats folder) and ``num_reference`` is None; else the statistics of the first ``num_reference``
    (default all) training images, computed once and cached in ``cache_dir``.
    """
    shape = tuple(dataset.data_shape)
    if len(shape) != 3 or not getattr(dataset, "levels", None):
        return None
    device = torch.device(device)
    if uses_inception(dataset):
        return _inception_quality(dataset, Path(cache_dir), inception_weights, device, num_reference, precomputed_dir)
    if shape[0] == 1:
        model, info = load_or_train_classifier(dataset, cache_dir)
        model = model.to(device)
        extract = lambda k: classifier_features(model, k, dataset.levels)
        reference = feature_stats(extract(dataset.train_levels()))
        text = f"frechet/cnn-{dataset.name} features (test acc {info['test_accuracy']:.3f}) vs train[{reference.num}]"
        return SampleQuality(f"fd_{dataset.name}", dataset.levels, extract, reference, text, NUM_BOOTSTRAP)
    return None


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


# Inception (clean-fid) -------------------------------------------------------------------------


def resolve_inception_weights(path: str | Path | None) -> Path:
    """The weights file: ``path`` (the file or its directory) or DEFAULT_INCEPTION_WEIGHTS; never downloads."""
    target = Path(path or DEFAULT_INCEPTION_WEIGHTS).expanduser()
    if target.is_dir():
        target = target / INCEPTION_FILE
    if target.name != INCEPTION_FILE:
        raise WeightsError(f"Inception weights must be a file named {INCEPTION_FILE} (clean-fid's name), got {target}")
    if not target.is_file():
        raise WeightsError(
            f"Inception weights not found: expected {target}; download {INCEPTION_URL} yourself "
            "and put it there, or pass --inception-weights PATH"
        )
    return target


def inception_extractor(weights: Path, device: torch.device) -> Callable[[Tensor], np.ndarray]:
    """(N, 3, H, W) uint8 levels -> (N, 2048) features with clean-fid's model and "clean" resizer."""
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    model = InceptionV3W(str(weights.parent), download=False, resize_inside=False).to(device).eval()
    resize = build_resizer("clean")

    @torch.no_grad()
    def extract(k: Tensor) -> np.ndarray:
        out = []
        for i in range(0, len(k), FEATURE_BATCH):
            pixels = k[i : i + FEATURE_BATCH].permute(0, 2, 3, 1).numpy()  # clean-fid takes (H, W, 3) in [0, 255]
            batch = np.stack([resize(img) for img in pixels]).transpose(0, 3, 1, 2)
            out.append(model(torch.from_numpy(np.ascontiguousarray(batch)).to(device)).double().cpu())
        return torch.cat(out).numpy()

    return extract


def _inception_quality(
    dataset, cache_dir: Path, weights_path: str | None, device: torch.device, num_reference: int | None,
    precomputed_dir: str | Path | None,
) -> SampleQuality:
    if dataset.levels != 256:
        raise ValueError(f"FID needs 8-bit images, {dataset.name} has {dataset.levels} levels")
    weights = resolve_inception_weights(weights_path)
    extract = inception_extractor(weights, device)
    reference, source = inception_reference(dataset, extract, weights, cache_dir, num_reference, precomputed_dir)
    return SampleQuality("fid", dataset.levels, extract, reference, f"frechet/clean-fid inception vs {source}")


def inception_reference(
    dataset, extract: Callable[[Tensor], np.ndarray], weights: Path, cache_dir: Path, num_reference: int | None,
    precomputed_dir: str | Path | None,
) -> tuple[FeatureStats, str]:
    """Reference statistics and where they came from: clean-fid's precomputed file, our cache, or computed now."""
    from safetensors.torch import load_file, save_file

    if num_reference is None:
        if precomputed_dir is None:
            import cleanfid

            precomputed_dir = Path(cleanfid.__file__).parent / "stats"
        npz = Path(precomputed_dir) / f"{dataset.name}_clean_train_{dataset.data_shape[-1]}.npz".lower()
        if npz.is_file():
            with np.load(npz, allow_pickle=False) as stats:
                return FeatureStats(stats["mu"], stats["sigma"], -1), f"clean-fid precomputed {npz.name}"
    train = dataset.train_levels()
    num = min(num_reference or len(train), len(train))
    key = stable_hash({"dataset": dataset.name, "weights": sha256_file(weights), "num": num, "mode": "clean"})
    path = cache_dir / "fid_reference" / f"{dataset.name}-{key}.safetensors"
    source = f"train[{num}] statistics"
    if path.is_file():
        tensors = load_file(str(path))
        return FeatureStats(tensors["mu"].numpy(), tensors["sigma"].numpy(), num), source + " (cached)"
    stats = feature_stats(extract(train[:num]))
    tensors = {"mu": torch.from_numpy(stats.mu), "sigma": torch.from_numpy(stats.sigma)}
    write_with(path, lambda tmp: save_file(tensors, str(tmp)))
    return stats, source
