"""Image datasets: scikit-learn's 8x8 digits, MNIST and CIFAR-10, as integer levels dequantized to [-1, 1].

Images are integer levels k in {0, ..., L - 1} of shape (C, H, W); training batches and the test
set are uniformly dequantized, y = 2 (k + U) / L - 1 (:func:`f2d2.units.dequantize`), so that
bits/dim follow from the NLL of y (:func:`f2d2.units.bits_per_dim`; METHOD.md Sec. 4).

Nothing is ever downloaded. File-backed datasets read from ``data_dir``, else from the directory
named by the environment variable ``F2D2_DATA_DIR``, else from ``./data``:

    <data_dir>/mnist/train-images-idx3-ubyte, train-labels-idx1-ubyte,
                     t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte   (each may be .gz instead)
    <data_dir>/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch
        or <data_dir>/cifar-10-python.tar.gz (the official archive, read without extracting)

A missing or malformed file raises :class:`bench.datasets.DataError` with one line naming the
expected path and where to get the file.

CIFAR-10's python archive stores each batch as a Python 2 pickle of a dict with a numpy array.
Plain ``pickle.load`` would run whatever a tampered file asks for, so batches are read with an
unpickler that resolves only the three globals a numpy uint8 array needs (numpy's array
reconstructor, ``numpy.ndarray``, ``numpy.dtype``); any other global is refused. Parsing the
pickle opcodes by hand would be safe too but longer and no safer for these three names.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bench.datasets import TEST_SEED, DataError, Dataset
from f2d2.units import dequantize

DATA_DIR_ENV = "F2D2_DATA_DIR"
DEFAULT_DATA_DIR = "./data"

DIGITS_NUM_TEST = 297  # 1797 = 1500 train + 297 test
DIGITS_SPLIT_SEED = 0  # numpy RandomState(0).permutation: a stream numpy guarantees never to change

MNIST_DIR = "mnist"
MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # torchvision's mirror of LeCun's files
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049  # 0x00000803 (ubyte, 3 dims), 0x00000801 (ubyte, 1 dim)

CIFAR_ARCHIVE, CIFAR_DIR = "cifar-10-python.tar.gz", "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR_ROW = 3 * 32 * 32  # one image: 1024 red, 1024 green, 1024 blue values, each plane row-major


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir`` if given, else $F2D2_DATA_DIR, else ./data."""
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


@dataclass(frozen=True)
class ImageArrays:
    """A dataset's integer images: train/test (N, C, H, W) uint8 levels and (N,) int64 labels."""

    train: Tensor
    train_labels: Tensor
    test: Tensor
    test_labels: Tensor


class ImageDataset(Dataset):
    """Base class of finite image datasets; subclasses implement :meth:`load`.

    Files are checked when the dataset is built (so a sweep fails before training) and read on
    first use. Data are sampled with replacement for training; the test set is fixed.
    """

    sigma_0 = 1.0  # images scaled to [-1, 1] (METHOD.md Sec. 1)
    levels: int = 256
    # split sizes of the standard files, known without reading them (the cost plan needs them)
    num_train_images: int | None = None
    num_test_images: int | None = None

    def __init__(self) -> None:
        self._arrays: ImageArrays | None = None
        self._train_on_device: dict[str, Tensor] = {}

    def load(self) -> ImageArrays:
        raise NotImplementedError

    @property
    def arrays(self) -> ImageArrays:
        if self._arrays is None:
            arrays = self.load()
            for split in ("train", "test"):
                k = getattr(arrays, split)
                if tuple(k.shape[1:]) != self.data_shape or int(k.max()) >= self.levels:
                    raise DataError(
                        f"{self.name}: {split} images have shape {tuple(k.shape)} and max level {int(k.max())}, "
                        f"expected (N, *{self.data_shape}) below {self.levels}"
                    )
            self._arrays = arrays
        return self._arrays

    def source_files(self) -> tuple[Path, ...]:
        """The files the images are read from (their hashes key cached FID references); none for
        data held in memory or shipped with a package."""
        return ()

    def train_levels(self) -> Tensor:
        """All training images as integer levels, (N_train, C, H, W) uint8 on CPU."""
        return self.arrays.train

    def test_levels(self, num: int | None = None) -> Tensor:
        """The first ``num`` (all if None, at most all) test images as levels, (num, C, H, W) uint8."""
        return self.arrays.test[:num]

    def train_batch(self, num: int, generator: torch.Generator) -> Tensor:
        """(num, C, H, W) dequantized training images drawn with replacement, on the generator's device."""
        device = generator.device
        if str(device) not in self._train_on_device:  # one copy per device, not one per batch
            self._train_on_device[str(device)] = self.arrays.train.to(device)
        data = self._train_on_device[str(device)]
        idx = torch.randint(0, len(data), (num,), generator=generator, device=device)
        return dequantize(data[idx], self.levels, generator)

    def test_set(self, num: int) -> Tensor:
        """The first min(num, N_test) test images, dequantized with the fixed TEST_SEED, on CPU.

        A dataset with fewer test images (digits: 297) returns all of them: repeating images with
        fresh noise would understate the standard error of a test-set mean.
        """
        return dequantize(self.test_levels(num), self.levels, torch.Generator().manual_seed(TEST_SEED))

    def sample(self, num: int, generator: torch.Generator) -> Tensor:
        """Image datasets are finite: a "sample" is a training batch."""
        return self.train_batch(num, generator)


