"""Median optimiser step time on CPU: LARS and LAMB against torch.optim references.

Two parameter lists:

* ``resnet50``: the 161 tensors of ResNet-50 (25.6M parameters: conv, BatchNorm
  weight/bias, fc), built from the architecture's shapes; memory-traffic bound.
* ``many_small``: 2,000 tensors of 1,024..4,096 parameters; per-op dispatch bound.

Contenders, each timed round-robin (one step of each in turn, so machine
noise hits all alike) and reported as ratios of medians measured in the same
run:

* ``sgd``: ``torch.optim.SGD(momentum=0.9, weight_decay, foreach=True)``, the
  reference for LARS; ``adamw``: ``torch.optim.AdamW(foreach=True)`` for LAMB;
* ``lars`` / ``lamb``: the default eager multi-tensor path;
* ``lars_loop`` / ``lamb_loop``: a per-tensor Python loop, as the popular ports
  step. This is the library's own ``foreach=False`` path, which follows the
  same per-tensor structure (timm's LARS/LAMB would be the faithful external
  loop, but timm needs torchvision, which is not installed here);
* ``clars`` / ``lena``: CLARS and LENA (SGD-style momentum steps) against
  ``sgd``, fed a fixed precomputed statistics summary (``FixedStats``), so only
  the optimiser step is timed, not the statistics engine;
* ``lars_fused`` / ``lamb_fused``: ``fused=True`` (``torch.compile``); the
  one-time compile seconds are reported separately, cold by default (a fresh
  empty ``TORCHINDUCTOR_CACHE_DIR``; ``--warm-compile`` keeps the user's cache).

The 1-minute load average is recorded before and after each list: on a shared
machine the absolute times move with it, the interleaved ratios much less.

All optimisers share the same parameter and gradient tensors (each keeps its
own state); the optimisers never modify gradients and a tiny rate keeps the
weights sane, so sharing does not change the work done.

Usage::

    python benchmarks/optimizer_step.py            # full run
    python benchmarks/optimizer_step.py --quick    # few steps, no fused path
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from largebatch.optim import CLARS, LAMB, LARS, LENA

RESULTS = Path(__file__).parent / "results" / "optimizer_step.json"


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's ResNet-50, in registration order."""
    shapes: list[tuple[int, ...]] = []

    def conv_bn(out_channels: int, in_channels: int, kernel: int) -> None:
        shapes.append((out_channels, in_channels, kernel, kernel))
        shapes.extend([(out_channels,), (out_channels,)])  # BatchNorm weight, bias

    conv_bn(64, 3, 7)
    in_channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            conv_bn(width, in_channels, 1)
            conv_bn(width, width, 3)
            conv_bn(width * 4, width, 1)
            if block == 0:
                conv_bn(width * 4, in_channels, 1)  # downsample
            in_channels = width * 4
    shapes.extend([(1000, 2048), (1000,)])
    return shapes


def many_small_shapes(count: int = 2000) -> list[tuple[int, ...]]:
    """``count`` tensors of 1,024..4,096 parameters (rows of 64 columns)."""
    return [(16 + (i * 37) % 49, 64) for i in range(count)]


def make_params(shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=generator).mul_(0.05).requires_grad_()
        p.grad = torch.randn(shape, generator=generator).mul_(1e-3)
        params.append(p)
    return params


@dataclass
class Summary:
    """The fields of a statistics summary that CLARS and LENA read."""

    n: int
    sample_sq_norm_mean: torch.Tensor
    mean_grad_sq_norm: torch.Tensor
    num_examples: int
    example_norm_mean: torch.Tensor
    example_sq_norm_mean: torch.Tensor


class FixedStats:
    """A statistics source returning one summary computed once from the gradients.

    Follows the interface of ``largebatch.stats.GradientStatistics`` (``summary``,
    ``index_of``, ``reset``) so the timed step is the optimiser's alone.
    """

    def __init__(self, params: list[torch.Tensor], n: int = 4) -> None:
        self._index = {id(p): k for k, p in enumerate(params)}
        generator = torch.Generator().manual_seed(1)
        count = len(params)
        B = torch.stack([p.grad.pow(2).sum() for p in params])
        A = B * (1 + torch.rand(count, generator=generator) * (n - 1))
        mean_norm = B.sqrt() * (1 + torch.rand(count, generator=generator))
        self._summary = Summary(n, A, B, 32 * n, mean_norm, mean_norm.pow(2) * 1.5)

    def index_of(self, p: torch.Tensor) -> int:
        return self._index[id(p)]

    def summary(self) -> Summary:
        return self._summary

    def reset(self) -> None:
        pass


