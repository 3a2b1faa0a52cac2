"""The scripts under examples/ run as a user runs them, on a slice of the real Fashion-MNIST.

Each runs in its own process with small settings (a few seconds); the DDP
example runs under real torchrun with 2 gloo ranks on loopback.
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import pytest

from _cli_data import FASHION_MNIST, needs_fashion_mnist
from _dist import run_command

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SMALL = ["--train-limit", "2048", "--test-limit", "500", "--batch", "512", "--epochs", "2", "--device", "cpu"]
EPOCH = re.compile(r"^epoch (\d+): .*loss (\S+)\s+test accuracy ([\d.]+)%", re.M)

pytestmark = needs_fashion_mnist


def _env() -> dict[str, str]:
    return {**os.environ, "LARGEBATCH_DATA_DIR": FASHION_MNIST or "", "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}


def _run(command: list[str], timeout: float = 180) -> list[tuple[int, float, float]]:
    done = run_command(command, env=_env(), timeout=timeout)  # at the timeout: every process's stack
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    epochs = [(int(e), float(loss), float(acc) / 100) for e, loss, acc in EPOCH.findall(done.stdout)]
    assert [e for e, _, _ in epochs] == [1, 2], done.stdout
    assert all(math.isfinite(loss) for _, loss, _ in epochs), done.stdout
    return epochs


def _script(name: str, *args: str) -> list[tuple[int, float, float]]:
    return _run([sys.executable, str(EXAMPLES / name), *SMALL, *args])


@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
def test_lars_lamb_example_trains(optimizer):
    epochs = _script("lars_lamb.py", "--optimizer", optimizer)
    assert epochs[-1][2] > 0.3  # 10 classes: chance is 10%


def test_adascale_example_trains_on_its_clock():
    epochs = _script("adascale.py", "--micro-batch", "128")
    assert epochs[-1][2] > 0.3


def test_clars_transformer_example_runs():
    # 8 updates of a transformer from scratch: it runs and its loss stays finite
    _script("clars_transformer.py", "--micro-batch", "256")


def test_lena_example_in_one_process():
    epochs = _script("lena_ddp.py", "--micro-batch", "128")
    assert epochs[-1][2] > 0.3


@pytest.mark.distributed
def test_lena_example_under_torchrun_with_two_gloo_ranks():
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(EXAMPLES / "lena_ddp.py"),
               *SMALL, "--micro-batch", "128"]
    epochs = _run(command, timeout=300)
    assert epochs[-1][2] > 0.3
