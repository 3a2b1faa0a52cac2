"""CIFAR-10 and CIFAR-100 in their python version, the folders ``cifar-10-batches-py`` and
``cifar-100-python`` of https://www.cs.toronto.edu/~kriz/cifar.html (Krizhevsky 2009, "Learning Multiple
Layers of Features from Tiny Images"), which torchvision's ``CIFAR10(download=True)`` also writes.

Each file is a pickled dict: ``data``, an N x 3072 uint8 array (the 1024 red, then green, then blue pixels
of a 32x32 image, row by row), and the labels, a list of N integers: ``labels`` in CIFAR-10 (five training
batches ``data_batch_1`` to ``data_batch_5`` of 10,000 images and ``test_batch``), ``fine_labels`` (100
classes) in CIFAR-100 (``train`` and ``test``).

Pickle is the official format, and unpickling can run code: the files are read with an unpickler that
admits only what these files hold (dicts, lists, bytes and numpy arrays) and refuses anything else, so a
file that is not what it claims fails with an error instead of running. Read only files you trust all the
same.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from .checks import DatasetNotFoundError
from .idx import DataFormatError

FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
TRAIN_FILES = {"cifar10": tuple(f"data_batch_{i}" for i in range(1, 6)), "cifar100": ("train",)}
TEST_FILES = {"cifar10": ("test_batch",), "cifar100": ("test",)}
LABEL_KEYS = {"cifar10": "labels", "cifar100": "fine_labels"}
CLASSES = {"cifar10": 10, "cifar100": 100}
IMAGE_SHAPE = (3, 32, 32)


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The numpy functions a pickled array refers to, under the module names numpy 1 and 2 write."""
    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.int64(0).__reduce__()[0]
    found = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found[(module, "_reconstruct")] = reconstruct
        found[(module, "scalar")] = scalar
    found[("builtins", "bytes")] = bytes  # an empty bytes object, in protocol 2
    found[("numpy", "ndarray")] = np.ndarray
    found[("numpy", "dtype")] = np.dtype
    # Protocol 2 pickles written by Python 3 store bytes as _codecs.encode(text, "latin1").
    import codecs

    found[("_codecs", "encode")] = codecs.encode
    return found


class _CifarUnpickler(pickle.Unpickler):
    allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        # Python 2 names (__builtin__, ...) mapped as the standard unpickler's fix_imports does.
        import _compat_pickle

        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR file does not hold") from None


class CifarNotFoundError(DatasetNotFoundError):
    """No CIFAR folder where it was looked for."""

    hint = ""  # the message says what to pass


def locate(name: str, data_dir: str | Path | None) -> Path:
    """The folder of ``name``'s files: ``data_dir`` itself or ``data_dir/<folder>`` (data_dir None: the
    LARGEBATCH_DATA_DIR variable). A folder missing one of its files is an error naming the file."""
    folder = FOLDERS[name]
    root = data_dir if data_dir is not None else os.environ.get("LARGEBATCH_DATA_DIR")
    if root is None:
        raise CifarNotFoundError(f"--dataset {name} needs --data-dir: the {folder} folder (the python version "
                                 "from https://www.cs.toronto.edu/~kriz/cifar.html) or the directory holding it")
    files = TRAIN_FILES[name] + TEST_FILES[name]
    for candidate in (Path(root) / folder, Path(root)):
        present = [f for f in files if (candidate / f).is_file()]
        if len(present) == len(files):
            return candidate
        if present:
            missing = [f for f in files if f not in present]
            raise DataFormatError(f"{candidate / missing[0]} is missing (the {folder} folder holds "
                                  f"{', '.join(files)})")
    raise CifarNotFoundError(f"{folder} not found in {root} (looked for {Path(root) / folder} and {root} itself "
                             f"holding {', '.join(files)})")


def read_batch(path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR file as (images uint8 (N, 3, 32, 32), labels int64 (N,)), checked against the format."""
    expected = (f"expected the {FOLDERS[name]} python format: a pickled dict with 'data' (N x 3072 uint8) and "
                f"'{LABEL_KEYS[name]}' (N integers in [0, {CLASSES[name]}))")
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the official files were pickled by Python 2, whose str keys become bytes here.
            content = _CifarUnpickler(f, encoding="bytes").load()
    except EOFError:
        raise DataFormatError(f"{path}: truncated (the pickle ends early); {expected}") from None
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: not a CIFAR pickle ({_one_line(e)}); {expected}") from None
    if not isinstance(content, dict):
        raise DataFormatError(f"{path}: holds a {type(content).__name__}, not a dict; {expected}")
    content = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}
    label_key = LABEL_KEYS[name]
    for key in ("data", label_key):
        if key not in content:
            keys = ", ".join(sorted(map(str, content))) or "nothing"
            raise DataFormatError(f"{path}: no '{key}' entry (it has {keys}); {expected}")
    data = content["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = (f"a {data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else f"a {type(data).__name__}")
        raise DataFormatError(f"{path}: 'data' is {what}; {expected}")
    if len(data) == 0:
        raise DataFormatError(f"{path}: no images (an empty dataset); {expected}")
    try:
        labels = np.asarray(content[label_key])
    except (ValueError, TypeError) as e:
        raise DataFormatError(f"{path}: '{label_key}' is not a list of integers ({_one_line(e)})") from None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataFormatError(f"{path}: '{label_key}' holds {labels.dtype} values of shape {labels.shape}; "
                              f"{expected}")
    if len(labels) != len(data):
        raise DataFormatError(f"{path}: {len(data)} images but {len(labels)} labels; {expected}")
    bad = labels[(labels < 0) | (labels >= CLASSES[name])]
    if len(bad):
        raise DataFormatError(f"{path}: label {int(bad[0])} lies outside [0, {CLASSES[name]}) "
                              f"({len(bad)} such label{'s' if len(bad) != 1 else ''})")
    return data.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64)


def load_cifar(name: str, data_dir: str | Path | None) -> tuple[dict[str, np.ndarray], str]:
    """The four arrays (train/test images and labels) of ``cifar10`` or ``cifar100``, and the folder read."""
    folder = locate(name, data_dir)
    arrays = {}
    for part, files in (("train", TRAIN_FILES[name]), ("test", TEST_FILES[name])):
        batches = [read_batch(folder / f, name) for f in files]
        arrays[f"{part}_images"] = np.concatenate([b[0] for b in batches])
        arrays[f"{part}_labels"] = np.concatenate([b[1] for b in batches])
    return arrays, str(folder)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
