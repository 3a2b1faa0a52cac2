"""What every dataset format's loader shares: the error for a dataset that is not on this machine, and the
check that labels are the classes 0..K-1."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .idx import IdxFormatError


class DatasetNotFoundError(FileNotFoundError):
    """The requested dataset is not on this machine; the message says how to get it."""

    # What the command line adds to the message's first line.
    hint = "Install dataset-fashion-mnist (./dev setup) or pass --data-dir."


def check_labels(labels: np.ndarray, path: Path | str, classes: int | None = None,
                 error: type[ValueError] = IdxFormatError) -> int:
    """The number of classes K of training ``labels`` (``classes`` None), or a check of test labels against K.

    The model's output width is K = the largest training label + 1, so the training labels must be the
    integers 0..K-1 with every class present: a stray label (200 among ten classes) would otherwise build a
    201-way model without a word. Test labels must lie in [0, K). Raises ``error`` naming ``path``.
    """
    if not np.issubdtype(labels.dtype, np.integer):
        raise error(f"{path}: labels must be integers, found {labels.dtype} values")
    if len(labels) == 0:
        raise error(f"{path}: no labels")
    low, high = int(labels.min()), int(labels.max())
    if classes is not None:
        if low < 0 or high >= classes:
            bad = low if low < 0 else high
            raise error(f"{path}: label {bad} lies outside [0, {classes}), the classes of the training "
                                 "labels")
        return classes
    if low < 0:
        raise error(f"{path}: label {low} is negative; labels must lie in [0, classes)")
    # More classes than examples: some class is surely empty; a bincount up to a huge label would not fit.
    counts = np.bincount(labels.astype(np.int64)) if high < max(len(labels), 1 << 20) else None
    empty = np.flatnonzero(counts == 0) if counts is not None else None
    if counts is None or len(empty):
        stray = (labels == high).sum()
        what = (f"classes {_ranges(empty)} have no training example" if empty is not None else
                f"there are only {len(labels)} training examples")
        raise error(f"{path}: label {high} ({stray} example{'s' if stray != 1 else ''}) would make "
                             f"{high + 1} classes, but {what}; labels must lie in [0, classes) with every class "
                             "present")
    return high + 1


def _ranges(values: np.ndarray) -> str:
    """[3, 4, 5, 9] -> "3-5, 9" (at most five runs, then "...")."""
    runs: list[list[int]] = []
    for v in map(int, values):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    text = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:5]]
    return ", ".join(text) + (", ..." if len(runs) > 5 else "")
