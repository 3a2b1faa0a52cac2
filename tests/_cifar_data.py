"""Synthetic CIFAR-10/100 folders in the official python-pickle layout, written by the tests themselves.

Each file is what the official download holds: a protocol-2 pickle of a dict with bytes keys (the files
were written by Python 2), ``data`` an N x 3072 uint8 array and the labels a list of ints. Each class has
its own mean colour, so that a few steps of training lower the loss.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def images_for(labels: np.ndarray, classes: int, rng: np.random.Generator) -> np.ndarray:
    base = (np.arange(classes)[:, None] * np.array([37, 91, 53]) % 200 + 28).astype(np.float64)  # (K, 3)
    pixels = base[labels][:, :, None] + rng.normal(0, 30, (len(labels), 3, 1024))
    return np.clip(pixels, 0, 255).astype(np.uint8).reshape(len(labels), 3072)


def write_batch(path: Path, labels: np.ndarray, classes: int, rng: np.random.Generator, label_key: bytes) -> None:
    content = {b"batch_label": b"synthetic", label_key: [int(v) for v in labels],
               b"data": images_for(labels, classes, rng), b"filenames": [b"x.png"] * len(labels)}
    path.write_bytes(pickle.dumps(content, protocol=2))


def make_cifar(root: Path, name: str = "cifar10", per_batch: int = 60, test: int = 100, seed: int = 0) -> Path:
    """``root/<folder>`` with the official file names: five training batches of ``per_batch`` images and a
    test batch (CIFAR-10), or one training file of 5 x ``per_batch`` and a test file (CIFAR-100)."""
    rng = np.random.default_rng(seed)
    folder = root / FOLDER[name]
    folder.mkdir(parents=True, exist_ok=True)
    classes = 10 if name == "cifar10" else 100
    if name == "cifar10":
        for i in range(1, 6):
            write_batch(folder / f"data_batch_{i}", rng.integers(0, classes, per_batch), classes, rng, b"labels")
        write_batch(folder / "test_batch", rng.integers(0, classes, test), classes, rng, b"labels")
    else:
        write_batch(folder / "train", np.arange(5 * per_batch) % classes, classes, rng, b"fine_labels")
        write_batch(folder / "test", rng.integers(0, classes, test), classes, rng, b"fine_labels")
    return folder
