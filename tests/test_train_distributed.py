"""Data-parallel training equals single-process accumulation; torchrun restarts resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cli_data import FASHION_MNIST, SLICE, needs_fashion_mnist

from largebatch.cli import main
from largebatch.train.config import TrainConfig
from largebatch.train.runner import CRASH_AT_STEP_ENV, train

pytestmark = [needs_fashion_mnist, pytest.mark.distributed]

SMALL = dict(model="mlp", batch=256, micro_batch=128, epochs=1, seed=3, train_limit=1024, test_limit=500,
             val_size=500, progress=False, layer_every=1)


def train_on_rank(rank: int, world_size: int, runs: list[tuple[str, str]]) -> None:
    for method, run_dir in runs:
        train(TrainConfig(method=method, run_dir=run_dir, **SMALL))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)


def test_two_ranks_equal_one_process_with_two_micro_batches(tmp_path):
    """Each rank takes a disjoint half of every global batch: 2 x 1 micro-batch == 1 x 2 micro-batches.

    LENA also checks the statistics path: its n and per-layer norms come from
    the DDP comm hook on two ranks and from accumulation in one process.
    """
    from _dist import run_in_group

    methods = ("lsw", "lena")
    runs = [(m, str(tmp_path / f"ddp-{m}")) for m in methods]
    run_in_group(train_on_rank, runs, world_size=2, timeout=180)
    for method in methods:
        train(TrainConfig(method=method, run_dir=str(tmp_path / f"single-{method}"), **SMALL))
        assert_same_weights(tmp_path / f"ddp-{method}", tmp_path / f"single-{method}")
    config = (tmp_path / "ddp-lsw" / "config.json").read_text()
    assert '"world_size": 2' in config and '"micro_batches_per_rank": 1' in config


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_from_the_last_checkpoint(tmp_path):
    run = tmp_path / "torchrun"
    torchrun = Path(sys.executable).with_name("torchrun")
    argv = ["train", "--method", "lsw", "--model", "mlp", "--batch", "256", "--micro-batch", "128", "--epochs", "2",
            "--seed", "3", "--run-dir", str(run), "--checkpoint-every", "2", "--resume", *SLICE]
    env = {**os.environ, CRASH_AT_STEP_ENV: "5", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "LARGEBATCH_DATA_DIR": FASHION_MNIST,
           # a restarted gloo group can hang while connecting on a loaded machine: fail and restart again
           "LARGEBATCH_DIST_TIMEOUT": "30"}
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "--max-restarts", "3", "-m", "largebatch.cli", *argv],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / ".crashed-at-step-5").exists()  # rank 1 really died once
    single = tmp_path / "single"
    assert main([*argv[:argv.index("--run-dir")], "--run-dir", str(single), *SLICE]) == 0
    assert_same_weights(run, single)