class Digits(ImageDataset):
    """scikit-learn's bundled 8x8 handwritten digits: 1797 images, levels 0..16, no download.

    Split: numpy RandomState(DIGITS_SPLIT_SEED).permutation(1797); its first 297 indices are the
    test set (in that order), the other 1500 the training set.
    """

    name = "digits"
    data_shape = (1, 8, 8)
    levels = 17
    num_train_images, num_test_images = 1797 - DIGITS_NUM_TEST, DIGITS_NUM_TEST
    # Measured: a flow-matching UNet (channels 32, mult (1, 2), 600 Adam steps of 256) has
    # RMS div v = 162 over t ~ U[0, 1] (65 at t = 0, 340 at t = 0.97); rounded up, as training
    # longer sharpens the field near t = 1. kappa keeps the head's target O(1).
    kappa = 200.0

    def load(self) -> ImageArrays:
        import numpy as np
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)
        labels = torch.from_numpy(bunch.target.astype(np.int64))
        perm = torch.from_numpy(np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(images)))
        test, train = perm[:DIGITS_NUM_TEST], perm[DIGITS_NUM_TEST:]
        return ImageArrays(images[train], labels[train], images[test], labels[test])


class MNIST(ImageDataset):
    """MNIST from the four standard IDX files (optionally gzipped) in ``<data_dir>/mnist/``."""

    name = "mnist"
    data_shape = (1, 28, 28)
    levels = 256
    num_train_images, num_test_images = 60_000, 10_000
    needs_files = True
    kappa = 5e3  # proposed: CIFAR-10's 2e4 scaled by the dimension ratio 784 / 3072, rounded

    def __init__(self, data_dir: str | None = None) -> None:
        super().__init__()
        self.directory = resolve_data_dir(data_dir) / MNIST_DIR
        self.paths = {stem: _plain_or_gz(self.directory / stem) for stem in MNIST_FILES}
        missing = [stem for stem, path in self.paths.items() if path is None]
        if missing:
            raise DataError(
                f"MNIST files missing in {self.directory}/: {', '.join(missing)} (or .gz); get them from "
                f"{MNIST_URL} and put them there, or pass --data-dir / set {DATA_DIR_ENV}"
            )

    def source_files(self) -> tuple[Path, ...]:
        return tuple(self.paths[stem] for stem in MNIST_FILES)

    def load(self) -> ImageArrays:
        train_x, train_y, test_x, test_y = (self.paths[stem] for stem in MNIST_FILES)
        return ImageArrays(
            torch.from_numpy(read_idx(train_x, IDX_IMAGES_MAGIC)).unsqueeze(1),
            torch.from_numpy(read_idx(train_y, IDX_LABELS_MAGIC)).long(),
            torch.from_numpy(read_idx(test_x, IDX_IMAGES_MAGIC)).unsqueeze(1),
            torch.from_numpy(read_idx(test_y, IDX_LABELS_MAGIC)).long(),
        )


