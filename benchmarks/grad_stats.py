"""Cost of gradient statistics on CPU, as ratios to plain forward+backward.

The script is a list of benchmark functions (``BENCHMARKS``), each returning
rows (dicts with at least ``benchmark``, ``model`` and ``median_ms``); the rows
of every function go to ``benchmarks/results/grad_stats.json``.

``per_example_norms``: one training step (zero grads, forward, loss, backward)
on three models,

* ``mlp``: 784-512-512-10, batch 256;
* ``cnn``: three 3x3 convolutions (3-32-64-64 channels, 32x32 maps, two
  max-pools) and a linear classifier, batch 128;
* ``transformer``: embedding, 2 pre-norm blocks (d=128, 4 heads, MLP 4d,
  attention written with nn.Linear), tied output head, T=64, batch 32;

with these contenders, timed round-robin (each in turn runs two steps, the
second timed, so machine noise hits all alike and each is timed after a step
of its own), reported as medians and ratios to ``plain``:

* ``plain``: forward + backward;
* ``ghost``: the same with :class:`largebatch.stats.per_example.PerExampleNorms`
  attached (its accumulators read each step);
* ``func``: per-example gradients with ``torch.func`` (``vmap(grad)``) and
  their per-layer norms;
* ``opacus``: Opacus ``GradSampleModule`` in ghost-clipping mode (forward,
  loss, first backward that yields per-example norms, second backward), only
  if ``opacus`` imports with this torch (optional benchmark-only dependency,
  ``pip install opacus --no-deps``).

Usage::

    python benchmarks/grad_stats.py              # full run
    python benchmarks/grad_stats.py --quick      # few steps
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from largebatch.stats.per_example import PerExampleNorms

from _allocator import steady_malloc
from _environment import machine

RESULTS = Path(__file__).parent / "results" / "grad_stats.json"
TARGETS = {"mlp": 1.10, "cnn": 1.8, "transformer": 1.25}


# ------------------------------------------------------------------ models


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(64 * 16, 10),
    )


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 128, layers: int = 2, heads: int = 4, length: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(length, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        # materialised, not an expanded view: Opacus's embedding norm rule
        # views its index tensor (.view(-1, 1)) and fails on a stride-0 one
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
        return self.head(self.norm(self.blocks(self.embed(ids) + self.pos(positions))))


def classification_loss(out, y):
    return F.cross_entropy(out, y)


def lm_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def workloads():
    g = torch.Generator().manual_seed(0)
    return {
        "mlp": (mlp, torch.randn(256, 784, generator=g), torch.randint(0, 10, (256,), generator=g),
                classification_loss),
        "cnn": (cnn, torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g),
                classification_loss),
        "transformer": (TinyTransformer, torch.randint(0, 256, (32, 64), generator=g),
                        torch.randint(0, 256, (32, 64), generator=g), lm_loss),
    }


# ------------------------------------------------------------------ contenders


def plain_step(model, loss_fn):
    def step(x, y):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
    return step


def ghost_step(model, loss_fn):
    norms = PerExampleNorms(model)

    def step(x, y):
        model.zero_grad(set_to_none=True)
        norms.reset()
        loss_fn(model(x), y).backward()
        norms.accumulators()
    return step, norms


def func_step(model, loss_fn):
    params = {n: p for n, p in model.named_parameters()}

    def example_loss(p, x_i, y_i):
        return loss_fn(functional_call(model, p, (x_i.unsqueeze(0),)), y_i.unsqueeze(0))

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def step(x, y):
        detached = {n: p.detach() for n, p in params.items()}
        grads = per_example(detached, x, y)
        torch.stack([g.flatten(1).norm(dim=1).sum() for g in grads.values()])
    return step


def untied(model: nn.Module) -> nn.Module:
    """Opacus ghost clipping refuses tied weights: give the head its own copy."""
    if isinstance(model, TinyTransformer):
        model.head.weight = nn.Parameter(model.embed.weight.detach().clone())
    return model


def opacus_step(model, loss_fn):
    """Opacus ghost clipping: returns (step, None) or (None, reason)."""
    try:
        import opacus  # noqa: F401 - the package itself must import, not only its submodules
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
    except Exception as error:  # noqa: BLE001 - any import failure means "not available"
        return None, f"opacus unavailable: {type(error).__name__}: {error}"
    try:
        wrapped = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, use_ghost_clipping=True)
        optimizer = DPOptimizerFastGradientClipping(
            torch.optim.SGD(wrapped.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=1.0,
            expected_batch_size=1,
        )
        criterion = DPLossFastGradientClipping(wrapped, optimizer, nn.CrossEntropyLoss(reduction="mean"))
    except Exception as error:  # noqa: BLE001
        return None, f"opacus failed to wrap: {type(error).__name__}: {error}"

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        out = wrapped(x)
        shape = None
        if out.dim() == 3:  # a sequence: its per-example loss is the mean over its positions, as in lm_loss
            shape = out.shape
            out, y = out.flatten(0, 1), y.flatten()
        criterion(out, y, shape=shape).backward()
    return step, None


# ------------------------------------------------------------------ benchmarks


def time_round_robin(steps: dict[str, Callable], x, y, repeats: int, warmup: int = 3) -> dict[str, float]:
    for step in steps.values():
        for _ in range(warmup):
            step(x, y)
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            # timed after a step of its own, as in training, not after another contender's
            step(x, y)
            start = time.perf_counter()
            step(x, y)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def per_example_norms(repeats: int, models: list[str]) -> list[dict]:
    rows = []
    for name in models:
        build, x, y, loss_fn = workloads()[name]
        torch.manual_seed(0)
        base = build()
        steps = {"plain": plain_step(copy.deepcopy(base), loss_fn)}
        steps["ghost"], norms = ghost_step(copy.deepcopy(base), loss_fn)
        steps["func"] = func_step(copy.deepcopy(base), loss_fn)
        opacus, note = opacus_step(untied(copy.deepcopy(base)), loss_fn)
        if opacus is not None:
            try:
                opacus(x, y)
                steps["opacus"] = opacus
            except Exception as error:  # noqa: BLE001 - report, do not abort the other rows
                note = f"opacus failed on this model: {type(error).__name__}: {error}"
        if name == "transformer" and "opacus" in steps:
            note = "opacus ghost clipping refuses tied weights: timed with an untied head"
        median = time_round_robin(steps, x, y, repeats)
        ratios = {f"{k}/plain": v / median["plain"] for k, v in median.items() if k != "plain"}
        if "opacus" in median:
            ratios["ghost/opacus"] = median["ghost"] / median["opacus"]
        rows.append({
            "benchmark": "per_example_norms",
            "model": name,
            "batch": x.shape[0],
            "parameters": sum(p.numel() for p in base.parameters()),
            "repeats": repeats,
            "median_ms": median,
            "ratios": ratios,
            "target_ghost/plain": TARGETS[name],
            "met": ratios["ghost/plain"] <= TARGETS[name],
            "methods": norms.methods(),
            # Linear calls whose weight gradient the per-example gradients supplied
            "tapped_calls": norms.tapped_calls,
            "note": note,
        })
    return rows


# Each entry: (name, function(args) -> rows). Further statistics (e.g. DDP
# comm-hook overhead) append their own entry here.
BENCHMARKS: list[tuple[str, Callable[[argparse.Namespace], list[dict]]]] = [
    ("per_example_norms", lambda args: per_example_norms(args.repeats, args.models.split(","))),
]


def print_rows(rows: list[dict]) -> None:
    for row in rows:
        print(f"{row['benchmark']} / {row['model']}:")
        for key, value in row.get("median_ms", {}).items():
            print(f"  {key:10s} {value:9.2f} ms")
        for key, value in row.get("ratios", {}).items():
            print(f"  {key:14s} {value:7.2f}x")
        if row.get("note"):
            print(f"  note: {row['note']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 timed steps per contender")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per contender")
    parser.add_argument("--models", default="mlp,cnn,transformer")
    parser.add_argument("--only", default=None, help="comma-separated benchmark names")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (machine is shared)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--glibc-default", action="store_true", help="keep glibc's malloc thresholds (see _allocator.py)")
    args = parser.parse_args()
    args.repeats = args.repeats or (5 if args.quick else 60)
    torch.set_num_threads(args.threads)
    steady = not args.glibc_default and steady_malloc()

    load_before = os.getloadavg()  # the machine is shared: record how busy it was
    rows = []
    for name, bench in BENCHMARKS:
        if args.only and name not in args.only.split(","):
            continue
        new_rows = bench(args)
        print_rows(new_rows)
        rows.extend(new_rows)
    results = {
        **machine(),
        "malloc": "steady (glibc mmap/trim thresholds raised, _allocator.py)" if steady else "glibc default",
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
