"""The engine's squared-norm helpers against a per-tensor formula."""

from __future__ import annotations

import pytest
import torch

from largebatch.stats._norms import sq_norm_into, sq_norms


def _reference(tensors):
    return torch.stack([t.detach().double().square().sum() for t in tensors])


def _tensors(count: int):
    g = torch.Generator().manual_seed(count)
    shapes = [(5, 3), (7,), (2, 3, 4)]
    return [torch.randn(shapes[i % 3], generator=g) for i in range(count)]


@pytest.mark.parametrize("count", [3, 40])  # a dot each, and one _foreach_norm
def test_sq_norms_gives_zero_for_missing_gradients(count):
    tensors = _tensors(count)
    with_gaps = [None if i % 4 == 1 else t for i, t in enumerate(tensors)]
    got = sq_norms(with_gaps, torch.float64, torch.device("cpu"))
    want = torch.stack([torch.zeros((), dtype=torch.float64) if t is None else t.double().square().sum() for t in with_gaps])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(6, 5).t(),  # a strided view
        lambda: torch.randn(64, 3).half(),  # half precision, accumulated in float32
        lambda: torch.randn(4, 4, requires_grad=True) * 2,  # a gradient of backward(create_graph=True)
    ],
)
def test_sq_norm_into_other_tensors(make):
    t = make()
    out = torch.zeros(2)
    sq_norm_into(t, out[0])
    assert not out.requires_grad
    torch.testing.assert_close(out[0].double(), _reference([t])[0], rtol=1e-3 if t.dtype == torch.half else 1e-6, atol=0)
    assert out[1].item() == 0.0


@pytest.mark.parametrize("count", [3, 40])
def test_sparse_gradients(count):
    # An uncoalesced COO tensor (index 1 twice: its entries add) and a CSR one, as Embedding(sparse=True) makes.
    coo = torch.sparse_coo_tensor(torch.tensor([[1, 3, 1]]), torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), (5, 2))
    csr = torch.tensor([[0.0, 2.0], [3.0, 0.0]]).to_sparse_csr()
    tensors = [coo, csr] + _tensors(count)[2:]
    dense = [t.to_dense() for t in tensors]
    torch.testing.assert_close(sq_norms(tensors, torch.float64, torch.device("cpu")), _reference(dense), rtol=1e-12, atol=0)
