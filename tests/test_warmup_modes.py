"""Warm-up modes for every method (none, fixed, state-aware), and AdaScale's clock against the LENA paper's AS, as the harness builds them."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from _cli_data import needs_fashion_mnist
from torch import nn

from largebatch.cli import main
from largebatch.train.config import TrainConfig
from largebatch.train.methods import (
    RunShape,
    build,
    get_method,
    state_aware_theta,
    warmup_mode,
    warmup_steps,
)

# The rate sequences are read without optimiser steps: torch's reminder about the order does not apply.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")

BASE_LR = 0.1


def shape(batch: int, warmup: str, epochs: int = 10, steps_per_epoch: int = 20, decay_to=None) -> RunShape:
    return RunShape(base_lr=BASE_LR, base_batch=128, batch=batch, steps_per_epoch=steps_per_epoch, epochs=epochs,
                    decay_to=decay_to, warmup=warmup)


def rates(method: str, run: RunShape, steps: int) -> list[float]:
    """The group rate the optimiser would use at each of the first ``steps`` updates (no gradients needed)."""
    optimizer, scheduler = build(get_method(method), nn.Linear(3, 2), run)
    out = []
    for _ in range(steps):
        out.append(float(optimizer.param_groups[0]["lr"]))
        if scheduler is not None:
            scheduler.step()
    return out


@pytest.mark.parametrize("method", ["sgd", "lsw", "lars", "clars"])
def test_no_warmup_starts_at_the_scaled_rate(method):
    assert rates(method, shape(1024, "none"), 3) == pytest.approx([BASE_LR * 8] * 3)


@pytest.mark.parametrize("method", ["sgd", "lsw", "clars"])
def test_fixed_warmup_rises_linearly_from_eta0_to_the_scaled_rate(method):
    run = shape(1024, "fixed")
    steps = warmup_steps(get_method(method), run)
    assert steps == round(0.055 * 10 * 20) == 11
    got = rates(method, run, steps + 3)
    expected = [BASE_LR + (BASE_LR * 8 - BASE_LR) * t / steps for t in range(steps)] + [BASE_LR * 8] * 3
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("method, peak", [("lsw", 8 * BASE_LR), ("sqrt", math.sqrt(8) * BASE_LR)])
def test_state_aware_warmup_of_a_fixed_scaling_method_counts_B_over_b_per_update(method, peak):
    run = shape(1024, "state-aware")
    theta = state_aware_theta(run)  # alpha T1 = 0.05 * (200 steps * 8) = 80 base-batch iterations
    assert theta == pytest.approx(80)
    got = rates(method, run, 12)
    expected = [peak * min((t + 1) * 8 / theta, 1.0) for t in range(12)]
    assert got == pytest.approx(expected)
    assert warmup_steps(get_method(method), run) == 10  # every layer ends at update theta / (B/b)


def test_state_aware_ramp_multiplies_the_decay():
    run = shape(1024, "state-aware", decay_to=0.01)
    got = rates("lsw", run, 12)
    gamma = 0.01 ** (1 / 200)
    assert got[3] == pytest.approx(0.8 * (4 * 8 / 80) * gamma**3)
    assert got[11] == pytest.approx(0.8 * gamma**11)


def test_lena_modes_switch_its_own_warmup_and_fixed_starts_at_one_nth():
    for mode, on in [("default", True), ("state-aware", True), ("none", False), ("fixed", False)]:
        optimizer, _ = build(get_method("lena"), nn.Linear(3, 2), shape(1024, mode))
        assert all(g["warmup"] is on for g in optimizer.param_groups), mode
    got = rates("lena", shape(1024, "fixed"), 12)
    assert got[0] == pytest.approx(BASE_LR / 8) and got[11] == pytest.approx(BASE_LR)
    assert rates("lena", shape(1024, "none"), 2) == pytest.approx([BASE_LR] * 2)


def test_adascale_warmups_run_on_its_clock():
    assert rates("adascale", shape(1024, "fixed"), 1) == pytest.approx([BASE_LR / 8])
    theta = state_aware_theta(shape(1024, "state-aware"))
    assert rates("adascale", shape(1024, "state-aware"), 1) == pytest.approx([BASE_LR * 1 / theta])
    assert warmup_mode(get_method("adascale"), shape(1024, "default")) == "none"


@pytest.mark.parametrize("method", ["lsw", "adascale", "lena"])
@pytest.mark.parametrize("mode", ["fixed", "state-aware"])
def test_warmup_schedulers_checkpoint_and_resume(method, mode):
    run = shape(1024, mode, decay_to=0.01)
    optimizer, scheduler = build(get_method(method), nn.Linear(3, 2), run)
    for _ in range(3):
        scheduler.step()
    buffer = io.BytesIO()
    # Must pickle (checkpoints hold it); chainable schedulers keep the rate in the optimiser's groups.
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    optimizer2, scheduler2 = build(get_method(method), nn.Linear(3, 2), run)
    optimizer2.load_state_dict(saved["optimizer"])
    scheduler2.load_state_dict(saved["scheduler"])
    scheduler.step()
    scheduler2.step()
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])


def test_warmup_mode_is_part_of_a_run_but_default_keeps_old_checkpoints_resumable():
    assert "warmup" not in TrainConfig().run_identity()
    assert TrainConfig(warmup="none").run_identity()["warmup"] == "none"
    with pytest.raises(ValueError, match="--warmup must be one of"):
        TrainConfig(warmup="sometimes").validate()


@needs_fashion_mnist
def test_train_takes_the_warmup_mode_and_records_it(tmp_path):
    from _cli_data import SLICE

    run = tmp_path / "lena-none"
    assert main(["train", "--method", "lena", "--warmup", "none", "--batch", "256", "--epochs", "1",
                 "--layer-every", "1", "--run-dir", str(run), *SLICE]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["warmup"] == "none"
    last = json.loads((run / "layers.jsonl").read_text().splitlines()[-1])
    assert set(last["warmup_end"].values()) == {-1.0}  # no warm-up: no layer has an end point (-1)


# -- adascale (the published method) and as (the LENA paper's baseline) -----------------------------

def test_as_decays_on_the_update_count_and_adascale_on_its_clock():
    from torch.optim.lr_scheduler import ExponentialLR

    from largebatch.optim.adascale import ProgressLR
    from largebatch.train.methods import ClockedWarmupLR, RunShape, build, get_method

    shape = RunShape(base_lr=0.1, base_batch=128, batch=1024, steps_per_epoch=10, epochs=2)
    _, as_schedule = build(get_method("as"), nn.Linear(3, 2), shape)
    _, clock_schedule = build(get_method("adascale"), nn.Linear(3, 2), shape)
    assert isinstance(as_schedule, ExponentialLR) and isinstance(clock_schedule, ProgressLR)
    assert get_method("adascale").ends_on_clock and not get_method("as").ends_on_clock
    import dataclasses

    optimizer, warm = build(get_method("as"), nn.Linear(3, 2), dataclasses.replace(shape, warmup="state-aware"))
    assert isinstance(warm, ClockedWarmupLR) and warm.schedule.decay_on_steps
    # before any step tau = 0: the ramp's first factor is (0 + 1) / theta, theta = 5% of T1 = 8
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 8)


@needs_fashion_mnist
def test_adascale_stops_when_tau_reaches_t1_or_at_the_cap_and_as_trains_the_budget(tmp_path):
    from largebatch.train.config import TrainConfig
    from largebatch.train.runner import train

    common = dict(epochs=1, train_limit=1024, test_limit=200, val_size=200, progress=False)
    # n = 2 and a cap of 3 epochs: tau gains at least 1 per update, so it reaches T1 = 2 x 4 updates in time
    s = train(TrainConfig(method="adascale", batch=256, run_dir=str(tmp_path / "t1"), **common))
    assert s["stopped"] == "t1" and s["tau"] >= s["base_iterations"] == 8
    assert 4 <= s["steps"] < 12 and s["epochs_used"] == s["steps"] / 4
    assert s["evals"][-1]["step"] == s["steps"] and s["final_val_accuracy"] is not None
    # cap at the budget itself: tau (gains below n = 4) cannot reach T1 = 8 in 2 updates
    s = train(TrainConfig(method="adascale", batch=512, clock_cap=1, run_dir=str(tmp_path / "cap"), **common))
    assert s["stopped"] == "cap" and s["tau"] < s["base_iterations"] and s["steps"] == 2 and s["epochs_used"] == 1
    s = train(TrainConfig(method="as", batch=512, run_dir=str(tmp_path / "as"), **common))
    assert "stopped" not in s and s["steps"] == 2
    assert s["train_cpu_seconds"] > 0 and "train_cpu_seconds" in s["evals"][-1]
    with pytest.raises(ValueError, match="--clock-cap must be"):
        TrainConfig(method="adascale", clock_cap=0.5).validate()
