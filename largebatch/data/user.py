"""A dataset of the user's own: ``--dataset package.module:callable``.

The callable is imported from the working directory or the Python path and called with ``data_dir`` (the
``--data-dir`` given, or None) if its signature takes it, else with no arguments. It returns
``(train, test)``, each either

* an ``(images, labels)`` pair of tensors or numpy arrays: images N x C x H x W (or N x H x W for one
  channel), labels N integers 0..K-1 with every class in the training set; or
* a ``torch.utils.data.Dataset`` whose items are ``(image, label)``: it is read once, in batches, into
  memory.

The images are used as they are (converted to float32): normalise them in the callable. The validation
split is held out of ``train`` as for the built-in datasets.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..models.user import call_with, import_callable
from .checks import check_labels
from .idx import DataFormatError


def load_user_dataset(name: str, data_dir: str | None) -> tuple[dict[str, np.ndarray], str]:
    """The four arrays from the user's callable, checked, and its name."""
    result = call_with(import_callable(name, "--dataset"), name, "--dataset", data_dir=data_dir)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise ValueError(f"--dataset {name} returned {_what(result)}; expected (train, test), each a Dataset or "
                         "an (images, labels) pair")
    arrays: dict[str, np.ndarray] = {}
    for part, value in zip(("train", "test"), result):
        images, labels = _arrays(value, name, part)
        arrays[f"{part}_images"], arrays[f"{part}_labels"] = images, labels
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DataFormatError(f"--dataset {name}: test images of shape {arrays['test_images'].shape[1:]}, training "
                              f"images of {arrays['train_images'].shape[1:]}")
    classes = check_labels(arrays["train_labels"], f"--dataset {name} (training labels)", error=DataFormatError)
    check_labels(arrays["test_labels"], f"--dataset {name} (test labels)", classes, error=DataFormatError)
    return arrays, name


def _arrays(value: Any, name: str, part: str) -> tuple[np.ndarray, np.ndarray]:
    where = f"--dataset {name} ({part})"
    if isinstance(value, (tuple, list)) and len(value) == 2 and not isinstance(value, torch.utils.data.Dataset):
        images, labels = (_numpy(v, where, what) for v, what in zip(value, ("images", "labels")))
    elif isinstance(value, torch.utils.data.Dataset) or (hasattr(value, "__getitem__") and hasattr(value, "__len__")):
        images, labels = _read_dataset(value, where)
    else:
        raise ValueError(f"{where} is {_what(value)}; expected a Dataset of (image, label) items or an (images, "
                         "labels) pair of tensors")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise DataFormatError(f"{where}: images of shape {images.shape}; expected N x C x H x W or N x H x W")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataFormatError(f"{where}: {len(images)} images but labels of shape {labels.shape}")
    if len(images) == 0:
        raise DataFormatError(f"{where}: no images (an empty dataset)")
    if not (np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)):
        raise DataFormatError(f"{where}: images of {images.dtype} values; expected numbers")
    return images.astype(np.float32, copy=False), labels


def _numpy(value: Any, where: str, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise ValueError(f"{where}: {what} is {_what(value)}; expected a tensor or a numpy array")


def _read_dataset(dataset: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A map-style Dataset of (image, label) items, read in batches by a DataLoader."""
    if len(dataset) == 0:
        raise DataFormatError(f"{where}: no images (an empty dataset)")
    first = dataset[0]
    if not isinstance(first, (tuple, list)) or len(first) != 2:
        raise ValueError(f"{where}: item 0 is {_what(first)}; expected an (image, label) pair")
    loader = torch.utils.data.DataLoader(dataset, batch_size=1024, shuffle=False)
    images, labels = [], []
    try:
        for x, y in loader:
            images.append(torch.as_tensor(x))
            labels.append(torch.as_tensor(y))
    except Exception as e:  # noqa: BLE001 - the user's Dataset: one line naming it
        raise ValueError(f"{where}: reading its items failed ({type(e).__name__}: "
                         f"{' '.join(str(e).split())})") from None
    return torch.cat(images).numpy(), torch.cat(labels).numpy()


def _what(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"an object of type {type(value).__name__}"
