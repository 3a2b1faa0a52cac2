"""Datasets that work offline, with one seeded train/validation split."""

from .datasets import (
    DATASETS,
    DatasetNotFoundError,
    ImageDataset,
    Split,
    load_dataset,
    locate_idx_dir,
)
from .idx import IdxFormatError, read_idx

__all__ = [
    "DATASETS",
    "DatasetNotFoundError",
    "IdxFormatError",
    "ImageDataset",
    "Split",
    "load_dataset",
    "locate_idx_dir",
    "read_idx",
]
