"""LARS and LAMB under FSDP2 (fully_shard, DTensor) on 2 gloo processes.

Whole-layer norms with one all-reduce per step, the same trajectory as the
unsharded single-process run, new state laid out like the parameters, and
flat-parameter layouts (FSDP1) refused at construction.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from largebatch.optim import LAMB, LARS

CONFIGS = {
    "lars": (LARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02)),
    "lars_combined_nesterov": (
        LARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02,
                   denominator="combined", nesterov=True),
    ),
    "lars_single": (LARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-3, foreach=False)),
    "lamb": (LAMB, dict(lr=0.01, weight_decay=0.01)),
    "lamb_l2_clamp": (LAMB, dict(lr=0.01, weight_decay=0.01, decoupled_weight_decay=False,
                                 phi_clamp=(0.1, 10.0))),
}


def _model():
    torch.manual_seed(0)
    # uneven shards on 2 ranks: 7 and 3 rows split 4/3 and 2/1
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3))


def _batch(generator):
    return torch.randn(12, 6, generator=generator), torch.randint(0, 3, (12,), generator=generator)


def _train(model, opt, steps=4):
    g = torch.Generator().manual_seed(1)
    ratios = []
    for _ in range(steps):
        x, y = _batch(g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ratios.append(opt.last_trust_ratios[0].clone())
    return ratios


def _fsdp2_worker(rank, world_size):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world_size,))
    results = {}
    for name, (cls, kwargs) in CONFIGS.items():
        reference = _model()
        reference_ratios = _train(reference, cls(reference.parameters(), **kwargs))

        model = _model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = list(model.parameters())
        assert all(isinstance(p, DTensor) for p in params)
        opt = cls(params, **kwargs)
        ratios = _train(model, opt)  # every rank sees the same data: the mean gradient is the reference's
        full = [p.full_tensor() for p in params]
        results[name] = {
            "weights": max((a - b).abs().max().item() for a, b in zip(full, reference.parameters())),
            "ratios": max((a - b).abs().max().item() for a, b in zip(ratios, reference_ratios)),
            "state_is_dtensor": all(
                isinstance(v, DTensor)
                for state in opt.state.values() for k, v in state.items() if k != "step"
            ),
        }

        # collectives inside one optimiser step: one all-reduce for all layer norms
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
        calls = []
        original = dist.all_reduce

        def counting(*args, **kw):
            calls.append(1)
            return original(*args, **kw)

        dist.all_reduce = counting
        try:
            with torch.profiler.profile() as prof:
                opt.step()
        finally:
            dist.all_reduce = original
        results[name]["all_reduce_calls"] = len(calls)
        results[name]["collectives"] = {
            e.key: e.count for e in prof.key_averages() if e.key.startswith("c10d::")
        }

    # FSDP1 flat layouts are refused when the optimiser is built, with either use_orig_params
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    refusals = {}
    for cls in (LARS, LAMB):
        for use_orig_params in (False, True):
            flat = FSDP(_model(), use_orig_params=use_orig_params, device_id=torch.device("cpu"))
            try:
                cls(flat.parameters())
                refusals[cls.__name__, use_orig_params] = ""
            except ValueError as error:
                refusals[cls.__name__, use_orig_params] = str(error)
    results["refusals"] = refusals
    return results


@pytest.mark.distributed
def test_fsdp2_lars_lamb_match_unsharded_with_one_all_reduce_per_step():
    from _dist import run_in_group

    for result in run_in_group(_fsdp2_worker, world_size=2, timeout=240):
        for name in CONFIGS:
            r = result[name]
            assert r["weights"] < 1e-5, (name, r)
            assert r["ratios"] < 1e-5, (name, r)
            assert r["state_is_dtensor"], name
            assert r["all_reduce_calls"] == 1, (name, r)
            assert r["collectives"] == {"c10d::allreduce_": 1}, (name, r)
        for (cls, use_orig_params), message in result["refusals"].items():
            expected = "use_orig_params=True" if use_orig_params else "FlatParameter"
            assert expected in message, (cls, use_orig_params, message)
