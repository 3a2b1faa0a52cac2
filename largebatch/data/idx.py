"""Reader for the idx format of MNIST-style datasets (LeCun et al.).

Layout: a 4-byte magic number ``0x00 0x00 <type> <ndim>``, ``ndim`` big-endian
uint32 sizes, then the data in row-major order. Files may be gzipped (the
Debian and original downloads) or raw (torchvision's ``raw/`` folder).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

# type byte -> numpy dtype (big-endian where it matters)
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataFormatError(ValueError):
    """A data file is missing a part, truncated, or holds what its format does not allow; the message is one
    line naming the file and what was expected."""


class IdxFormatError(DataFormatError):
    """An idx file is truncated, has a bad header, or is not an idx file."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (optionally gzipped) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip raises these for corrupt archives
        raise IdxFormatError(f"{path}: cannot read ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise IdxFormatError(f"{path}: not an idx file (bad magic number)")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise IdxFormatError(
            f"{path}: expected {expected} data bytes for shape {shape}, found {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))