class CIFAR10(ImageDataset):
    """CIFAR-10 from the official python archive (50000 train, 10000 test, 3 x 32 x 32 uint8)."""

    name = "cifar10"
    data_shape = (3, 32, 32)
    levels = 256
    num_train_images, num_test_images = 50_000, 10_000
    needs_files = True
    kappa = 2e4  # the authors' value (arXiv:2512.02636, public code)

    def __init__(self, data_dir: str | None = None) -> None:
        super().__init__()
        root = resolve_data_dir(data_dir)
        self.folder, self.archive = root / CIFAR_DIR, root / CIFAR_ARCHIVE
        if self.folder.is_dir():
            missing = [n for n in (*CIFAR_TRAIN, CIFAR_TEST) if not (self.folder / n).is_file()]
            if missing:
                raise DataError(
                    f"CIFAR-10 folder {self.folder}/ lacks {', '.join(missing)}; "
                    f"re-extract {CIFAR_ARCHIVE} from {CIFAR_URL} there"
                )
        elif not self.archive.is_file():
            raise DataError(
                f"CIFAR-10 not found: expected {self.archive} or {self.folder}/ (data_batch_1..5, test_batch); "
                f"get {CIFAR_ARCHIVE} from {CIFAR_URL} and put it there, or pass --data-dir / set {DATA_DIR_ENV}"
            )

    def source_files(self) -> tuple[Path, ...]:
        """The six batch files if the folder exists (what :meth:`load` reads), else the archive."""
        if self.folder.is_dir():
            return tuple(self.folder / n for n in (*CIFAR_TRAIN, CIFAR_TEST))
        return (self.archive,)

    def load(self) -> ImageArrays:
        names = (*CIFAR_TRAIN, CIFAR_TEST)
        if self.folder.is_dir():
            batches = {n: read_cifar_batch((self.folder / n).read_bytes(), self.folder / n) for n in names}
        else:
            batches = _read_cifar_archive(self.archive, names)
        train = [batches[n] for n in CIFAR_TRAIN]
        test = batches[CIFAR_TEST]
        return ImageArrays(
            torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), test[0], test[1]
        )


DATASETS_IMAGES: dict[str, type[ImageDataset]] = {cls.name: cls for cls in (Digits, MNIST, CIFAR10)}


# File formats ---------------------------------------------------------------------------------


def _plain_or_gz(path: Path) -> Path | None:
    gz = path.with_name(path.name + ".gz")
    return path if path.is_file() else gz if gz.is_file() else None


def read_idx(path: Path, magic: int):
    """An IDX file of unsigned bytes (LeCun's MNIST format) as a numpy uint8 array.

    Header: big-endian int32 magic (0x0000 0x08 ndim: 2049 labels, 2051 images), then ndim
    big-endian int32 sizes, then the bytes in C order.
    """
    import numpy as np

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or struct.unpack(">i", raw[:4])[0] != magic:
        raise DataError(f"{path} is not an IDX file with magic number {magic}")
    shape = struct.unpack(f">{ndim}i", raw[4:header])
    count = int(np.prod(shape))
    if len(raw) != header + count:
        raise DataError(f"{path} holds {len(raw) - header} data bytes, its header promises {count} for shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only what a pickled numpy array needs; every other global is refused."""

    def find_class(self, module: str, name: str):
        import numpy as np

        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
            ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return allowed[(module, name)]


def read_cifar_batch(raw: bytes, source: Path | str) -> tuple[Tensor, Tensor]:
    """One CIFAR-10 python batch -> (N, 3, 32, 32) uint8 images and (N,) int64 labels.

    The batch is a (Python 2) pickled dict with keys b"data" (N x 3072 uint8, channel-major rows),
    b"labels" (N ints), b"batch_label" and b"filenames" (Krizhevsky's format, read with
    encoding="bytes" as on the dataset's page).
    """
    import numpy as np

    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data, labels = batch[b"data"], batch[b"labels"]
    except Exception as err:  # a damaged pickle can fail in many ways; each is a data error
        raise DataError(f"{source} is not a CIFAR-10 python batch: {err}") from None
    is_uint8_rows = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
    if not is_uint8_rows or data.shape[1] != CIFAR_ROW or len(labels) != len(data):
        got = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{source}: expected b'data' uint8 (N, {CIFAR_ROW}) and N labels, got {got}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.as_tensor(list(labels), dtype=torch.int64)


def _read_cifar_archive(archive: Path, names: tuple[str, ...]) -> dict[str, tuple[Tensor, Tensor]]:
    """Read the named batches straight from the tar.gz; nothing is extracted to disk."""
    out = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for name in names:
                member = f"{CIFAR_DIR}/{name}"
                try:
                    handle = tar.extractfile(member)
                except KeyError:
                    handle = None
                if handle is None:
                    raise DataError(f"{archive} has no file {member}; is it the official {CIFAR_ARCHIVE}?")
                out[name] = read_cifar_batch(handle.read(), f"{archive}:{member}")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"cannot read {archive}: {err}") from None
    return out
