"""clean-fid's Inception features and the cached reference of the training images.

The extractor is clean-fid's TorchScript Inception-v3 (``inception-2015-12-05.pt``, provided by the
user, never downloaded) after clean-fid's "clean" resize to 299 x 299 (G. Parmar et al., "On
Aliased Resizing and Surprising Subtleties in GAN Evaluation", CVPR 2022, arXiv:2104.11222).

The reference (the training images' feature mean, covariance and the features themselves, which
KID needs) is computed once and cached under ``<cache>/fid_reference/`` with a key that names what
determines it: the dataset, the sha256 of its data files (:func:`data_fingerprint`), the sha256 of
the weights file, the number of images, the image shape, the resize mode and Inception's input
size. Changing any of them (a re-downloaded archive, other weights) computes a new reference.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench import dist
from bench.checkpoint import sha256_file
from bench.config import stable_hash
from bench.io import write_with

INCEPTION_FILE = "inception-2015-12-05.pt"
DEFAULT_INCEPTION_WEIGHTS = f"~/.cache/f2d2-bench/{INCEPTION_FILE}"
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILE}"
INCEPTION_SIZE = 299  # clean-fid resizes every image to 299 x 299 before Inception
RESIZE_MODE = "clean"
FEATURE_BATCH = 250  # images per feature-extraction call
REFERENCE_VERSION = 2  # 2: features stored for KID, key with data and weights hashes


class WeightsError(ValueError):
    """A feature extractor's weights file is missing or misnamed; the message says what to do."""


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
    """(N, 3, H, W) uint8 levels -> (N, 2048) float64 features with clean-fid's model and resizer."""
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    model = InceptionV3W(str(weights.parent), download=False, resize_inside=False).to(device).eval()
    resize = build_resizer(RESIZE_MODE)

    @torch.no_grad()
    def extract(k: Tensor) -> np.ndarray:
        out = []
        for i in range(0, len(k), FEATURE_BATCH):
            pixels = k[i : i + FEATURE_BATCH].permute(0, 2, 3, 1).numpy()  # clean-fid takes (H, W, 3) in [0, 255]
            batch = np.stack([resize(img) for img in pixels]).transpose(0, 3, 1, 2)
            out.append(model(torch.from_numpy(np.ascontiguousarray(batch)).to(device)).double().cpu())
        return torch.cat(out).numpy()

    return extract


def data_fingerprint(dataset) -> str:
    """sha256 naming the training data: of the dataset's files (``source_files()``: name and
    content hash of each, e.g. CIFAR-10's archive or its six batch files), else of the training
    images' bytes (datasets held in memory or shipped with a package)."""
    files = tuple(getattr(dataset, "source_files", lambda: ())())
    digest = hashlib.sha256()
    if files:
        for path in sorted(Path(p) for p in files):
            digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    else:
        train = dataset.train_levels()
        digest.update(f"{tuple(train.shape)}:{train.dtype}\n".encode())
        digest.update(train.contiguous().numpy().tobytes())
    return digest.hexdigest()


def reference_key(dataset, weights_sha256: str, num: int) -> str:
    """Cache key of the reference features: everything that determines them."""
    return stable_hash({
        "version": REFERENCE_VERSION, "dataset": dataset.name, "data_sha256": data_fingerprint(dataset),
        "extractor_sha256": weights_sha256, "num": num, "shape": list(dataset.data_shape),
        "mode": RESIZE_MODE, "inception_size": INCEPTION_SIZE,
    })


@dataclass(frozen=True)
class InceptionReference:
    """The first N training images' features (N, 2048) float32 (for KID), their float64 mean (F,)
    and covariance (F, F) (for FID), where they came from and their cache key."""

    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    source: str
    key: str


def inception_reference(
    dataset, extract: Callable[[Tensor], np.ndarray], weights: Path, cache_dir: Path, num_reference: int | None = None,
) -> InceptionReference:
    """The first ``num_reference`` (default all) training images' features: cached, or computed now
    and cached (safetensors, written atomically; 50,000 images take 410 MB as float32, Inception's
    own precision, plus 34 MB of statistics)."""
    from safetensors.numpy import load_file, save_file

    train = dataset.train_levels()
    num = min(num_reference or len(train), len(train))
    key = reference_key(dataset, sha256_file(weights), num)
    path = Path(cache_dir) / "fid_reference" / f"{dataset.name}-{key}.safetensors"
    source = f"train[{num}]"
    if dist.broadcast_object(path.is_file()):  # rank 0's view: every rank loads, or every rank computes its share
        arrays = load_file(str(path))
        return InceptionReference(arrays["features"], arrays["mu"], arrays["sigma"], source + " (cached)", key)
    from bench.fid import sharded_features

    features = sharded_features(extract, train[:num]).astype(np.float32)
    wide = features.astype(np.float64)
    arrays = {"features": features, "mu": wide.mean(0), "sigma": np.cov(wide, rowvar=False)}
    if dist.is_main():
        write_with(path, lambda tmp: save_file(arrays, str(tmp)))
    return InceptionReference(features, arrays["mu"], arrays["sigma"], source, key)
