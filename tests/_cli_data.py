"""Shared settings of the command-line tests: a small slice of the real Fashion-MNIST."""

from __future__ import annotations

import pytest

from largebatch.data import DatasetNotFoundError, locate_idx_dir

try:
    FASHION_MNIST = str(locate_idx_dir())
except DatasetNotFoundError:
    FASHION_MNIST = None

needs_fashion_mnist = pytest.mark.skipif(FASHION_MNIST is None, reason="Fashion-MNIST idx files not installed")

# A few seconds per run: 1,024 training images, 500 validation and 500 test images.
SLICE = ["--train-limit", "1024", "--test-limit", "500", "--val-size", "500", "--no-progress"]
