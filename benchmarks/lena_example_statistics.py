"""LENA from one micro-batch per step (example statistics) against micro-batches of 128 (micro-batch statistics).

The measurement: the MLP on Fashion-MNIST, the study's protocol
(docs/study.md: 5 epochs, base batch b = 128, base rate 0.1, seeds 0, 1, 2,
test accuracy checked twice per epoch), LENA at B = 1024 and 8192

* with ``--statistics example`` and one micro-batch of B per step (n = B/b
  from the per-example norms), and
* with micro-batch statistics, B/128 = 8 or 64 micro-batches of 128 (the
  papers' setting, n = B/b samples);

and, with ``--single-sample``, LENA with micro-batch statistics from one
micro-batch of B (n = 1: every gain 1), the case example statistics replace.
The target of each seed is the final test accuracy of momentum SGD at the base
batch (as in the study). Finished runs are skipped and unfinished ones resumed,
so the command can be run again after an interruption. Prints a Markdown table
(final test accuracy / iterations to target / time to target, mean +- standard
deviation over seeds) and writes it with every run's numbers to
``benchmarks/results/lena_example_statistics.json``.

Usage::

    python benchmarks/lena_example_statistics.py --run-dir runs/lena-example   # 15 runs (21 with --single-sample)
    python benchmarks/lena_example_statistics.py --run-dir /tmp/smoke --epochs 1 --batches 256 --seeds 0 \\
        --train-limit 2048 --test-limit 500 --val-size 500 --output /tmp/smoke.json        # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from largebatch.report.results import Cell, RunResult, targets
from largebatch.train.config import TrainConfig
from largebatch.records import SUMMARY
from largebatch.train.runner import load_data, train
from largebatch.train.sweep import run_path

from _environment import machine

RESULTS = Path(__file__).parent / "results" / "lena_example_statistics.json"
BASE_BATCH = 128
BASE_LR = 0.1  # the sgd family's rate tuned in the study (docs/results-v1.md), LENA's family


def variants(batch: int) -> list[tuple[str, str, int]]:
    """(label, statistics, micro-batch) of the LENA runs at ``batch``."""
    return [
        ("example", "example", batch),
        ("micro_batch", "micro_batch", BASE_BATCH),
        ("single_sample", "micro_batch", batch),
    ]


def configs(args) -> list[tuple[str, TrainConfig]]:
    """(label, config) of every run: the baselines first."""
    template = TrainConfig(
        model="mlp", epochs=args.epochs, base_batch=BASE_BATCH, lr=BASE_LR, dataset="fashion-mnist",
        data_dir=args.data_dir, train_limit=args.train_limit, test_limit=args.test_limit, val_size=args.val_size,
        progress=False, threads=args.threads, resume=True, checkpoint_every=0,
    )
    train_size = len(load_data(template).train)
    root = Path(args.run_dir)
    out = []
    for seed in args.seeds:
        out.append(("baseline", dataclasses.replace(
            template, method="sgd", batch=BASE_BATCH, micro_batch=BASE_BATCH, seed=seed,
            eval_every=max(1, train_size // BASE_BATCH // 2), run_dir=str(run_path(root, "sgd", BASE_BATCH, seed)))))
    for seed in args.seeds:
        for batch in args.batches:
            for label, statistics_mode, micro in variants(batch):
                if label == "single_sample" and not args.single_sample:
                    continue
                run_dir = root / "runs" / f"lena-{label}-b{batch}-s{seed}"
                out.append((label, dataclasses.replace(
                    template, method="lena", batch=batch, micro_batch=micro, seed=seed, statistics=statistics_mode,
                    eval_every=max(1, train_size // batch // 2), run_dir=str(run_dir))))
    return out


def table(runs: list[tuple[str, TrainConfig]]) -> tuple[str, list[dict]]:
    loaded = [(label, RunResult.load(Path(c.run_dir)), c) for label, c in runs]
    target_of = targets([r for label, r, _ in loaded if label == "baseline"], BASE_BATCH)
    cells: dict[tuple[int, str], Cell] = {}
    rows = []
    for label, result, config in loaded:
        hit = result.reaches(target_of[result.seed]) if label != "baseline" else None
        rows.append({
            "label": label, "batch": result.batch, "seed": result.seed, "statistics": config.statistics,
            "micro_batch": config.micro_batch, "final_test_accuracy": result.final_test_accuracy,
            "target": target_of[result.seed], "iterations_to_target": hit["step"] if hit else None,
            "seconds_to_target": hit["train_seconds"] if hit else None, "steps": result.steps,
            "train_seconds": result.train_seconds, "diverged_at_step": result.diverged_at_step,
        })
        if label != "baseline":
            cells.setdefault((result.batch, label), Cell()).add(result, target_of[result.seed])
    targets_text = ", ".join(f"seed {s}: {100 * t:.2f}%" for s, t in sorted(target_of.items()))
    lines = [
        f"Targets (momentum SGD at B = {BASE_BATCH}): {targets_text}",
        "",
        "| B | LENA's statistics | micro-batches per step | final test accuracy / iterations to target / time "
        "to target |",
        "|---|---|---|---|",
    ]
    names = {"example": "example (per-example norms, n = B/b)", "micro_batch": "micro-batch (n = B/b samples)",
             "single_sample": "micro-batch, one sample (n = 1, gains 1)"}
    for (batch, label), cell in sorted(cells.items(), key=lambda kv: (kv[0][0], list(names).index(kv[0][1]))):
        micro = 1 if label != "micro_batch" else batch // BASE_BATCH
        lines.append(f"| {batch} | {names[label]} | {micro} | {cell.text()} |")
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="where the runs go (resumable)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batches", default="1024,8192")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--single-sample", action="store_true",
                        help="also LENA with micro-batch statistics from one micro-batch of B (n = 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]

    runs = configs(args)
    load_before = os.getloadavg()
    for k, (label, config) in enumerate(runs, 1):
        what = f"run {k} of {len(runs)}: {config.method} {label} B = {config.batch} seed {config.seed}"
        if (Path(config.run_dir) / SUMMARY).exists():
            print(f"{what}: finished, skipped", flush=True)
            continue
        print(f"{what}: training", flush=True)
        summary = train(config)
        print(f"  test accuracy {100 * summary['final_test_accuracy']:.2f}% ({summary['train_seconds']:.1f} s)",
              flush=True)
    text, rows = table(runs)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "protocol": {"model": "mlp", "dataset": "fashion-mnist", "epochs": args.epochs, "base_batch": BASE_BATCH,
                     "base_lr": BASE_LR, "seeds": args.seeds, "batches": args.batches,
                     "checks": "test accuracy twice per epoch and at the end of each epoch",
                     "target": f"per seed, the final test accuracy of momentum SGD at B = {BASE_BATCH}"},
        "table": text,
        "runs": rows,
        **machine(),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
    }, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
