"""Under torchrun, every rank imports the user's model callable from the working directory, and takes the
crop-flip draws of its own examples: two ranks equal one process with two micro-batches."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from _cifar_data import make_cifar
from _dist import run_command

from largebatch.cli import main

pytestmark = pytest.mark.distributed

MODEL = """
from torch import nn

def tiny(num_classes, in_channels, image_size):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, stride=4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * (image_size // 4) ** 2, num_classes))
"""


def test_torchrun_imports_the_model_callable_and_splits_the_augmentation(tmp_path, monkeypatch):
    data = make_cifar(tmp_path / "data", "cifar10")
    (tmp_path / "lb_ddp_model.py").write_text(MODEL)
    argv = ["train", "--method", "lsw", "--model", "lb_ddp_model:tiny", "--dataset", "cifar10", "--data-dir",
            str(data), "--augment", "crop-flip", "--batch", "64", "--epochs", "1", "--seed", "2", "--val-size",
            "44", "--test-limit", "20", "--no-progress", "--threads", "1"]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = run_command([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "largebatch.cli", *argv,
                        "--micro-batch", "32", "--run-dir", str(tmp_path / "ddp")], env=env, timeout=300,
                       cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--micro-batch", "32", "--run-dir", str(tmp_path / "single")]) == 0
    wa, wb = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False)["model"] for d in ("ddp", "single"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)
