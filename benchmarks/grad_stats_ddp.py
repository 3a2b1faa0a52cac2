"""Overhead of the gradient statistics engine (per-micro-batch and per-worker norms).

Two measurements, each a ratio against a reference measured in the same run,
steps interleaved (reference, engine, engine, reference, ...), medians of the
paired ratios of wall time and of the training thread's CPU time (the latter
is robust to other processes on a shared machine):

1. one process, gradient accumulation over 4 micro-batches: plain accumulation
   vs ``GradientStatistics(sample="micro_batch")`` + summary() (its tensor
   hooks take each micro-batch's norms); B taken after the step's last
   backward (``applied_norm="backward"``, default) or in summary()
   (``"summary"``);
2. 2-process gloo DDP on loopback: plain DDP (its built-in C++ all-reduce)
   vs DDP with the engine's statistics (no comm hook; one small all-reduce
   of their own, ddp.py); ``sample="worker"`` (per-worker norms, 1
   micro-batch per worker) and ``sample="micro_batch"`` (2 micro-batches per
   worker, no_sync, with the tensor hooks). For scale, two rows without
   statistics against plain DDP: ``python_comm_hook``, DDP with torch's
   ``allreduce_hook`` (the same reduction through Python: what riding on a
   bucket through any Python hook costs), and ``extra_all_reduce``, plain DDP
   plus one all-reduce of the statistics' size after the backward (what a
   collective of their own costs).

Models: an MLP (784-512-512-10) and a small CNN (32x32x3, two conv layers).
Writes benchmarks/results/grad_stats_ddp.json. Targets (``TARGETS``):
per-worker <= 1.10 on the MLP and <= 1.06 on the CNN, per-micro-batch
<= 1.06. The paired ratios spread by +-10% step to step in one process and
by +-15% or more under 2-process DDP on a 2-core machine (two processes,
each with a gloo thread, on two cores), so the defaults are 300 pairs in one
process and 1,000 under DDP (the medians' standard errors are then about
0.6% and 1%), with glibc's malloc kept from trimming (``_allocator.py``).

    python benchmarks/grad_stats_ddp.py [--steps 300] [--ddp-steps 1000] [--glibc-default]
    python benchmarks/grad_stats_ddp.py --models mlp --steps 5 --ddp-steps 5 --output /tmp/smoke.json  # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from largebatch.stats import GradientStatistics
from largebatch.stats.ddp import all_reduce_sum
from largebatch.train.distributed import retire_collectives

from _allocator import steady_malloc
from _environment import machine

RESULTS = Path(__file__).parent / "results" / "grad_stats_ddp.json"


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    )  # fmt: skip


MODELS = {"mlp": (mlp, (1, 28, 28), 128), "cnn": (cnn, (3, 32, 32), 32)}
TARGETS = {"mlp/worker": "<= 1.10", "cnn/worker": "<= 1.06", "micro_batch": "<= 1.06"}
FOR_SCALE = ("python_comm_hook", "extra_all_reduce")  # references of what the design costs, no target


def target(key: str) -> str:
    """The target for a result key (``mlp/worker``, ``cnn/micro_batch``, ``mlp/applied_norm=backward``)."""
    if key.split("/")[-1] in FOR_SCALE:
        return "none (for scale)"
    return TARGETS.get(key, TARGETS["micro_batch"])


def batches(name: str, count: int, seed: int = 0):
    _, shape, size = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(count)]


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]()


def accumulate_step(model, data, stats, no_sync=None) -> tuple[float, float]:
    """One optimiser step's backwards (+ summary); returns (wall, main-thread CPU) seconds."""
    start, start_cpu = time.perf_counter(), time.thread_time()
    for j, (x, y) in enumerate(data):
        quiet = no_sync is not None and j < len(data) - 1
        with no_sync() if quiet else contextlib.nullcontext():
            (nn.functional.cross_entropy(model(x), y) / len(data)).backward()
    if stats is not None:
        stats.summary()
    elapsed = time.perf_counter() - start, time.thread_time() - start_cpu
    for p in model.parameters():
        p.grad = None
    if stats is not None:
        stats.reset()
    return elapsed


