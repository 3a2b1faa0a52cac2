"""Parameters for tests that run the engine's Python hooks and its compiled ones."""

import shutil

import pytest

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the native hooks")


def python_and_native(python_id: str, native_id: str) -> list:
    """``native=False`` and ``native=True`` as pytest params (the latter skipped without a compiler)."""
    return [pytest.param(False, id=python_id), pytest.param(True, id=native_id, marks=needs_compiler)]
