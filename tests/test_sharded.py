"""Per-layer norms of sharded parameters, and the methods under FSDP2 (fully_shard) on 2 gloo processes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _method_stats import Summary
from largebatch.optim._sharded import check_not_flat, layer_sq_norms


def test_plain_tensors():
    ts = [torch.randn(3, 4), torch.zeros(5), torch.randn(7)]
    expected = torch.stack([t.pow(2).sum() for t in ts])
    torch.testing.assert_close(layer_sq_norms(ts), expected)


def test_flat_layouts_are_refused():
    flat = nn.Parameter(torch.zeros(10))
    flat._is_flat_param = True
    with pytest.raises(ValueError, match="FlatParameter"):
        layer_sq_norms([flat])
    view = torch.zeros(4)
    view._fsdp_flattened = True
    with pytest.raises(ValueError, match="use_orig_params"):
        check_not_flat([view])


class SeededStats:
    """Statistics drawn from a seed, the same on every rank and in the unsharded run."""

    def __init__(self, params, n=4, seed=0):
        self.params, self.n = list(params), n
        self.generator = torch.Generator().manual_seed(seed)

    def index_of(self, p):
        return next(k for k, q in enumerate(self.params) if q is p)

    def summary(self):
        K, g = len(self.params), self.generator
        B = torch.rand(K, generator=g) + 0.5
        A = B * (1 + torch.rand(K, generator=g) * (self.n - 1))
        mean_norm = B.sqrt() * (1 + torch.rand(K, generator=g))
        return Summary(self.n, A, B, 16, mean_norm, mean_norm.pow(2) * 1.5)

    def reset(self):
        pass


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3))


def _make(name, params, stats):
    from largebatch.optim.adascale import AdaScale
    from largebatch.optim.clars import CLARS
    from largebatch.optim.lena import LENA

    if name == "clars":
        return CLARS(params, lr=1.0, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02, stats=stats)
    if name == "lena":
        return LENA(params, lr=0.05, stats=stats, base_iterations=40, alpha=0.2)
    return AdaScale(params, lr=0.05, momentum=0.9, weight_decay=1e-3, stats=stats)


def _train(model, opt, steps=4):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _fsdp2_worker(rank, world_size):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import largebatch.optim._sharded as sharded

    mesh = init_device_mesh("cpu", (world_size,))
    results = {}
    for name in ("clars", "lena", "adascale"):
        reference = _model()
        _train(reference, _make(name, list(reference.parameters()), SeededStats(reference.parameters())))

        model = _model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = list(model.parameters())
        assert all(isinstance(p, DTensor) for p in params)
        # every rank trains on the same data, so the averaged gradient is the single-process one
        opt = _make(name, params, SeededStats(params))
        _train(model, opt)
        full = [p.full_tensor() for p in params]
        results[name] = max((a - b).abs().max().item() for a, b in zip(full, reference.parameters()))
        # collectives inside one optimiser step: one all-reduce for all layer norms, none per tensor
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
        with torch.profiler.profile() as prof:
            opt.step()
        results[name + "_collectives"] = {e.key: e.count for e in prof.key_averages() if e.key.startswith("c10d::")}

    # one all-reduce per call, whatever the number of layers, and full-tensor norms
    calls = []
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        sq = sharded.layer_sq_norms(params)
    finally:
        dist.all_reduce = original
    expected = torch.stack([p.full_tensor().pow(2).sum() for p in params])
    results["norm_error"] = (sq - expected).abs().max().item()
    results["all_reduces"] = len(calls)

    # FSDP1 flat layouts are refused by the layer-wise methods, with either use_orig_params
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    refusals = []
    for use_orig_params in (False, True):
        flat = FSDP(_model(), use_orig_params=use_orig_params, device_id=torch.device("cpu"))
        flat_params = list(flat.parameters())
        opt = _make("clars", flat_params, SeededStats(flat_params))
        _inputs = torch.randn(4, 6)
        flat(_inputs).sum().backward()
        try:
            opt.step()
            refusals.append("")
        except ValueError as error:
            refusals.append(str(error))
    results["refusals"] = refusals
    return results


@pytest.mark.distributed
def test_fsdp2_matches_unsharded_single_process():
    from _dist import run_in_group

    for result in run_in_group(_fsdp2_worker, world_size=2, timeout=180):
        assert result["all_reduces"] == 1
        assert result["norm_error"] < 1e-5
        assert "FlatParameter" in result["refusals"][0] and "use_orig_params=True" in result["refusals"][1]
        for name in ("clars", "lena", "adascale"):
            assert result[name] < 1e-5, (name, result[name])
        # CLARS: one all-reduce for every layer's weight norm; LENA and AdaScale need no norm
        # of their own (the loss scale comes from the statistics source, not from p.grad)
        assert result["clars_collectives"] == {"c10d::allreduce_": 1}, result
        assert result["lena_collectives"] == {} and result["adascale_collectives"] == {}, result
