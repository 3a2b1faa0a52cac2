"""Datasets that work offline, and the user's own (CIFAR folders, .npz files, a callable), with one seeded
train/validation split."""

from .checks import DatasetNotFoundError
from .datasets import (
    DATASETS,
    ImageDataset,
    Split,
    check_dataset_name,
    load_dataset,
    locate_idx_dir,
)
from .idx import DataFormatError, IdxFormatError, read_idx

__all__ = [
    "DATASETS",
    "DataFormatError",
    "DatasetNotFoundError",
    "IdxFormatError",
    "ImageDataset",
    "Split",
    "check_dataset_name",
    "load_dataset",
    "locate_idx_dir",
    "read_idx",
]
