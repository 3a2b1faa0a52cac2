"""Per-layer norms of the plain tensor layout: BLAS dots on CPU for large tensors, foreach otherwise."""

from __future__ import annotations

import pytest
import torch

from largebatch.optim import _layout
from largebatch.optim._layout import DOT_NORMS_MIN_MEAN_NUMEL, layer_norms


def _reference(tensors):
    return torch.stack([t.double().flatten().square().sum().sqrt() for t in tensors])


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_large_cpu_tensors_take_the_dots_and_match(dtype, rtol, monkeypatch):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3 * DOT_NORMS_MIN_MEAN_NUMEL + 7, generator=g, dtype=dtype), torch.zeros(3, dtype=dtype),
               torch.randn(512, 300, generator=g, dtype=dtype), torch.tensor(2.5, dtype=dtype)]
    calls, foreach_norm = [], torch._foreach_norm
    monkeypatch.setattr(_layout.torch, "_foreach_norm", lambda ts: calls.append(1) or foreach_norm(ts))
    got = layer_norms(tensors)
    assert calls == []  # the dots served
    assert got.dtype == dtype and got.shape == (4,)
    torch.testing.assert_close(got.double(), _reference(tensors), rtol=rtol, atol=0)


@pytest.mark.parametrize("case", ["small", "strided", "half", "mixed_dtypes"])
def test_other_lists_keep_foreach_norm(case):
    big = DOT_NORMS_MIN_MEAN_NUMEL * 2
    tensors = {
        "small": [torch.randn(100) for _ in range(4)],
        "strided": [torch.randn(big), torch.randn(600, 600).t()],
        "half": [torch.randn(big).to(torch.bfloat16)],
        "mixed_dtypes": [torch.randn(big), torch.randn(big, dtype=torch.float64)],
    }[case]
    got = layer_norms(tensors)
    want = torch.stack(torch._foreach_norm(tensors))
    assert torch.equal(got, want)
