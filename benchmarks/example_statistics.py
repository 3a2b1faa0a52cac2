"""Step time of LENA with example statistics against micro-batch statistics, on CPU.

LENA and AdaScale measure the gradient noise either from n = B/b micro-batches
of the base batch b = 128 (``statistics="micro_batch"``, the papers') or from
the per-example layer norms of any split, here one micro-batch of B
(``statistics="example"``, ``GradientStatistics(per_example=True)``). One
timed step is a whole LENA update: ``zero_grad``, the forward + backward
passes (the loss divided by their number), ``step()`` and the decay
scheduler's step. Four contenders per (model, B), each on its own copy of the
model with the same data:

* ``example``: LENA, example statistics, one micro-batch of B;
* ``micro_batch``: LENA, micro-batch statistics, B/128 micro-batches of 128;
* ``plain_one``: momentum SGD (``torch.optim.SGD`` + the same scheduler), one
  micro-batch of B: the reference for the per-example norms' own cost;
* ``plain_split``: momentum SGD, B/128 micro-batches of 128: the reference of
  the micro-batch statistics.

Ratios, each the median over rounds of the ratio of the two steps timed in
that round (every contender steps once per round, in an order rotated from
round to round, so machine noise hits all alike): ``example/micro_batch``
(what choosing example statistics costs or saves at the same B),
``example/plain_one`` (the per-example norms' overhead), and
``micro_batch/plain_split`` (the micro-batch statistics' overhead). The JSON
also holds the medians, quartiles of the round ratios, the thread count and
the machine's load averages before and after.

Usage::

    python benchmarks/example_statistics.py                    # MLP and LeNet-5-BN, B = 1024 and 8192
    python benchmarks/example_statistics.py --quick            # 6 timed rounds
    python benchmarks/example_statistics.py --models mlp --batches 256 --rounds 3 --output /tmp/x.json  # smoke
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
from largebatch.models import MLP, LeNet5
from largebatch.stats import GradientStatistics

from _environment import machine

RESULTS = Path(__file__).parent / "results" / "example_statistics.json"
BASE_BATCH = 128
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
CONTENDERS = ("example", "micro_batch", "plain_one", "plain_split")
RATIOS = (("example", "micro_batch"), ("example", "plain_one"), ("micro_batch", "plain_split"))


def models() -> dict[str, Callable[[], nn.Module]]:
    return {"mlp": MLP, "lenet5-bn": lambda: LeNet5(batch_norm=True)}


def make_contender(name: str, model: nn.Module, steps: int):
    """(optimiser, scheduler); LENA's statistics source is attached to ``model``."""
    decay = 0.01 ** (1 / steps)
    if name.startswith("plain"):
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    else:
        example = name == "example"
        opt = largebatch.LENA(
            model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
            stats=GradientStatistics(model, per_example=example), base_iterations=10 * steps,
            **(dict(statistics="example", base_batch=BASE_BATCH) if example else {}),
        )
    return opt, torch.optim.lr_scheduler.ExponentialLR(opt, decay)


def training_step(model: nn.Module, opt, scheduler, batches) -> Callable[[], None]:
    n = len(batches)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for x, y in batches:
            (F.cross_entropy(model(x), y) / n).backward()
        opt.step()
        scheduler.step()

    return step


def time_rounds(steps: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step, one entry per round; the order of the contenders rotates every round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return times


def quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def benchmark(name: str, batch: int, rounds: int, warmup: int) -> dict:
    if batch % BASE_BATCH:
        raise SystemExit(f"--batches: {batch} is not a multiple of the base batch {BASE_BATCH}")
    torch.manual_seed(0)
    base = models()[name]()
    g = torch.Generator().manual_seed(1)
    shape = (1, 28, 28) if name.startswith("lenet") else (784,)
    x, y = torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)
    one = [(x, y)]
    split = list(zip(x.split(BASE_BATCH), y.split(BASE_BATCH)))
    steps = {}
    for contender in CONTENDERS:
        model = copy.deepcopy(base).train()
        opt, scheduler = make_contender(contender, model, warmup + rounds)
        data = one if contender in ("example", "plain_one") else split
        steps[contender] = training_step(model, opt, scheduler, data)
    times = time_rounds(steps, rounds, warmup)
    ratios = {}
    for a, b in RATIOS:
        paired = [ta / tb for ta, tb in zip(times[a], times[b])]
        ratios[f"{a}/{b}"] = {"median": statistics.median(paired), "quartiles": quartiles(paired),
                              "min_max": [min(paired), max(paired)]}
    return {
        "model": name,
        "batch": batch,
        "base_batch": BASE_BATCH,
        "micro_batches": {"example": 1, "micro_batch": batch // BASE_BATCH, "plain_one": 1,
                          "plain_split": batch // BASE_BATCH},
        "parameters": sum(p.numel() for p in base.parameters()),
        "rounds": rounds,
        "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "round_ratios": ratios,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 timed rounds, 1 warm-up round")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 20)")
    parser.add_argument("--models", default="mlp,lenet5-bn", help=f"comma-separated: {', '.join(models())}")
    parser.add_argument("--batches", default="1024,8192", help="global batches B (multiples of 128)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rounds = args.rounds or (6 if args.quick else 20)
    warmup = 1 if args.quick else 3
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    unknown = set(args.models.split(",")) - set(models())
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(sorted(unknown))}; choose from {', '.join(models())}")

    load_before = os.getloadavg()  # the machine may be shared: record how busy it was
    rows = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            row = benchmark(name, batch, rounds, warmup)
            rows.append(row)
            print(f"{name}, B = {batch} ({batch // BASE_BATCH} micro-batches of {BASE_BATCH} against one of {batch}):")
            for key, value in row["median_ms"].items():
                print(f"  {key:12s} {value:9.2f} ms")
            for key, value in row["round_ratios"].items():
                low, high = value["quartiles"]
                print(f"  {key:24s} {value['median']:6.3f}x  (quartiles {low:.3f}-{high:.3f})")
    load_after = os.getloadavg()
    results = {
        **machine(),
        "quick": args.quick,
        "methodology": "every contender steps once per round (order rotated), each on its own model copy; "
                       "ratios are medians of the per-round ratios",
        "load_average": {"before": list(load_before), "after": list(load_after)},
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
