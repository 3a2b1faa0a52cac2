"""The study's second look (robustness.py): near-best rates on several seeds and the one-SE rule, the
main sweep from rate / 3, and the gradient noise scale over the base-batch run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _cli_data import needs_fashion_mnist
from _study_records import tiny_study
from torch import nn

from largebatch.cli import main
from largebatch.train.noise import GRAD_SQ, TRACE, NoiseScaleProbe, windowed_noise_scale
from largebatch.study import near_best_rates, next_rate, one_standard_error


def test_near_best_rates_are_those_within_the_margin_of_the_best():
    grid = {"0.1": 0.8524, "1": 0.8974, "3": 0.903, "10": 0.9024, "30": 0.104}
    assert near_best_rates(grid, 0.01) == [1.0, 3.0, 10.0]
    assert near_best_rates(grid, 0.0) == [3.0]


def test_one_standard_error_picks_the_smallest_rate_within_one_se_of_the_best_mean():
    # best mean at 30: (0.905 + 0.897) / 2 = 0.901, SE = stdev / sqrt 2 = 0.004; 10's mean 0.8985 is within
    choice = one_standard_error({10.0: [0.9034, 0.8936], 30.0: [0.905, 0.897]})
    assert choice["best_mean_lr"] == 30.0 and choice["lr"] == 10.0
    assert math.isclose(choice["standard_error"], 0.004)
    # the same means with agreeing seeds: 10 is outside one SE, 30 stays
    assert one_standard_error({10.0: [0.8985, 0.8985], 30.0: [0.901, 0.901]})["lr"] == 30.0
    # one seed: no spread, the best alone; a tie goes to the smaller rate
    assert one_standard_error({1.0: [0.9], 3.0: [0.91]})["lr"] == 3.0
    assert one_standard_error({1.0: [0.9, 0.9], 3.0: [0.9, 0.9]})["lr"] == 1.0
    with pytest.raises(ValueError):
        one_standard_error({1.0: []})


def test_the_next_lower_rate_is_a_third_on_the_half_decade_ladder():
    assert [next_rate(lr, up=False) for lr in (30.0, 3.0, 0.03, 0.01, 1.0)] == [10.0, 1.0, 0.01, 0.003, 0.3]


def test_noise_probe_matches_per_example_gradients_from_torch_func():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    probe = NoiseScaleProbe(model)
    probe.reset()
    nn.functional.cross_entropy(model(x), y).backward()
    got = probe.read()
    probe.remove()  # the reference below runs without the hooks

    params = dict(model.named_parameters())

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(16, -1) for g in grads.values()], dim=1).double()
    n = flat.shape[0]
    mean_sq = flat.pow(2).sum(1).mean()
    batch_sq = flat.mean(0).pow(2).sum()
    trace = n / (n - 1) * (mean_sq - batch_sq)
    trace = float(trace.detach())
    assert math.isclose(got[TRACE]["model"], trace, rel_tol=1e-5)
    assert math.isclose(got[GRAD_SQ]["model"], float(batch_sq.detach()) - trace / n, rel_tol=1e-5, abs_tol=1e-7)


def test_windowed_noise_scale_is_the_ratio_of_window_means():
    records = [{"step": s, TRACE: {"model": t}, GRAD_SQ: {"model": g}}
               for s, t, g in [(10, 4.0, 1.0), (20, 8.0, 1.0), (30, 6.0, -0.5), (40, 6.0, 0.5)]]
    series = windowed_noise_scale(records, 2, steps_per_epoch=20)
    assert series["noise_scale"] == [6.0, None] and series["epoch"] == [1.0, 2.0] and series["step"] == [20, 40]
    assert windowed_noise_scale([{"step": 1}], 2, 20) is None


TINY = dict(name="tiny-robust", methods=["lsw", "lars"], batches=[128, 256], seeds=[0, 1], tune_grid=[0.01, 0.1],
            tune_grids={"lars": [1.0, 3.0]}, tune_seeds=2, tune_rule="one-se", tune_within=0.9, sensitivity_seeds=[0],
            noise_scale=True, ablation_methods=[], evals_per_epoch=1)


@needs_fashion_mnist
def test_study_runs_the_second_look_phases_and_resumes(tmp_path, capsys):
    spec = tiny_study(tmp_path, [{"name": "mlp", "epochs": 1}], **TINY)
    assert main(["study", "--spec", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "tune-seeds sgd lr 0.01 at batch 128 seed 1" in out and "tune-seeds lars lr 3 at batch 128 seed 1" in out

    summaries = json.loads((tmp_path / "results" / "summaries.json").read_text())
    tuned = summaries["tuning"]["mlp"]
    for family in ("sgd", "lars"):
        entry = tuned[family]
        assert entry["rule"] == "one-se" and entry["seeds"] == [0, 1]
        assert all(len(v) == 2 for v in entry["seed_scores"].values()) and len(entry["seed_scores"]) == 2
        assert entry["lr"] == one_standard_error({float(k): v for k, v in entry["seed_scores"].items()})["lr"]
    runs = summaries["runs"]
    assert sorted(r["run"] for r in runs if r["phase"] == "tune-seeds") == [
        "lars-lr1-s1", "lars-lr3-s1", "sgd-lr0.01-s1", "sgd-lr0.1-s1"]
    sensitivity = {(r["method"], r["batch"]): r["base_lr"] for r in runs if r["phase"] == "sensitivity"}
    assert sensitivity == {(m, b): next_rate(tuned["lars" if m == "lars" else "sgd"]["lr"], up=False)
                           for m in ("lsw", "lars") for b in (128, 256)}
    sweep = {(r["method"], r["batch"], r["seed"]): r["base_lr"] for r in runs if r["phase"] == "sweep"}
    assert sweep[("lars", 256, 1)] == tuned["lars"]["lr"] and sweep[("lsw", 256, 0)] == tuned["sgd"]["lr"]
    (noise,) = [r for r in runs if r["phase"] == "noise-scale"]
    assert (noise["method"], noise["batch"], noise["seed"], noise["base_lr"]) == ("sgd", 128, 0, tuned["sgd"]["lr"])
    assert len(noise["noise"]["noise_scale"]) == 4 and noise["noise"]["trace"][0] > 0  # 4 steps, layer_every 1

    page = (tmp_path / "docs" / "results.md").read_text()
    assert "## Rate sensitivity" in page and "## mlp: gradient noise scale" in page
    assert "| lars (" in page.split("## Rate sensitivity")[1] and "one-standard-error rule" in page
    assert (tmp_path / "results" / "mlp-noise-scale.png").exists()

    # again: nothing trained; and from the committed summaries alone on a new machine
    assert main(["study", "--spec", str(spec)]) == 0
    assert "test accuracy" not in capsys.readouterr().out.replace("finished, skipped", "")
    import shutil

    shutil.rmtree(tmp_path / "runs")
    assert main(["study", "--spec", str(spec)]) == 0
    assert "test accuracy" not in capsys.readouterr().out.replace("finished, skipped", "")
    assert json.loads((tmp_path / "results" / "summaries.json").read_text())["runs"] == runs
    assert (tmp_path / "docs" / "results.md").read_text() == page