def contenders(params: list[torch.Tensor], fused: bool) -> dict[str, torch.optim.Optimizer]:
    wd, lr = 5e-4, 1e-4
    opts: dict[str, torch.optim.Optimizer] = {
        "sgd": torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd, foreach=True),
        "lars": LARS(params, lr=lr, momentum=0.9, weight_decay=wd),
        "lars_loop": LARS(params, lr=lr, momentum=0.9, weight_decay=wd, foreach=False),
        "adamw": torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=True),
        "lamb": LAMB(params, lr=lr, weight_decay=wd),
        "lamb_loop": LAMB(params, lr=lr, weight_decay=wd, foreach=False),
        "clars": CLARS(params, lr=lr, momentum=0.9, weight_decay=wd, stats=FixedStats(params)),
        "lena": LENA(
            params, lr=lr, momentum=0.9, weight_decay=wd, stats=FixedStats(params),
            base_iterations=10_000,
        ),
    }
    if fused:
        opts["lars_fused"] = LARS(params, lr=lr, momentum=0.9, weight_decay=wd, fused=True)
        opts["lamb_fused"] = LAMB(params, lr=lr, weight_decay=wd, fused=True)
    return opts


def measure(shapes: list[tuple[int, ...]], steps: int, fused: bool) -> dict[str, object]:
    load_before = os.getloadavg()[0]
    params = make_params(shapes)
    opts = contenders(params, fused)

    # Warm-up: creates state and compiles the fused path.
    # LARS compiles at its second step (the first seeds the momentum buffers
    # eagerly), LAMB at its first: the slower of the two is the compile.
    compile_seconds: dict[str, float] = {}
    for name, opt in opts.items():
        warm_up = []
        for _ in range(3):
            start = time.perf_counter()
            opt.step()
            warm_up.append(time.perf_counter() - start)
        if name.endswith("_fused"):
            compile_seconds[name] = max(warm_up[:2])

    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(steps):
        for name, opt in opts.items():  # round-robin
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(t) for name, t in times.items()}
    ratios = {
        "lars/sgd": median["lars"] / median["sgd"],
        "lamb/adamw": median["lamb"] / median["adamw"],
        "lars_loop/lars": median["lars_loop"] / median["lars"],
        "lamb_loop/lamb": median["lamb_loop"] / median["lamb"],
        "clars/sgd": median["clars"] / median["sgd"],
        "lena/sgd": median["lena"] / median["sgd"],
    }
    if fused:
        ratios["lars_fused/sgd"] = median["lars_fused"] / median["sgd"]
        ratios["lamb_fused/adamw"] = median["lamb_fused"] / median["adamw"]
    return {
        "tensors": len(shapes),
        "parameters": sum(p.numel() for p in params),
        "shapes": [list(s) for s in shapes] if len(shapes) <= 200 else "many_small_shapes(2000)",
        "steps_timed": steps,
        "median_ms": {name: 1e3 * m for name, m in median.items()},
        "ratios": ratios,
        "compile_seconds": compile_seconds,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 timed steps, no fused path")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per contender")
    parser.add_argument(
        "--lists", default="resnet50,many_small", help="comma-separated: resnet50, many_small"
    )
    parser.add_argument(
        "--fused-lists", default="resnet50",
        help="lists on which to time fused=True (compiles for each; '' for none)",
    )
    parser.add_argument(
        "--warm-compile", action="store_true",
        help="keep the inductor cache (default: a fresh empty cache dir, i.e. cold compile seconds)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not args.warm_compile:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")

    steps = args.steps or (10 if args.quick else 30)
    fused_lists = set() if args.quick else set(filter(None, args.fused_lists.split(",")))
    builders = {"resnet50": resnet50_shapes, "many_small": many_small_shapes}
    results = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "compile_cache": "warm (existing inductor cache)" if args.warm_compile
        else "cold (fresh empty TORCHINDUCTOR_CACHE_DIR)",
        "loop_reference": "the library's own foreach=False per-tensor loop (timm needs torchvision)",
        "lists": {},
    }
    for name in args.lists.split(","):
        result = measure(builders[name](), steps, fused=name in fused_lists)
        results["lists"][name] = result
        print(f"{name}: {result['tensors']} tensors, {result['parameters']:,} parameters")
        for key, value in result["median_ms"].items():
            print(f"  {key:12s} {value:9.2f} ms")
        for key, value in result["ratios"].items():
            print(f"  {key:18s} {value:6.2f}x")
        for key, value in result["compile_seconds"].items():
            print(f"  compile {key}: {value:.1f} s")
        load = result["load_average_1min"]
        print(f"  load average (1 min): {load['before']:.2f} before, {load['after']:.2f} after")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}", flush=True)


if __name__ == "__main__":
    main()
