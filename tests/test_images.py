"""Image data (digits, MNIST IDX files, CIFAR-10 python batches) and the UNet flow-map network.

The file loaders are tested on small files written here in the real formats: IDX with its magic
numbers (plain and gzip), and CIFAR-10 batches as Python 2 protocol-2 pickles (str keys and numpy's
``numpy.core.multiarray._reconstruct``, as in the official archive) inside a tar.gz or a folder.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch

from bench.datasets import DataError
from bench.images import CIFAR10, DATASETS_IMAGES, MNIST, Digits
from f2d2.divergence import exact_trace
from f2d2.unet import UNetNet
from f2d2.units import to_levels

# File writers in the real formats ---------------------------------------------------------------


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    """LeCun's IDX: magic 0x0000 0x08 ndim, ndim big-endian int32 sizes, then unsigned bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def write_mnist(root, num_train=5, num_test=3, compress_test=True, seed=0):
    rng = np.random.default_rng(seed)
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, num_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, num_test, dtype=np.uint8),
    }
    (root / "mnist").mkdir(parents=True)
    for name, array in data.items():
        write_idx(root / "mnist" / name, array, compress=compress_test and name.startswith("t10k"))
    return data


class Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2's cPickle wrote it: str and bytes are 8-bit strings (SHORT_BINSTRING /
    BINSTRING) and numpy's reconstructor lives in numpy.core.multiarray."""

    def save_string8(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[str] = save_string8
    dispatch[bytes] = save_string8
    dispatch[type] = save_global


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def cifar_batch(num: int, seed: int, label: str) -> tuple[bytes, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (num, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, num).tolist()
    batch = {b"batch_label": label.encode(), b"labels": labels, b"data": data,
             b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(num)]}
    return py2_pickle(batch), data, labels


CIFAR_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar(root, as_archive: bool):
    """Five 2-image training batches and a 3-image test batch; returns the raw arrays."""
    sizes = {name: 3 if name == "test_batch" else 2 for name in CIFAR_NAMES}
    batches = {name: cifar_batch(sizes[name], seed, name) for seed, name in enumerate(CIFAR_NAMES)}
    if as_archive:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            for name, (raw, _, _) in batches.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    else:
        (root / "cifar-10-batches-py").mkdir()
        for name, (raw, _, _) in batches.items():
            (root / "cifar-10-batches-py" / name).write_bytes(raw)
    return batches


# MNIST -----------------------------------------------------------------------------------------


def test_mnist_reads_plain_and_gzipped_idx(tmp_path):
    data = write_mnist(tmp_path)
    assert (tmp_path / "mnist" / "train-images-idx3-ubyte").read_bytes()[:4] == b"\x00\x00\x08\x03"
    assert gzip.decompress((tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())[:4] == b"\x00\x00\x08\x01"
    ds = MNIST(str(tmp_path))
    assert torch.equal(ds.train_levels(), torch.from_numpy(data["train-images-idx3-ubyte"]).unsqueeze(1))
    assert torch.equal(ds.arrays.train_labels, torch.from_numpy(data["train-labels-idx1-ubyte"]).long())
    assert torch.equal(ds.test_levels(), torch.from_numpy(data["t10k-images-idx3-ubyte"]).unsqueeze(1))
    assert ds.test_levels(2).shape == (2, 1, 28, 28) and ds.levels == 256


def test_mnist_data_dir_from_environment(tmp_path, monkeypatch):
    write_mnist(tmp_path)
    monkeypatch.setenv("F2D2_DATA_DIR", str(tmp_path))
    assert MNIST(None).train_levels().shape == (5, 1, 28, 28)


def test_mnist_missing_files_name_the_path(tmp_path):
    with pytest.raises(DataError) as err:
        MNIST(str(tmp_path))
    message = str(err.value)
    assert str(tmp_path / "mnist") in message and "train-images-idx3-ubyte" in message and "\n" not in message


def test_mnist_wrong_magic_or_size_is_a_data_error(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    raw = path.read_bytes()
    path.write_bytes(b"\x00\x00\x08\x01" + raw[4:])  # a labels magic on an images file
    with pytest.raises(DataError, match="magic number 2051"):
        MNIST(str(tmp_path)).train_levels()
    path.write_bytes(raw[:-1])  # truncated
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        MNIST(str(tmp_path)).train_levels()


# CIFAR-10 --------------------------------------------------------------------------------------


def test_cifar_test_writer_matches_the_official_python2_format():
    raw, _, _ = cifar_batch(2, 0, "x")
    assert raw[:2] == b"\x80\x02"
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"U\x04data" in raw and b"U\x06labels" in raw


@pytest.mark.parametrize("as_archive", [True, False], ids=["tar.gz", "folder"])
def test_cifar_reads_archive_and_folder(tmp_path, as_archive):
    batches = write_cifar(tmp_path, as_archive)
    ds = CIFAR10(str(tmp_path))
    train, test = ds.train_levels(), ds.test_levels()
    assert train.shape == (10, 3, 32, 32) and test.shape == (3, 3, 32, 32) and train.dtype == torch.uint8
    first = batches["data_batch_1"][1][0]
    # rows are channel-major: 1024 red, then 1024 green, then 1024 blue values, each row-major
    assert torch.equal(train[0, 0], torch.from_numpy(first[:1024].reshape(32, 32)))
    assert torch.equal(train[0, 2], torch.from_numpy(first[2048:].reshape(32, 32)))
    assert torch.equal(train[-1].flatten(), torch.from_numpy(batches["data_batch_5"][1][-1]))
    assert ds.arrays.train_labels.tolist() == sum((batches[n][2] for n in CIFAR_NAMES[:5]), [])
    assert ds.arrays.test_labels.tolist() == batches["test_batch"][2]


def test_cifar_missing_files_name_the_path(tmp_path):
    with pytest.raises(DataError) as err:
        CIFAR10(str(tmp_path))
    message = str(err.value)
    assert str(tmp_path / "cifar-10-python.tar.gz") in message and "cifar-10-batches-py" in message
    assert "\n" not in message
    write_cifar(tmp_path, as_archive=False)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        CIFAR10(str(tmp_path))


def test_cifar_refuses_pickles_that_call_arbitrary_code(tmp_path):
    write_cifar(tmp_path, as_archive=False)
    sentinel = tmp_path / "pwned"
    evil = b"cos\nsystem\n(S'touch " + str(sentinel).encode() + b"'\ntR."
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(evil)
    with pytest.raises(DataError, match="os.system is not allowed"):
        CIFAR10(str(tmp_path)).train_levels()
    assert not sentinel.exists()


# Digits and dequantization ---------------------------------------------------------------------


def test_digits_has_1797_images_with_17_levels_and_a_fixed_split():
    ds = Digits()
    train, test = ds.train_levels(), ds.test_levels()
    assert train.shape == (1500, 1, 8, 8) and test.shape == (297, 1, 8, 8)
    assert ds.levels == 17 and int(train.min()) == 0 and int(train.max()) == 16
    # pinned: numpy RandomState(0).permutation(1797)[:297] is the test set
    assert int(test.sum()) == 92641 and ds.arrays.test_labels[:5].tolist() == [2, 8, 2, 6, 6]
    from sklearn.datasets import load_digits

    every = torch.from_numpy(load_digits().images).flatten(1).long()
    split = torch.cat([train, test]).flatten(1).long()
    assert torch.equal(split.sum(0), every.sum(0)) and torch.equal(split.pow(2).sum(0), every.pow(2).sum(0))
    assert DATASETS_IMAGES["digits"] is Digits and ds.kappa > 0 and ds.sigma_0 == 1.0


def test_dequantized_batches_lie_in_range_and_round_trip():
    ds = Digits()
    batch = ds.train_batch(512, torch.Generator().manual_seed(3))
    assert batch.shape == (512, 1, 8, 8) and batch.min() >= -1 and batch.max() <= 1
    levels = to_levels(batch, 17)
    train = {tuple(img.flatten().tolist()) for img in ds.train_levels()}
    assert all(tuple(img.flatten().tolist()) in train for img in levels)
    again = ds.train_batch(512, torch.Generator().manual_seed(3))
    other = ds.train_batch(512, torch.Generator().manual_seed(4))
    assert torch.equal(batch, again) and not torch.equal(batch, other)
    # fresh dequantization noise: the fractional part inside each level is spread, not constant
    frac = (batch + 1) / 2 * 17 - levels
    assert 0.4 < frac.mean() < 0.6 and frac.std() > 0.25


def test_test_set_is_fixed_capped_and_round_trips():
    ds = Digits()
    a, b = ds.test_set(100), ds.test_set(100)
    assert torch.equal(a, b) and a.device.type == "cpu"
    assert torch.equal(to_levels(a, 17), ds.test_levels(100).long())
    assert len(ds.test_set(5000)) == 297


# UNet ------------------------------------------------------------------------------------------


def randomize(net: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """Perturb every weight so that no layer is trivial (the output layers start small)."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


SHAPES = [((1, 8, 8), (1, 2)), ((1, 28, 28), (1, 2)), ((1, 28, 28), (1, 2, 2, 2)), ((3, 32, 32), (1, 2, 2))]


@pytest.mark.parametrize("shape, mult", SHAPES)
@pytest.mark.parametrize("pool", ["mlp", "gap"])
def test_unet_output_shapes(shape, mult, pool):
    net = UNetNet(shape, 8, mult, 1, True, pool)
    x, t, s = torch.randn(3, *shape), torch.rand(3), torch.rand(3)
    out = net(x, t, s)
    assert out.u.shape == (3, *shape) and out.div.shape == (3,)
    assert torch.isfinite(out.u).all() and torch.isfinite(out.div).all()
    assert UNetNet(shape, 8, mult, 1, False, pool)(x, t, s).div is None


def test_unet_28x28_pads_only_when_the_levels_need_it():
    assert UNetNet((1, 28, 28), 8, (1, 2, 2), 1, False, "mlp").pad == (0, 0, 0, 0)
    assert UNetNet((1, 28, 28), 8, (1, 2, 2, 2), 1, False, "mlp").pad == (2, 2, 2, 2)


def test_unet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="div_pool"):
        UNetNet((1, 8, 8), 8, (1, 2), 1, True, "max")
    with pytest.raises(ValueError, match="image data"):
        UNetNet((64,), 8, (1, 2), 1, False, "mlp")


def test_unet_gradients_reach_every_parameter_at_init():
    net = UNetNet((1, 8, 8), 8, (1, 2), 1, True, "mlp")
    out = net(torch.randn(4, 1, 8, 8), torch.rand(4), torch.rand(4))
    (out.u.pow(2).sum() + out.div.pow(2).sum() + out.u.sum() + out.div.sum()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_unet_exact_divergence_equals_dense_jacobian_trace(float64):
    torch.manual_seed(1)
    net = randomize(UNetNet((1, 8, 8), 4, (1, 2), 1, True, "gap"))
    x, t, s = torch.randn(2, 1, 8, 8), torch.rand(2), torch.rand(2)
    field = lambda z: net(z, t, s).u
    _, trace = exact_trace(field, x, chunk_size=16)
    jac = torch.autograd.functional.jacobian(field, x).reshape(2, 64, 2, 64)
    dense = torch.stack([jac[b, :, b, :].diagonal().sum() for b in range(2)])
    torch.testing.assert_close(trace.detach(), dense, rtol=1e-10, atol=1e-10)
    assert dense.abs().min() > 1e-3  # the randomised net has a non-trivial divergence
    assert jac[0, :, 1, :].abs().max() == 0  # and samples do not interact


def test_unet_forward_mode_jvp_matches_finite_differences(float64):
    torch.manual_seed(2)
    net = randomize(UNetNet((1, 28, 28), 4, (1, 2, 2, 2), 1, True, "mlp"))
    x, t, s = torch.randn(2, 1, 28, 28), torch.rand(2), torch.rand(2)
    tangents = (torch.randn_like(x), torch.ones_like(t), torch.zeros_like(s))  # MeanFlow's (v, 1, 0)
    fn = lambda a, b, c: (net(a, b, c).u, net(a, b, c).div)
    _, (du, d_div) = torch.func.jvp(fn, (x, t, s), tangents)
    h = 1e-6
    plus = fn(*(p + h * v for p, v in zip((x, t, s), tangents)))
    minus = fn(*(p - h * v for p, v in zip((x, t, s), tangents)))
    torch.testing.assert_close(du, (plus[0] - minus[0]) / (2 * h), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_div, (plus[1] - minus[1]) / (2 * h), rtol=1e-5, atol=1e-6)
    assert du.abs().max() > 1e-3


@pytest.mark.parametrize("shape, mult", [((1, 8, 8), (1, 2)), ((1, 28, 28), (1, 2, 2, 2))])
def test_unet_samples_do_not_interact(shape, mult):
    net = randomize(UNetNet(shape, 8, mult, 1, True, "mlp"))
    x, t, s = torch.randn(2, *shape), torch.rand(2), torch.rand(2)
    out = net(x, t, s)
    x2, t2, s2 = x.clone(), t.clone(), s.clone()
    x2[1], t2[1], s2[1] = torch.randn(shape), 0.9, 0.1
    out2 = net(x2, t2, s2)
    torch.testing.assert_close(out2.u[0], out.u[0], rtol=0, atol=0)
    torch.testing.assert_close(out2.div[0], out.div[0], rtol=0, atol=0)
    assert not torch.allclose(out2.u[1], out.u[1])


def test_quality_floor_scores_distinct_test_images_only():
    """Duplicated test images inflate a Frechet distance, so the floor never repeats one: it scores
    `num` distinct images when the split has them, else the whole split, and says which."""
    from bench.sweep import _quality_floor

    class Split:
        def __init__(self, n):
            self.levels = torch.arange(n).reshape(n, 1)

        def test_levels(self):
            return self.levels

    class DistinctCount:
        def levels_metrics(self, levels):
            return [("fd", float(len(torch.unique(levels))), float(len(levels)), "count")]

    big = _quality_floor(DistinctCount(), Split(500), num=200, seed=0)["fd"]
    assert (big["value"], big["stderr"]) == (200.0, 200.0)
    assert big["estimator"] == "count; 200 distinct test images"
    small = _quality_floor(DistinctCount(), Split(50), num=200, seed=0)["fd"]
    assert (small["value"], small["stderr"]) == (50.0, 50.0) and "fewer than the 200 samples" in small["estimator"]
    assert _quality_floor(None, Split(5), num=3, seed=0) == {}
