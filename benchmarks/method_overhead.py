"""End-to-end training-step overhead of LENA, CLARS and AdaScale over their baselines, on CPU.

One timed step is what a training loop does for one update of a global batch
of n micro-batches of 128 examples (n = 4 by default, B = 512): ``zero_grad``,
n forward + backward passes (the loss divided by n), the gradient statistics
the method needs (collected by hooks during the backwards, summarised in the
step), ``optimizer.step()`` and the scheduler step. Pairs, each measured on its
own copy of the same model with the same data:

* ``lena`` vs ``lsw``: :class:`largebatch.LENA` (its statistics and per-layer
  warm-up, exponential decay) vs momentum SGD with linear scaling and warm-up
  (``torch.optim.SGD`` + a ``LambdaLR`` warm-up and decay). The LENA paper
  reports a throughput about 5% below fixed scaling.
* ``clars`` vs ``lars``: :class:`largebatch.CLARS` with per-example norms from
  the statistics engine (ghost norms; BatchNorm layers fall back to the
  micro-batch norms) vs :class:`largebatch.LARS`; also ``clars/sgd``, the
  whole CLARS update over a momentum-SGD update at the same batch.
  ``--clars-strategies measure,ghost,bmm,conv-backward`` adds one CLARS
  contender per per-example strategy (``clars:<strategy>``, the engine's
  ``per_example_strategy``; ``clars`` itself is the default ``"rule"``),
  each with its ratios to ``lars`` and ``sgd`` in the same run.
* ``adascale`` vs ``sgd``: :class:`largebatch.AdaScale` with
  :class:`largebatch.ProgressLR` (one host read of tau per step) vs
  ``torch.optim.SGD``.

Models: LeNet-5 with BatchNorm (``largebatch.models.LeNet5(batch_norm=True)``,
28x28 inputs), the MLP (784-512-512-10) and, with ``--models resnet20``,
``largebatch.models.ResNet20`` (32x32x3 inputs). All contenders step once per
round, round-robin, so machine noise hits all alike; the JSON holds the
medians (also split into the backwards, with the statistics hooks, and the
rest: summary, step, scheduler), the ratio of the medians and the median of
the per-round ratios, the thread count and the machine's load average before
and after.

Usage::

    python benchmarks/method_overhead.py            # 30 timed rounds
    python benchmarks/method_overhead.py --quick    # 8 timed rounds
    python benchmarks/method_overhead.py --models lenet5-bn,resnet20,mlp --clars-strategies measure,bmm,conv-backward
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

import largebatch
from largebatch.models import MLP, LeNet5, ResNet20
from largebatch.stats import GradientStatistics
from largebatch.stats.strategy import MODES

from _environment import machine

RESULTS = Path(__file__).parent / "results" / "method_overhead.json"
MICRO_BATCH = 128
PAIRS = (("lena", "lsw"), ("clars", "lars"), ("adascale", "sgd"), ("clars", "sgd"))
INPUT_SHAPES = {"lenet5-bn": (1, 28, 28), "mlp": (784,), "resnet20": (3, 32, 32)}
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


def models() -> dict[str, Callable[[], nn.Module]]:
    return {"lenet5-bn": lambda: LeNet5(batch_norm=True), "mlp": MLP, "resnet20": lambda: ResNet20(in_channels=3)}


def make_contender(name: str, model: nn.Module, n: int, steps: int):
    """(optimiser, scheduler or None); statistics sources are attached to ``model``."""
    sgd = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    if name in ("lsw", "sgd"):
        opt = torch.optim.SGD(model.parameters(), **sgd)
        if name == "sgd":
            return opt, None
        warmup = max(1, steps // 20)  # linear scaling (lr * n) and gradual warm-up, then decay
        return opt, torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: n * min((t + 1) / warmup, 1.0) * 0.01 ** (t / steps)
        )
    if name == "lars":
        return largebatch.LARS(model.parameters(), lr=LR * n, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY), None
    if name == "lena":
        opt = largebatch.LENA(model.parameters(), stats=GradientStatistics(model), base_iterations=steps * n, **sgd)
        return opt, torch.optim.lr_scheduler.ExponentialLR(opt, 0.01 ** (1 / steps))
    if name == "clars" or name.startswith("clars:"):
        strategy = name.partition(":")[2] or "rule"
        stats = GradientStatistics(model, per_example=True, per_example_strategy=strategy)
        return largebatch.CLARS(model.parameters(), stats=stats, lr=LR * n, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY), None
    if name == "adascale":
        opt = largebatch.AdaScale(model.parameters(), stats=GradientStatistics(model), **sgd)
        return opt, largebatch.ProgressLR(opt, lambda tau: 0.01 ** (tau / (steps * n)))
    raise ValueError(name)


def training_step(model: nn.Module, opt, scheduler, batches) -> Callable[[], float]:
    """One update; returns the seconds spent in the backwards (forward + backward + statistics hooks)."""
    n = len(batches)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        start = time.perf_counter()
        for x, y in batches:
            (F.cross_entropy(model(x), y) / n).backward()
        backwards = time.perf_counter() - start
        opt.step()
        if scheduler is not None:
            scheduler.step()
        return backwards

    return step


def time_round_robin(steps: dict[str, Callable[[], float]], rounds: int, warmup: int):
    """Per contender: total step seconds and, of those, seconds in the backwards, one entry per round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    backwards: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            backwards[name].append(step())
            times[name].append(time.perf_counter() - start)
    return times, backwards


