"""Optimiser step time on CPU: each contender against its reference alone, in paired steps.

Parameter lists:

* ``resnet50``: the 161 tensors of ResNet-50 (25.6M parameters: conv, BatchNorm
  weight/bias, fc), built from the architecture's shapes; memory-traffic bound.
* ``many_small``: 2,000 tensors of 1,024..4,096 parameters; per-op dispatch bound.
* ``tiny``: 16 small tensors, for a smoke test of the script (not a measurement).

Comparisons (contender / reference):

* ``lars/sgd``: the default eager multi-tensor LARS over
  ``torch.optim.SGD(momentum=0.9, weight_decay, foreach=True)``;
  ``lamb/adamw``: the default LAMB over ``torch.optim.AdamW(foreach=True)``;
* ``lars_loop/lars``, ``lamb_loop/lamb``: the per-tensor Python loop (the
  library's own ``foreach=False`` path, the per-tensor structure of the
  popular ports; timm's would be the faithful external loop, but it needs
  torchvision, which is not installed here) over the multi-tensor path;
* ``clars/sgd``, ``lena/sgd``: CLARS and LENA (SGD-style momentum steps) fed a
  fixed precomputed statistics summary (``FixedStats``), so only the
  optimiser step is timed, not the statistics engine;
* ``lars_fused/sgd``, ``lamb_fused/adamw``: ``fused=True`` (``torch.compile``);
  the one-time compile seconds are reported separately, cold by default (a
  fresh empty ``TORCHINDUCTOR_CACHE_DIR`` per comparison; ``--warm-compile``
  keeps the user's cache).

How each comparison is timed: in a process of its own (spawned for it, so no
earlier comparison's heap, caches or compiled code carry over), the contender
and its reference each get their own copy of the parameter list (same values,
own gradients) and their own state; after ``--warmup`` steps of each, they
step in ``--pairs`` pairs, alternating which goes first, and the result is
the median of the paired ratios (contender / reference) with their quartiles
and extremes, the ratio of the medians, the median ratio of process CPU time
(less sensitive to other processes than wall time), the thread count and the
load averages before and after. Nothing else runs in that process meanwhile.

Usage::

    python benchmarks/optimizer_step.py                      # full run, 30 pairs
    python benchmarks/optimizer_step.py --pairs 100 --lists resnet50 --comparisons lars/sgd,lamb/adamw
    python benchmarks/optimizer_step.py --lists tiny --pairs 3 --fused-lists ""   # smoke test
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from _environment import machine

RESULTS = Path(__file__).parent / "results" / "optimizer_step.json"

EAGER = ["lars/sgd", "lamb/adamw", "lars_loop/lars", "lamb_loop/lamb", "clars/sgd", "lena/sgd"]
FUSED = ["lars_fused/sgd", "lamb_fused/adamw"]
TARGETS = {  # as in benchmarks/README.md
    "lars/sgd": "<= 1.2",
    "lamb/adamw": "<= 1.2",
    "lars_loop/lars": ">= 2.5 on many_small",
    "lamb_loop/lamb": ">= 2.5 on many_small",
    "clars/sgd": "<= 1.3",
    "lena/sgd": "<= 1.3",
    "lars_fused/sgd": "<= 0.8 on resnet50",
    "lamb_fused/adamw": "<= 0.8 on resnet50",
}


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


def tiny_shapes() -> list[tuple[int, ...]]:
    """16 small tensors: checks that the script runs, measures nothing of interest."""
    return [(8 + i, 16) for i in range(8)] + [(8 + i,) for i in range(8)]


LISTS = {"resnet50": resnet50_shapes, "many_small": many_small_shapes, "tiny": tiny_shapes}


def make_params(shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """A fresh parameter list with gradients; the same values on every call."""
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=generator).mul_(0.05).requires_grad_()
        p.grad = torch.randn(shape, generator=generator).mul_(1e-3)
        params.append(p)
    return params


class FixedStats:
    """A statistics source returning one summary computed once from the gradients.

    Follows the interface of ``largebatch.stats.GradientStatistics`` (``summary``,
    ``index_of``, ``reset``) so the timed step is the optimiser's alone.
    """

    def __init__(self, params: list[torch.Tensor], n: int = 4) -> None:
        from largebatch.stats import GradientSummary

        self._index = {id(p): k for k, p in enumerate(params)}
        generator = torch.Generator().manual_seed(1)
        count = len(params)
        B = torch.stack([p.grad.pow(2).sum() for p in params])
        A = B * (1 + torch.rand(count, generator=generator) * (n - 1))
        mean_norm = B.sqrt() * (1 + torch.rand(count, generator=generator))
        self._summary = GradientSummary(
            n=n, sample_sq_norm_mean=A, mean_grad_sq_norm=B, num_examples=32 * n,
            example_norm_mean=mean_norm, example_sq_norm_mean=mean_norm.pow(2) * 1.5,
        )

    def index_of(self, p: torch.Tensor) -> int:
        return self._index[id(p)]

    def summary(self):
        return self._summary

    def reset(self) -> None:
        pass


def build(name: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    from largebatch.optim import CLARS, LAMB, LARS, LENA

    wd, lr = 5e-4, 1e-4
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd, foreach=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=True)
    path = {"_loop": {"foreach": False}, "_fused": {"fused": True}}.get(name[4:], {})  # else the defaults
    if name in ("lars", "lars_loop", "lars_fused"):
        return LARS(params, lr=lr, momentum=0.9, weight_decay=wd, **path)
    if name in ("lamb", "lamb_loop", "lamb_fused"):
        return LAMB(params, lr=lr, weight_decay=wd, **path)
    if name == "clars":
        return CLARS(params, lr=lr, momentum=0.9, weight_decay=wd, stats=FixedStats(params))
    if name == "lena":
        return LENA(params, lr=lr, momentum=0.9, weight_decay=wd, stats=FixedStats(params), base_iterations=10_000)
    raise ValueError(f"unknown optimiser {name!r}")


def _timed_step(opt: torch.optim.Optimizer) -> tuple[float, float]:
    start, start_cpu = time.perf_counter(), time.process_time()
    opt.step()
    return time.perf_counter() - start, time.process_time() - start_cpu


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def measure_pair(list_name: str, comparison: str, pairs: int, warmup: int, threads: int | None,
                 steady: bool) -> dict:
    """One comparison, run in a process of its own; see the module docstring."""
    if threads:
        torch.set_num_threads(threads)
    if steady:
        sys.path.insert(0, str(Path(__file__).parent))
        from _allocator import steady_malloc

        steady = steady_malloc()
    load_before = os.getloadavg()
    contender_name, reference_name = comparison.split("/")
    shapes = LISTS[list_name]()
    contender = build(contender_name, make_params(shapes))
    reference = build(reference_name, make_params(shapes))

    # Warm-up: creates state and compiles the fused path. LARS compiles at its
    # second step (the first seeds the momentum buffers eagerly), LAMB at its
    # first: the slower of the first two steps is the compile.
    warm_up = [_timed_step(contender)[0] for _ in range(max(warmup, 2))]
    for _ in range(warmup):
        reference.step()

    con, ref = [], []
    for i in range(pairs):
        if i % 2:  # alternate which goes first
            con.append(_timed_step(contender)), ref.append(_timed_step(reference))
        else:
            ref.append(_timed_step(reference)), con.append(_timed_step(contender))
    ratios = [c[0] / r[0] for c, r in zip(con, ref)]
    cpu_ratios = [c[1] / r[1] for c, r in zip(con, ref) if r[1] > 0]
    con_ms, ref_ms = [1e3 * c[0] for c in con], [1e3 * r[0] for r in ref]
    result = {
        "contender": contender_name,
        "reference": reference_name,
        "contender_ms": statistics.median(con_ms),
        "reference_ms": statistics.median(ref_ms),
        "ratio_median": statistics.median(ratios),  # the figure to quote
        "ratio_quartiles": _quartiles(ratios),  # spread of the paired ratios
        "ratio_min_max": [min(ratios), max(ratios)],
        "ratio_of_medians": statistics.median(con_ms) / statistics.median(ref_ms),
        "cpu_ratio_median": statistics.median(cpu_ratios) if cpu_ratios else None,
        "pairs": pairs,
        "warmup_steps": warmup,
        "threads": torch.get_num_threads(),
        "malloc": "steady (glibc mmap/trim thresholds raised, _allocator.py)" if steady else "glibc default",
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "paired_ms": {"contender": con_ms, "reference": ref_ms},
    }
    if contender_name.endswith("_fused"):
        result["compile_seconds"] = max(warm_up[:2])
    if comparison in TARGETS:
        result["target"] = TARGETS[comparison]
    return result


def run_comparison(list_name: str, comparison: str, args: argparse.Namespace) -> dict:
    """``measure_pair`` in a fresh spawned process (a fresh inductor cache too, unless --warm-compile)."""
    cache = None
    if not args.warm_compile:
        cache = tempfile.mkdtemp(prefix="inductor-cold-")
        previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # inherited by the spawned process
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(
                measure_pair, list_name, comparison, args.pairs, args.warmup, args.threads, args.steady_malloc
            ).result()
    finally:
        if cache is not None:
            if previous is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
            shutil.rmtree(cache, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=30, help="timed pairs of steps per comparison")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each optimiser first")
    parser.add_argument("--lists", default="resnet50,many_small", help="comma-separated: " + ", ".join(LISTS))
    parser.add_argument("--comparisons", default=",".join(EAGER + FUSED),
                        help="comma-separated contender/reference pairs (fused ones only on --fused-lists)")
    parser.add_argument("--fused-lists", default="resnet50",
                        help="lists on which to time fused=True (compiles for each; '' for none)")
    parser.add_argument("--warm-compile", action="store_true",
                        help="keep the inductor cache (default: a fresh empty cache dir, i.e. cold compile seconds)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--steady-malloc", action="store_true",
                        help="raise glibc's mmap/trim thresholds in each comparison's process (_allocator.py)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.lists = [name for name in args.lists.split(",") if name]
    args.fused_lists = set(filter(None, args.fused_lists.split(",")))
    args.comparisons = [c for c in args.comparisons.split(",") if c]
    for name in args.lists:
        if name not in LISTS:
            parser.error(f"unknown list {name!r}")
    for comparison in args.comparisons:
        if comparison not in EAGER + FUSED:
            parser.error(f"unknown comparison {comparison!r}; known: {', '.join(EAGER + FUSED)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    load_before = os.getloadavg()
    results = {
        "what": "optimiser step time, contender / reference, median of paired ratios",
        "methodology": (
            "each comparison in a fresh process; contender and reference each on its own copy of the "
            "parameter list with its own state; steps in pairs, alternating which goes first"
        ),
        **machine(threads=args.threads or torch.get_num_threads()),
        "pairs": args.pairs,
        "compile_cache": "warm (existing inductor cache)" if args.warm_compile
        else "cold (fresh empty TORCHINDUCTOR_CACHE_DIR per comparison)",
        "loop_reference": "the library's own foreach=False per-tensor loop (timm needs torchvision)",
        "lists": {},
    }
    for list_name in args.lists:
        shapes = LISTS[list_name]()
        entry = {
            "tensors": len(shapes),
            "parameters": sum(torch.Size(s).numel() for s in shapes),
            "shapes": [list(s) for s in shapes] if len(shapes) <= 200 else f"{list_name}_shapes()",
            "comparisons": {},
        }
        results["lists"][list_name] = entry
        print(f"{list_name}: {entry['tensors']} tensors, {entry['parameters']:,} parameters", flush=True)
        for comparison in args.comparisons:
            if comparison in FUSED and list_name not in args.fused_lists:
                continue
            r = run_comparison(list_name, comparison, args)
            entry["comparisons"][comparison] = r
            low, high = r["ratio_quartiles"]
            compile_note = f", compile {r['compile_seconds']:.1f} s" if "compile_seconds" in r else ""
            print(
                f"  {comparison:18s} {r['contender_ms']:9.3f} ms / {r['reference_ms']:9.3f} ms  "
                f"ratio {r['ratio_median']:.3f} (quartiles {low:.3f}-{high:.3f}; target {r.get('target', '-')})  "
                f"threads {r['threads']}, load {r['load_average']['before'][0]:.2f} -> "
                f"{r['load_average']['after'][0]:.2f}{compile_note}",
                flush=True,
            )
    results["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}", flush=True)
    return results


if __name__ == "__main__":
    main()
