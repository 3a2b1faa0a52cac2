"""Data-parallel training equals single-process accumulation; torchrun restarts resume."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from _cli_data import FASHION_MNIST, SLICE, needs_fashion_mnist
from _dist import run_command

from largebatch.cli import main
from largebatch.train import distributed
from largebatch.train.config import TrainConfig
from largebatch.train.faults import CRASH_AT_STEP_ENV
from largebatch.train.runner import train

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


def agree(port: int, world_size: int, late: dict[int, float] | None = None) -> list[str]:
    """Every rank's namespace, each rank a thread with its own store client (``late``: rank -> delay)."""
    names: list = [None] * world_size

    def rank_main(rank: int) -> None:
        time.sleep((late or {}).get(rank, 0.0))
        client = torch.distributed.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
        names[rank] = distributed._fresh_namespace(client, rank, world_size, timedelta(seconds=30))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return names


def test_each_start_of_the_workers_gets_a_namespace_of_its_own():
    """The agent's store keeps the keys of earlier starts; stale ``hello`` keys must not mislead rank 0."""
    server = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    first = agree(server.port, 3)
    assert first[0] is not None and len(set(first)) == 1
    # A restart: the old hello keys are still there while the late ranks start.
    second = agree(server.port, 3, late={1: 0.3, 2: 0.6})
    assert second[0] is not None and len(set(second)) == 1 and second[0] != first[0]
    third = agree(server.port, 3, late={0: 0.3})
    assert third[0] is not None and len(set(third)) == 1 and third[0] not in (first[0], second[0])


def step_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "step"]


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_from_the_last_checkpoint(tmp_path):
    """Rank 1 dies at step 5; torchrun restarts both ranks once, and they resume from the checkpoint at step 4.

    No LARGEBATCH_DIST_TIMEOUT: the restarted ranks must join the new group on their first try.
    """
    run = tmp_path / "torchrun"
    torchrun = Path(sys.executable).with_name("torchrun")
    argv = ["train", "--method", "lsw", "--model", "mlp", "--batch", "256", "--micro-batch", "128", "--epochs", "2",
            "--seed", "3", "--run-dir", str(run), "--checkpoint-every", "2", "--resume", *SLICE]
    env = {**os.environ, CRASH_AT_STEP_ENV: "5", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "LARGEBATCH_DATA_DIR": FASHION_MNIST}
    env.pop(distributed.TIMEOUT_ENV, None)
    done = run_command(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "--max-restarts", "3", "-m", "largebatch.cli", *argv],
        env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / ".crashed-at-step-5").exists()  # rank 1 really died once
    failures = [line for line in done.stderr.splitlines() if "failed (exitcode" in line]
    assert len(failures) == 1 and "exitcode: 17" in failures[0], done.stderr[-3000:]  # that death, nothing else
    assert f"resuming {run / 'checkpoint.pt'} at step 4" in done.stderr  # the last checkpoint before step 5
    single = tmp_path / "single"
    assert main([*argv[:argv.index("--run-dir")], "--run-dir", str(single), *SLICE]) == 0
    assert_same_weights(run, single)
    # Every step logged once, in order, with the single process's loss: nothing lost or repeated.
    resumed, whole = step_records(run), step_records(single)
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == list(range(1, 9))
    torch.testing.assert_close([r["loss"] for r in resumed], [r["loss"] for r in whole], rtol=1e-4, atol=1e-5)


def train_until_signalled(rank: int, world_size: int, run_dir: str) -> int:
    """Rank 1 alone gets SIGTERM during step 3; returns the step each rank stopped at."""
    from largebatch.train.faults import SIGNAL_AT_STEP_ENV
    from largebatch.train.runner import Interrupted

    os.environ[SIGNAL_AT_STEP_ENV], os.environ["LARGEBATCH_TEST_CRASH_RANK"] = "3:TERM", "1"
    try:
        train(TrainConfig(method="lsw", run_dir=run_dir, checkpoint_every=0, **SMALL))
    except Interrupted as e:
        return e.step
    finally:
        del os.environ[SIGNAL_AT_STEP_ENV], os.environ["LARGEBATCH_TEST_CRASH_RANK"]
    return -1


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    from _dist import run_in_group

    run = tmp_path / "ddp"
    assert run_in_group(train_until_signalled, str(run), world_size=2, timeout=180) == [3, 3]
    assert torch.load(run / "checkpoint.pt", weights_only=False)["position"]["step"] == 3
    assert max(r["step"] for r in step_records(run)) == 3