def benchmark_model(
    name: str, build: Callable[[], nn.Module], n: int, rounds: int, warmup: int, clars_strategies: tuple[str, ...] = ()
) -> dict:
    torch.manual_seed(0)
    base = build()
    g = torch.Generator().manual_seed(1)
    shape = INPUT_SHAPES[name]
    batches = [
        (torch.randn(MICRO_BATCH, *shape, generator=g), torch.randint(0, 10, (MICRO_BATCH,), generator=g))
        for _ in range(n)
    ]
    total = warmup + rounds
    pairs = PAIRS + tuple((f"clars:{s}", ref) for s in clars_strategies for ref in ("lars", "sgd"))
    steps = {}
    for contender in dict.fromkeys(c for pair in pairs for c in pair):
        model = copy.deepcopy(base).train()
        opt, scheduler = make_contender(contender, model, n, total)
        steps[contender] = training_step(model, opt, scheduler, batches)
    times, backwards = time_round_robin(steps, rounds, warmup)
    median_ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    # where the time goes: the backwards (with the statistics hooks) and the rest (step, summary, scheduler)
    breakdown_ms = {
        k: {"backwards": 1e3 * statistics.median(backwards[k]),
            "step": 1e3 * statistics.median(t - b for t, b in zip(times[k], backwards[k]))}
        for k in times
    }
    ratios, paired = {}, {}
    for method, reference in pairs:
        ratios[f"{method}/{reference}"] = median_ms[method] / median_ms[reference]
        paired[f"{method}/{reference}"] = statistics.median(a / b for a, b in zip(times[method], times[reference]))
    return {
        "model": name,
        "parameters": sum(p.numel() for p in base.parameters()),
        "parameter_tensors": len(list(base.parameters())),
        "micro_batch": MICRO_BATCH,
        "micro_batches": n,
        "global_batch": n * MICRO_BATCH,
        "rounds": rounds,
        "median_ms": median_ms,
        "median_ms_breakdown": breakdown_ms,
        "ratios_of_medians": ratios,
        "median_of_round_ratios": paired,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 timed rounds, 2 warm-up rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (one step of each contender)")
    parser.add_argument("--micro-batches", type=int, default=4, help="n: micro-batches of 128 per step")
    parser.add_argument("--models", default="lenet5-bn,mlp", help=f"of {','.join(models())}")
    parser.add_argument("--clars-strategies", default="", help="also CLARS with these per-example strategies")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    rounds = args.rounds or (8 if args.quick else 30)
    warmup = 2 if args.quick else 5
    torch.set_num_threads(args.threads)
    clars_strategies = tuple(filter(None, args.clars_strategies.split(",")))
    unknown = sorted(set(args.models.split(",")) - set(models())) + sorted(set(clars_strategies) - set(MODES))
    if unknown:
        parser.error(f"unknown --models or --clars-strategies: {', '.join(unknown)}")

    load_before = os.getloadavg()  # the machine is shared: record how busy it was
    rows = []
    for name in args.models.split(","):
        row = benchmark_model(name, models()[name], args.micro_batches, rounds, warmup, clars_strategies)
        rows.append(row)
        print(f"{name} (B = {row['global_batch']}, {row['parameters']} parameters):")
        for key, value in row["median_ms"].items():
            parts = row["median_ms_breakdown"][key]
            print(f"  {key:19s} {value:8.2f} ms  (backwards {parts['backwards']:7.2f}, step {parts['step']:6.2f})")
        for key, value in row["ratios_of_medians"].items():
            print(f"  {key:24s} {value:6.3f}x   (median of round ratios {row['median_of_round_ratios'][key]:.3f}x)")
    load_after = os.getloadavg()
    results = {
        **machine(),
        "quick": args.quick,
        "load_average": {"before": list(load_before), "after": list(load_after)},
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
