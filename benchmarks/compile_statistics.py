"""First-compile cost of ``torch.compile`` with per-example statistics, per layer type.

For each model, in a fresh process each with Inductor's caches off
(``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``): the first training step (forward
and backward, the compile included) and the median of the next steps, for
the compiled model without statistics and with
``GradientStatistics(model, per_example=True)``. Prints the seconds and the
ratios with/without statistics of one run; writes no results file.

    python benchmarks/compile_statistics.py
    python benchmarks/compile_statistics.py --models transformer --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODELS = ("mlp", "cnn-bn", "transformer", "gru")


def build(name: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), torch.randn(32, 64)
    if name == "cnn-bn":
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 13 * 13, 10)
        )
        return model, torch.randn(32, 1, 28, 28)
    if name == "transformer":

        class Encoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.enc = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
                self.head = nn.Linear(64, 10)

            def forward(self, x):
                return self.head(self.enc(x).mean(1))

        return Encoder(), torch.randn(32, 16, 64)
    if name == "gru":

        class Recurrent(nn.Module):
            def __init__(self):
                super().__init__()
                self.gru = nn.GRU(32, 64, batch_first=True)
                self.head = nn.Linear(64, 10)

            def forward(self, x):
                return self.head(self.gru(x)[0][:, -1])

        return Recurrent(), torch.randn(32, 16, 32)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def child(name: str, statistics: bool, steps: int) -> dict:
    import torch

    from largebatch.stats import GradientStatistics

    model, x = build(name)
    target = torch.randint(0, 10, (x.shape[0],))
    stats = GradientStatistics(model, per_example=True) if statistics else None
    compiled = torch.compile(model)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        model.zero_grad()
        torch.nn.functional.cross_entropy(compiled(x), target).backward()
        if stats is not None:
            stats.summary().example_sq_norm_mean.sum().item()
            stats.reset()
        times.append(time.perf_counter() - start)
    rest = sorted(times[1:])
    return {"first_s": times[0], "step_s": rest[len(rest) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=5, help="steps timed after the first")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] == "stats", args.steps)))
        return
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    print(f"{'model':<12} {'first s':>9} {'+stats':>9} {'ratio':>6}   {'step ms':>8} {'+stats':>8} {'ratio':>6}")
    for name in args.models.split(","):
        runs = {}
        for mode in ("plain", "stats"):
            done = subprocess.run(
                [sys.executable, __file__, "--child", name, mode, "--steps", str(args.steps)],
                env=env, capture_output=True, text=True, check=True,
            )
            runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        plain, stats = runs["plain"], runs["stats"]
        print(
            f"{name:<12} {plain['first_s']:9.1f} {stats['first_s']:9.1f} {stats['first_s'] / plain['first_s']:6.2f}"
            f"   {1e3 * plain['step_s']:8.2f} {1e3 * stats['step_s']:8.2f} {stats['step_s'] / plain['step_s']:6.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
