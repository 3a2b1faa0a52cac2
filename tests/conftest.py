"""Shared test set-up: this directory is on sys.path, so tests in subdirectories (tests/distributed/)
import the helpers here (_dist, _cli_data, _method_stats, _study_records) as the others do."""

import pytest
import torch


@pytest.fixture
def float64():
    """float64 as the default dtype and a fixed seed for one test (exactness against torch.func)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)