def paired(run_reference, run_engine, steps: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        run_reference(), run_engine()
    ref, eng = [], []
    for i in range(steps):
        if i % 2:  # alternate which goes first
            eng.append(run_engine()), ref.append(run_reference())
        else:
            ref.append(run_reference()), eng.append(run_engine())
    wall_ref, wall_eng = [r[0] for r in ref], [e[0] for e in eng]
    ratios = [e / r for e, r in zip(wall_eng, wall_ref)]
    cpu_ratios = [e[1] / r[1] for e, r in zip(eng, ref)]
    quartiles = statistics.quantiles(ratios, n=4)
    return {
        "reference_ms": 1e3 * statistics.median(wall_ref),
        "engine_ms": 1e3 * statistics.median(wall_eng),
        "ratio_median": statistics.median(ratios),
        "ratio_of_medians": statistics.median(wall_eng) / statistics.median(wall_ref),
        "ratio_quartiles": [quartiles[0], quartiles[2]],  # spread of the paired ratios (machine noise)
        # CPU time of the training thread: the work added, insensitive to other
        # processes on a shared machine (misses waiting for the extra collective)
        "cpu_ratio_median": statistics.median(cpu_ratios),
        "steps": steps,
    }


def single_process(name: str, steps: int, micro: int = 4) -> dict:
    data = batches(name, micro)
    plain = build(name)
    out = {}
    for applied_norm in ("backward", "summary"):
        measured = build(name)
        stats = GradientStatistics(measured, sample="micro_batch", applied_norm=applied_norm)
        result = paired(lambda: accumulate_step(plain, data, None), lambda: accumulate_step(measured, data, stats), steps)
        key = f"{name}/applied_norm={applied_norm}"
        out[key] = dict(result, micro_batches=micro, batch=MODELS[name][2], target=target(key))
    return out


class _ExtraAllReduce:
    """A stand-in for the engine that only sums a vector of the statistics' size over the workers
    after the backward and waits for it: what any statistic of its own would cost."""

    def __init__(self, size: int):
        self.vector = torch.zeros(size)

    def summary(self) -> None:
        all_reduce_sum(dist.group.WORLD, self.vector).wait()

    def reset(self) -> None:
        pass


def _ddp_worker(rank: int, world: int, port: int, steps: int, models: list[str], out: str, steady: bool) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    if steady:
        steady_malloc()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for name in models:
        hooked = DDP(build(name))
        hooked.register_comm_hook(None, allreduce_hook)
        worker, micro_batch = DDP(build(name)), DDP(build(name))
        rows = [  # (key, model, engine or stand-in, micro-batches per worker)
            ("python_comm_hook", hooked, None, 1),  # for scale: the same reduction through Python
            ("extra_all_reduce", DDP(build(name)), _ExtraAllReduce(len(list(hooked.parameters())) + 1), 1),
            ("worker", worker, GradientStatistics(worker, sample="worker"), 1),
            ("micro_batch", micro_batch, GradientStatistics(micro_batch, sample="micro_batch"), 2),
        ]
        for sample, measured, engine, micro in rows:
            data = batches(name, micro, seed=rank + 1)
            plain = DDP(build(name))

            def timed(model, engine):
                dist.barrier()  # both ranks start the step together
                return accumulate_step(model, data, engine, no_sync=model.no_sync)

            r = paired(lambda: timed(plain, None), lambda: timed(measured, engine), steps)
            key = f"{name}/{sample}"
            results[key] = dict(r, micro_batches_per_worker=micro, batch=MODELS[name][2], target=target(key))
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    retire_collectives()
    dist.destroy_process_group()


def ddp(steps: int, models: list[str], world: int = 2, steady: bool = True) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ddp.json")
        mp.start_processes(
            _ddp_worker, args=(world, port, steps, models, out, steady), nprocs=world, start_method="spawn"
        )
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="pairs of steps in one process")
    parser.add_argument("--ddp-steps", type=int, default=1000, help="pairs of steps under DDP")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--glibc-default", action="store_true", help="keep glibc's malloc thresholds (see _allocator.py)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    for name in models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}")
    torch.set_num_threads(args.threads)
    steady = not args.glibc_default and steady_malloc()
    load_before = os.getloadavg()
    report = {
        "what": "step time with the statistics engine (Python hooks) / without, medians of interleaved pairs",
        **machine(threads=args.threads),
        "threads_per_process": args.threads,
        "malloc": "steady (glibc mmap/trim thresholds raised, _allocator.py)" if steady else "glibc default",
        "single_process_accumulation": {k: v for name in models for k, v in single_process(name, args.steps).items()},
        "ddp_gloo_2_processes": ddp(args.ddp_steps, models, steady=steady),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
    }
    for section in ("single_process_accumulation", "ddp_gloo_2_processes"):
        for key, r in report[section].items():
            low, high = r["ratio_quartiles"]
            print(
                f"{section:28s} {key:28s} {r['reference_ms']:8.2f} ms -> {r['engine_ms']:8.2f} ms  "
                f"ratio {r['ratio_median']:.3f} (quartiles {low:.3f}-{high:.3f}; target {r['target']}), "
                f"CPU-time ratio {r['cpu_ratio_median']:.3f}"
            )
    load = report["load_average"]
    print(f"load average (1 min): {load['before'][0]:.2f} before, {load['after'][0]:.2f} after")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
