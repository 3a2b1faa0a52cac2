"""Images and labels of the user's own, as numpy ``.npz`` files: ``DIR/train.npz`` and ``DIR/test.npz``, each
holding an array ``x`` of images (N x C x H x W, or N x H x W for one channel) and an array ``y`` of N
integer labels 0..K-1 (every class present in the training set). Write them with
``numpy.savez(path, x=images, y=labels)``.

uint8 images are scaled to [0, 1] as the built-in datasets are; any other numeric type is taken as it is.
The files are read with ``allow_pickle=False``: an object array (which would need unpickling) is refused.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .checks import DatasetNotFoundError, check_labels
from .idx import DataFormatError

EXPECTED = "expected arrays x (N x C x H x W or N x H x W images) and y (N integer labels)"


class NpzNotFoundError(DatasetNotFoundError):
    hint = ""  # the message says what is needed


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, C, H, W), labels (N,)) of one file, checked; a one-line DataFormatError naming the file."""
    if not path.is_file():
        raise NpzNotFoundError(f"{path} not found: --dataset npz reads DIR/train.npz and DIR/test.npz ({EXPECTED})")
    try:
        with np.load(path, allow_pickle=False) as f:
            if not isinstance(f, np.lib.npyio.NpzFile):
                raise DataFormatError(f"{path}: a single .npy array, not an .npz archive; {EXPECTED}")
            names = sorted(f.files)
            missing = [k for k in ("x", "y") if k not in names]
            if missing:
                raise DataFormatError(f"{path}: no array {missing[0]} (it holds {', '.join(names) or 'nothing'}); "
                                      f"{EXPECTED}")
            x, y = f["x"], f["y"]
    except DataFormatError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        # ValueError: an object array (allow_pickle=False) or a damaged member
        raise DataFormatError(f"{path}: cannot read it as .npz ({' '.join(str(e).split())}); {EXPECTED}") from None
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataFormatError(f"{path}: x has shape {x.shape}; {EXPECTED}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataFormatError(f"{path}: x holds {x.dtype} values; expected numbers (uint8 or float)")
    if y.ndim != 1 or len(y) != len(x):
        raise DataFormatError(f"{path}: x has {len(x)} images but y has shape {y.shape}; {EXPECTED}")
    if len(x) == 0:
        raise DataFormatError(f"{path}: no images (an empty dataset); {EXPECTED}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise DataFormatError(f"{path}: x holds NaN or infinite values")
    return x, y


def load_npz(data_dir: str | Path | None) -> tuple[dict[str, np.ndarray], str]:
    """The four arrays of DIR/train.npz and DIR/test.npz, and the directory read."""
    if data_dir is None:
        raise ValueError("--dataset npz needs --data-dir DIR, holding train.npz and test.npz")
    directory = Path(data_dir)
    train_path, test_path = directory / "train.npz", directory / "test.npz"
    train_x, train_y = read_npz(train_path)
    test_x, test_y = read_npz(test_path)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataFormatError(f"{test_path}: images of shape {test_x.shape[1:]}, but those of {train_path} are "
                              f"{train_x.shape[1:]}")
    classes = check_labels(train_y, train_path, error=DataFormatError)
    check_labels(test_y, test_path, classes, error=DataFormatError)
    arrays = {"train_images": train_x, "train_labels": train_y.astype(np.int64),
              "test_images": test_x, "test_labels": test_y.astype(np.int64)}
    return arrays, str(directory)
