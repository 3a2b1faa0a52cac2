"""Plots and reports a reader can trust, and batch-size advice for any model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli_data import SLICE, needs_fashion_mnist
from matplotlib.image import imread
from torch import nn

from largebatch.report import write_report
from largebatch.report import plots
from largebatch.report.results import RunResult


def fake_run(directory: Path, method: str, batch: int, accuracies: list[float], losses: list[float],
             seed: int = 0, diverged: int | None = None, layers: list[dict] | None = None, epochs: int = 1) -> Path:
    """A run directory as `largebatch train` leaves it: summary.json, metrics.jsonl (and layers.jsonl)."""
    directory.mkdir(parents=True, exist_ok=True)
    evals = [{"step": 2 * (i + 1), "epoch": (i + 1) / len(accuracies), "train_seconds": float(i + 1),
              "test_accuracy": a} for i, a in enumerate(accuracies)]
    steps = [{"kind": "step", "step": i + 1, "epoch": 0, "loss": v, "lr": 0.1, "train_seconds": float(i)}
             for i, v in enumerate(losses)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps + [
        {"kind": "eval", **e} for e in evals]))
    (directory / "summary.json").write_text(json.dumps({
        "method": method, "batch": batch, "seed": seed, "epochs": epochs, "base_lr": 0.1, "steps": len(losses),
        "train_seconds": float(len(losses)), "final_test_accuracy": accuracies[-1], "final_val_accuracy": None,
        "diverged_at_step": diverged, "evals": evals,
        "machine": {"load_average_end": [1.5, 1.0, 0.5], "threads": 2},
    }))
    (directory / "config.json").write_text(json.dumps({"config": {"model": "mlp", "dataset": "fashion-mnist",
                                                                  "epochs": epochs, "base_batch": 128}}))
    if layers is not None:
        (directory / "layers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in layers))
    return directory


def image_is_a_plot(path: Path) -> None:
    image = imread(path)
    assert image.shape[0] >= 200 and image.shape[1] >= 300
    assert float(np.var(image[..., :3])) > 1e-3


def test_a_curve_hidden_under_another_is_drawn_visibly_and_named(tmp_path):
    # Both diverge: the same accuracies and the same losses, as LSW under SGD did.
    nan = float("nan")
    fake_run(tmp_path / "runs" / "sgd-b1024-s0", "sgd", 1024, [0.1, 0.1], [2.3, 50.0, nan], diverged=3)
    fake_run(tmp_path / "runs" / "lsw-b1024-s0", "lsw", 1024, [0.1, 0.1], [2.3, 50.0, nan], diverged=3)
    fake_run(tmp_path / "runs" / "lars-b1024-s0", "lars", 1024, [0.5, 0.7], [2.3, 1.5, 1.0, 0.8])
    report = write_report(tmp_path).read_text()
    assert "Drawn on top of each other: sgd (seed 0) lies exactly on lsw (hollow markers)." in report
    assert "| lsw | 10.00% / never (diverged at step 3) |" in report
    assert "- sgd at batch 1024, seed 0: diverged at step 3" in report
    assert "(accuracy-b1024.png)" in report and "(loss-b1024.png)" in report
    image_is_a_plot(tmp_path / "loss-b1024.png")

    runs = [RunResult.load(d) for d in sorted((tmp_path / "runs").iterdir())]
    _, notes = plots.accuracy_vs_iterations(runs, None, 1024, tmp_path / "a.png")
    assert notes == ["sgd (seed 0) lies exactly on lsw"]
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    plots._curves_plot(ax, [(r, [1, 2], [0.1, 0.1]) for r in runs])
    labels = [line.get_label() for line in ax.get_lines()]
    assert "sgd (same curve as lars)" in labels and "diverged (run stopped)" in labels
    hidden = next(line for line in ax.get_lines() if line.get_label() == "sgd (same curve as lars)")
    assert hidden.get_markerfacecolor() == "none" and hidden.get_markersize() > 3  # visible around the other


def test_a_single_run_with_one_check_plots_no_dot_but_its_losses(tmp_path):
    fake_run(tmp_path, "lsw", 256, [0.7], [2.3, 1.2, 0.9, 0.7])
    report = write_report(tmp_path).read_text()
    assert "accuracy-b256.png" not in report and not (tmp_path / "accuracy-b256.png").exists()
    assert "test accuracy was checked once per run (lsw seed 0: 70.00% at step 2)" in report
    assert "(loss-b256.png)" in report
    image_is_a_plot(tmp_path / "loss-b256.png")
    assert report.startswith("# Large-batch training: mlp on fashion-mnist, 1 epoch\n")  # singular
    assert "Machine load (1-minute load average as each run ended): 1.5 to 1.5" in report


def test_layers_whose_warmup_never_ended_are_shown_as_not_reached(tmp_path):
    layers = [{"step": s, "epoch": 0, "warmup_end": {"0.weight": 2.0 if s >= 2 else -1.0, "0.bias": -1.0}}
              for s in (1, 2, 3)]
    fake_run(tmp_path, "lena", 512, [0.5, 0.6], [2.3, 1.2, 0.9], layers=layers)
    run = RunResult.load(tmp_path)
    assert plots.warmup_ends(run) == {"0.weight": 2.0, "0.bias": None}
    report = write_report(tmp_path).read_text()
    assert "Warm-up not reached by the last step (3) in lena, batch 512: 0.bias." in report
    image_is_a_plot(tmp_path / "warmup-lena-b512.png")

    from matplotlib.figure import Figure

    captured = {}
    original = Figure.savefig

    def keep(fig, *args, **kwargs):
        captured["texts"] = [t.get_text() for t in fig.axes[0].texts]
        captured["title"] = fig.axes[0].get_title()
        return original(fig, *args, **kwargs)

    Figure.savefig = keep
    try:
        plots.warmup_end_points(run, tmp_path / "w.png")
    finally:
        Figure.savefig = original
    assert captured["texts"] == ["not reached"] and "seed 0" in captured["title"]


@needs_fashion_mnist
def test_short_runs_record_per_layer_values_every_step_by_default(tmp_path):
    from largebatch.cli import main
    from largebatch.train.config import TrainConfig

    assert TrainConfig().effective_layer_every(30) == 1 and TrainConfig().effective_layer_every(100_000) == 10
    assert TrainConfig(layer_every=5).effective_layer_every(30) == 5
    run = tmp_path / "run"
    assert main(["train", "--method", "lars", "--batch", "256", "--epochs", "2", "--run-dir", str(run), *SLICE]) == 0
    assert [json.loads(line)["step"] for line in (run / "layers.jsonl").read_text().splitlines()] == list(range(1, 9))


# -- advice --------------------------------------------------------------------------------------

def small_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    batches = [(torch.randn(512, 10, generator=g), torch.randint(0, 3, (512,), generator=g)) for _ in range(3)]
    return model, batches


def test_advise_measures_your_model_without_changing_it():
    import largebatch

    model, batches = small_problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model[0].weight.grad = torch.ones_like(model[0].weight)
    advice = largebatch.advise(model, nn.functional.cross_entropy, batches, micro_batch=64)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and BatchNorm running statistics as they were
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight)) and model[3].weight.grad is None
    assert advice.measured_batches == 3 and advice.batch == 512 and advice.micro_batch == 64
    assert advice.noise_scale > 0 and set(advice.layer_noise_scales) == {n for n, _ in model.named_parameters()}
    if math.isfinite(advice.noise_scale) and advice.noise_scale >= 2:
        assert advice.largest_paying_batch == 2 ** math.floor(math.log2(advice.noise_scale / 2))
    with pytest.raises(ValueError, match="at least 2 micro-batches"):
        largebatch.advise(model, nn.functional.cross_entropy, batches, micro_batch=512)


def test_advice_never_says_up_to_about_none():
    from largebatch.train.advise import conclusion, largest_paying

    assert largest_paying(1.5) == 0 and largest_paying(2.0) == 1 and largest_paying(1000) == 256
    small = conclusion(1.5)
    assert "no batch larger than 1 pays" in small and "none" not in small.replace("no batch", "")
    assert "batches up to about 256 still pay" in conclusion(1000)
    assert "every batch in the table still pays" in conclusion(math.inf)
    for value in (0.01, 1.0, 3.0, 63.0, 1e6, math.inf, math.nan):
        assert "about none" not in conclusion(value)


@needs_fashion_mnist
def test_advise_takes_the_checkpoint_of_a_run(tmp_path, capsys):
    from largebatch.cli import main

    run = tmp_path / "run"
    assert main(["train", "--method", "lsw", "--batch", "256", "--epochs", "1", "--run-dir", str(run), *SLICE]) == 0
    capsys.readouterr()
    assert main(["advise", "--checkpoint", str(run), "--batch", "256", "--micro-batch", "64", "--steps", "2",
                 "--run-dir", str(tmp_path / "advice")]) == 0
    out = capsys.readouterr().out
    assert f"at step 4 of the run in {run} (lsw, batch 256), over 2 batch(es), no updates" in out
    assert "about none" not in out and "B_noise = tr(Sigma)/|G|^2" in out
    advice = json.loads((tmp_path / "advice" / "advice.json").read_text())
    assert advice["settings"]["step"] == 4 and advice["measured_batches"] == 2
    assert main(["advise", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    for bad, needle in ((["--steps", "0"], "--steps must be a positive integer"),
                        (["--lr", "inf"], "--lr must be a positive finite number")):
        assert main(["advise", *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err
