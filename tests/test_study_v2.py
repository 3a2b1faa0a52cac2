"""The study v2: the budget rule, grid extension, adascale against as, verdicts, commits, the pipeline."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from _cli_data import needs_fashion_mnist
from torch import nn

from largebatch.cli import main
from largebatch.report.study import Study, headline_table, write_study_report
from largebatch.report.verdicts import HELD, INCONCLUSIVE, NOT_HELD, combine, compare, verdicts
from largebatch.train.methods import get_method
from largebatch.study import (
    StudySpec,
    choose_epochs,
    collect,
    min_epochs_for_updates,
    next_rate,
    restore_committed,
    tune_with_extension,
)
from largebatch.study.committer import Committer
from largebatch.study.phases import ablation_config, ablation_runs, sweep_spec
from largebatch.study.records import method_table
from largebatch.study.run import set_aside_superseded
from largebatch.train.sweep import finished_differently, run_sweep

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- the budget rule ------------------------------------------------------------------------------

def test_updates_rule_gives_34_epochs_at_16k_and_17_at_8k():
    assert min_epochs_for_updates(55_000, 16_384, 100) == 34  # 3 updates per epoch
    assert min_epochs_for_updates(55_000, 8_192, 100) == 17  # 6 updates per epoch
    assert min_epochs_for_updates(55_000, 128, 100) == 1
    with pytest.raises(ValueError, match="larger than the 500 training images"):
        min_epochs_for_updates(500, 1024, 100)


def test_choose_epochs_takes_the_smallest_eligible_candidate_within_the_tolerance():
    acc = {10: [0.80, 0.80], 20: [0.880, 0.884], 40: [0.886, 0.884], 80: [0.887, 0.887]}
    # 10 is below the updates rule's minimum; 20 -> 40 moves 0.3 points (mean 0.882 -> 0.885): passes at 0.003
    got = choose_epochs([10, 20, 40], acc, 0.003, min_epochs=15)
    assert got["epochs"] == 20 and got["rule_met"] is True and got["pending"] is None
    assert [c["epochs"] for c in got["checks"]] == [20]
    assert got["checks"][0]["difference"] == pytest.approx(0.003)
    # a tighter tolerance: 20 fails, 40 (-> 80: +0.2 points) passes
    got = choose_epochs([10, 20, 40], acc, 0.0025, min_epochs=15)
    assert got["epochs"] == 40 and [c["passes"] for c in got["checks"]] == [False, True]
    # nothing passes: the largest eligible candidate, flagged
    got = choose_epochs([20, 40], acc, 0.001, min_epochs=15)
    assert got["epochs"] == 40 and got["rule_met"] is False
    # runs missing: which epochs to train next
    got = choose_epochs([20, 40], {20: [0.88]}, 0.003, min_epochs=15)
    assert got["epochs"] is None and got["pending"] == 40
    assert choose_epochs([20, 40], {}, 0.003, min_epochs=15)["pending"] == 20
    with pytest.raises(ValueError, match="needs at least 34 epochs"):
        choose_epochs([10, 20], acc, 0.003, min_epochs=34)


# -- tuning ----------------------------------------------------------------------------------

def test_half_decade_ladder():
    assert [next_rate(r, up=True) for r in (10, 30, 0.001, 3)] == [30, 100, 0.003, 10]
    assert [next_rate(r, up=False) for r in (10, 3, 0.001, 100)] == [3, 1, 0.0003, 30]


def _fake(peak: float, seen: list[float]):
    import math

    def evaluate(lr: float) -> float:
        seen.append(lr)
        return 1 - abs(math.log10(lr) - math.log10(peak))

    return evaluate


def test_grid_is_extended_until_the_best_rate_is_inside():
    seen: list[float] = []
    got = tune_with_extension([0.1, 0.3, 1, 3, 10], _fake(50, seen), max_extend=4)
    # 10 best -> 30 best -> 100 worse than 30: 30 is inside
    assert got["lr"] == 30 and got["inside"] and got["extended"] == [30, 100]
    assert got["final_grid"] == [0.1, 0.3, 1, 3, 10, 30, 100]
    assert sorted(seen) == got["final_grid"]  # every rate trained once
    seen.clear()
    got = tune_with_extension([0.01, 0.1, 1], _fake(0.0002, seen), max_extend=4)
    assert got["lr"] == 0.0003 and got["inside"] and got["extended"] == [0.0001, 0.0003, 0.001, 0.003]
    got = tune_with_extension([0.1, 1], _fake(1e6, []), max_extend=2)
    assert got["lr"] == 10 and not got["inside"] and got["extended"] == [3, 10]
    got = tune_with_extension([0.1, 1, 10], _fake(1, []), max_extend=4)
    assert got["lr"] == 1 and got["inside"] and got["extended"] == []
    assert set(got["grid"]) == {"0.1", "1", "10"}


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


# -- verdicts -----------------------------------------------------------------------------------

def _run(method, batch, seed, final, hits, phase="sweep", warmup="default", **extra):
    """A sweep record whose test accuracy is checked at steps 1..len(hits)."""
    steps = list(range(1, len(hits) + 1))
    return {"model": "mlp", "phase": phase, "method": method, "warmup": warmup, "batch": batch, "seed": seed,
            "base_lr": 0.1, "epochs": 2, "steps": len(hits), "steps_per_epoch": max(1, len(hits) // 2),
            "train_seconds": float(len(hits)), "train_cpu_seconds": 2.0 * len(hits),
            "final_test_accuracy": final, "final_val_accuracy": final, "warmup_steps": 0, "run": f"{method}-{batch}",
            "evals": {"step": steps, "epoch": [s / max(1, len(hits) // 2) for s in steps],
                      "seconds": [float(s) for s in steps], "cpu": [2.0 * s for s in steps], "accuracy": hits,
                      "loss": [None] * len(hits)}, **extra}


def _summaries(runs, methods=("sgd", "lsw", "as", "lena")):
    spec = {"name": "hand-made", "dataset": "fashion-mnist", "split_seed": 0, "val_size": 100, "base_batch": 128,
            "micro_batch": 128, "batches": [128, 1024], "seeds": [0, 1], "methods": list(methods),
            "models": [{"name": "mlp", "epochs": 2}], "tune_grid": [0.1], "evals_per_epoch": 2,
            "ablation_methods": [], "benchmarks": "/nonexistent"}
    return {"spec": spec, "environment": {}, "tuning": {}, "runs": runs}


def _base():
    return [_run("sgd", 128, s, 0.90, [0.85, 0.90]) for s in (0, 1)]


def verdict(data, claim_part):
    found = [v for v in verdicts(Study(data, Path("."), Path("."))) if claim_part in v.claim]
    assert len(found) == 1, [v.claim for v in verdicts(Study(data, Path("."), Path(".")))]
    return found[0]


def test_verdicts_are_computed_from_the_summaries():
    reaches = [_run("lena", 1024, s, 0.91, [0.80, 0.905]) for s in (0, 1)]
    never = [_run(m, 1024, s, 0.70, [0.60, 0.70]) for m in ("lsw", "as") for s in (0, 1)]
    data = _summaries(_base() + reaches + never)
    v = verdict(data, "lena reaches")
    assert v.status == HELD and "B = 1024: 2/2 seeds" in v.numbers
    v = verdict(data, "fewer iterations to target than lsw")
    assert v.status == HELD and "2 vs never" in v.numbers
    assert verdict(data, "as never reaches").status == HELD

    missed = [_run("lena", 1024, s, 0.70, [0.60, 0.70]) for s in (0, 1)]
    data = _summaries(_base() + missed + never)
    assert verdict(data, "lena reaches").status == NOT_HELD
    assert verdict(data, "fewer iterations to target than as").numbers.endswith("neither reaches the target.")
    assert verdict(data, "fewer iterations to target than as").status == INCONCLUSIVE

    half = [_run("lena", 1024, 0, 0.91, [0.80, 0.905]), _run("lena", 1024, 1, 0.70, [0.60, 0.70])]
    reached_by_as = [_run("as", 1024, s, 0.91, [0.91, 0.91]) for s in (0, 1)]
    data = _summaries(_base() + half + reached_by_as)
    assert verdict(data, "lena reaches").status == INCONCLUSIVE
    assert verdict(data, "as never reaches").status == NOT_HELD
    assert verdict(data, "fewer iterations to target than as").status == INCONCLUSIVE  # one seed of two
    data = _summaries(_base() + missed + reached_by_as)
    v = verdict(data, "fewer iterations to target than as")
    assert v.status == NOT_HELD and "never vs 1 (did not hold)" in v.numbers


def test_fewer_iterations_is_not_held_up_by_batches_neither_method_reached():
    """Faster at 1K but neither reaches the target at 2K: the claim "at every large batch" is undecided."""
    faster = [_run("lena", 1024, s, 0.91, [0.80, 0.905]) for s in (0, 1)]
    slower = [_run("lsw", 1024, s, 0.91, [0.80, 0.85, 0.905]) for s in (0, 1)]
    neither = [_run(m, 2048, s, 0.70, [0.60, 0.70]) for m in ("lena", "lsw") for s in (0, 1)]
    data = _summaries(_base() + faster + slower)
    data["spec"]["batches"] = [128, 1024, 2048]
    v = verdict(data, "fewer iterations to target than lsw")
    assert v.status == INCONCLUSIVE and "B = 2048: not run yet" in v.numbers
    data = _summaries(_base() + faster + slower + neither)
    data["spec"]["batches"] = [128, 1024, 2048]
    v = verdict(data, "fewer iterations to target than lsw")
    assert "B = 1024: 2 vs 3 (held)" in v.numbers and "B = 2048: neither reaches the target" in v.numbers
    assert v.status == INCONCLUSIVE


def test_comparisons_within_the_seeds_spread_are_inconclusive():
    assert compare([0.90, 0.92], [0.80, 0.81]) == HELD
    assert compare([0.80, 0.81], [0.90, 0.92]) == NOT_HELD
    assert compare([0.90, 0.80], [0.86, 0.84]) == INCONCLUSIVE  # 0.01 apart, sd 0.07
    assert compare([100, 110], [300, 310], higher_is_better=False) == HELD
    assert compare([], [1.0]) == INCONCLUSIVE
    assert combine([HELD, HELD]) == HELD and combine([HELD, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([HELD, NOT_HELD, INCONCLUSIVE]) == NOT_HELD and combine([]) == INCONCLUSIVE


def test_the_clock_is_the_one_that_varies_least_between_equal_runs():
    runs = _base() + [_run("lsw", 1024, s, 0.7, [0.6, 0.7]) for s in (0, 1)]
    for r, wall in zip(runs, (2.0, 6.0, 2.0, 6.0)):  # wall time disturbed, CPU time steady
        r["train_seconds"] = wall
    study = Study(_summaries(runs), Path("."), Path("."))
    assert study.clock()[0] == "cpu" and "wall time" in study.clock()[1]
    for r in runs:
        del r["train_cpu_seconds"]
    assert Study(_summaries(runs), Path("."), Path(".")).clock()[0] == "wall"


def test_page_and_headline_from_summaries_alone(tmp_path):
    runs = _base() + [_run(m, 1024, s, 0.7 + 0.01 * s, [0.6, 0.7]) for m in ("lsw", "as", "lena") for s in (0, 1)]
    runs.append(_run("as", 1024, 0, 0.7, [0.6, 0.7], phase="plateau"))  # a phase the page reads separately
    runs[-1].update(epochs=4)
    data = _summaries(runs)
    data["spec"]["models"] = [{"name": "mlp", "epoch_candidates": [2]}]
    data["plateau"] = {"mlp": {"epochs": 2, "rule_met": True, "pending": None, "min_epochs": 1, "metric": "val",
                               "tolerance": 0.003, "lr": 0.1, "candidates": [2], "min_updates": 100,
                               "largest_batch": 1024,
                               "checks": [{"epochs": 2, "accuracy": 0.9, "accuracy_2e": 0.901,
                                           "difference": 0.001, "seeds": 2, "passes": True}]}}
    path = tmp_path / "results" / "summaries.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    page = write_study_report(path, tmp_path / "docs" / "results.md").read_text()
    assert page.index("## Verdicts") < page.index("## Protocol") < page.index("## mlp: the epoch budget")
    assert "- **held**: LENA paper, mlp: lsw never reaches the target at the largest batch" in page
    assert "Budget: **E = 2 epochs**" in page and (tmp_path / "results" / "mlp-plateau.png").exists()
    assert (tmp_path / "results" / "mlp-iterations-to-target.png").exists()
    assert "## Time measurement" in page and "by the wall clock" in page  # equal spreads: wall time
    table = headline_table(path)
    assert table.splitlines()[0] == "Test accuracy (%) at B = 1024, mean over seeds (hand-made):"
    assert table.splitlines()[2] == "| | lsw | as | lena |"  # sgd has no run at 1024
    assert table.splitlines()[4] == "| mlp (target 90.0) | 70.5 | 70.5 | 70.5 |"
    assert "## Headline (the README's table)" in page and table in page


# -- committing ---------------------------------------------------------------------------------

def test_commits_are_time_based(tmp_path, monkeypatch):
    for key, value in (("GIT_AUTHOR_NAME", "t"), ("GIT_AUTHOR_EMAIL", "t@t"), ("GIT_COMMITTER_NAME", "t"),
                       ("GIT_COMMITTER_EMAIL", "t@t")):
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    spec = StudySpec.load(preset="paper-small", run_dir=str(tmp_path / "runs"), artifacts="results", out="page.md")
    now = [0.0]
    committer = Committer(spec, True, lambda line: None, every=20 * 60, clock=lambda: now[0])

    def commits() -> int:
        out = subprocess.run(["git", "log", "--oneline"], capture_output=True, text=True).stdout
        return len(out.splitlines())

    now[0] = 10 * 60
    committer.finished_run()
    assert commits() == 0 and (tmp_path / "results" / "summaries.json").exists()
    now[0] = 21 * 60
    committer.finished_run()
    assert commits() == 1
    (tmp_path / "results" / "extra.txt").write_text("x")  # something new to commit
    now[0] = 30 * 60
    committer.finished_run()  # 9 minutes after the last commit
    assert commits() == 1
    committer.commit("phase end")
    assert commits() == 2 and "phase end" in committer.commits[-1]


# -- the specification ------------------------------------------------------------------------------

def test_paper_v2_preset_states_the_protocol():
    spec = StudySpec.load(preset="paper-v2")
    assert spec.methods == ["sgd", "lsw", "sqrt", "as", "adascale", "lars-masked", "lamb", "clars", "lena", "lars"]
    mlp, lenet = spec.models
    assert mlp.epoch_candidates and min(mlp.epoch_candidates) == 34 and spec.batches_of(mlp)[-1] == 16384
    assert spec.seeds_of(mlp) == [0, 1, 2] and spec.batches_of(lenet)[-1] == 8192 and lenet.note
    assert min(lenet.epoch_candidates) == 17 and spec.grid_of("lars")[-1] >= 100 and spec.tune_extend > 0
    assert spec.ablation_batch_sizes(mlp) == [8192, 16384] and spec.ablation_batch_sizes(lenet) == [4096, 8192]
    assert spec.ablation_seeds_of(mlp) == [0] and "adascale" not in spec.ablation_methods
    assert spec.budget_hours == 16 and spec.commit_every_minutes <= 30
    # amendment 2: near-best rates on two seeds, the one-SE rule, rate / 3 on seed 0, the noise scale
    assert (spec.tune_seeds, spec.tune_rule, spec.sensitivity_seeds, spec.noise_scale) == (2, "one-se", [0], True)
    assert spec.grid_of("lars-masked") == spec.grid_of("lars") and len(spec.amendments) == 2
    assert StudySpec.load(preset="paper-small").models[0].epochs == 5  # the first study still regenerates


@pytest.mark.parametrize("change, message", [
    ({"models": [{"name": "mlp", "epochs": 2, "epoch_candidates": [2]}]}, "give exactly one of epochs and"),
    ({"models": [{"name": "mlp", "epoch_candidates": [2], "batches": [128, 512]}]}, "must be among the study's"),
    ({"models": [{"name": "mlp", "epochs": 2, "size": 3}]}, "unknown key(s) in a [[models]] entry: size"),
    ({"tune_grids": {"adam": [0.1]}}, "tune_grids names the family 'adam'"),
    ({"plateau_metric": "train"}, "plateau_metric 'train'"),
    ({"plateau_tolerance": 3}, "plateau_tolerance 3"),
    ({"ablation_seeds": [7]}, "ablation_seeds must be among the seeds"),
])
def test_bad_v2_specifications_are_refused_in_one_line(change, message):
    data = {"name": "x", "methods": ["sgd"], "batches": [128, 256], "seeds": [0], "tune_grid": [0.1],
            "models": [{"name": "mlp", "epochs": 1}], **change}
    with pytest.raises(ValueError) as error:
        StudySpec.from_dict(data)
    assert message in str(error.value) and "\n" not in str(error.value)


# -- the pipeline ----------------------------------------------------------------------------------

TINY_V2 = """
name = "tiny-v2"
methods = ["lsw", "as", "adascale", "lars", "clars", "lena"]
batches = [128, 256]
seeds = [0, 1]
tune_grid = [0.01, 0.1]
tune_grids = {{lars = [1.0, 3.0]}}
tune_extend = 1
plateau_lr = 0.1
plateau_tolerance = 0.99
min_updates = 3
adascale_cap = 2.0
ablation_methods = ["as", "lena"]
ablation_batches = [256]
ablation_seeds = [0]
train_limit = 512
test_limit = 200
val_size = 200
evals_per_epoch = 2
early_epochs = 1
layer_every = 1
layer_samples = 5
run_dir = "{root}/runs"
artifacts = "{root}/results"
out = "{root}/docs/results.md"
benchmarks = "{root}/none"

[[models]]
name = "mlp"
epoch_candidates = [1, 2]
"""


@needs_fashion_mnist
@pytest.mark.slow
def test_v2_pipeline_end_to_end_and_the_page_from_summaries_alone(tmp_path, capsys):
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_V2.format(root=tmp_path))
    assert main(["study", "--spec", str(spec)]) == 0
    out = capsys.readouterr().out
    assert out.index("Estimated wall time") < out.index("plateau mlp sgd batch 128 2 epochs seed 0")
    # 512 images at 256: 2 updates per epoch, 3 updates need 2 epochs: candidate 1 is not eligible
    assert "plateau mlp sgd batch 128 1 epochs" not in out and "E = 2" in out

    summaries = json.loads((tmp_path / "results" / "summaries.json").read_text())
    decision = summaries["plateau"]["mlp"]
    assert decision["epochs"] == 2 and decision["rule_met"] and decision["min_epochs"] == 2
    plateau = sorted((r["epochs"], r["seed"]) for r in summaries["runs"] if r["phase"] == "plateau")
    assert plateau == [(2, 0), (2, 1), (4, 0), (4, 1)]
    sweep = [r for r in summaries["runs"] if r["phase"] == "sweep"]
    assert {r["epochs"] for r in sweep} == {2} and len(sweep) == 6 * 2 * 2 + 2  # + the sgd baselines
    for family, entry in summaries["tuning"]["mlp"].items():
        assert entry["initial_grid"] == ([1.0, 3.0] if family == "lars" else [0.01, 0.1])
        assert len(entry["final_grid"]) >= len(entry["initial_grid"])
        assert entry["inside"] or len(entry["extended"]) == 1  # extended while at an end, once at most here
    stops = [r for r in sweep if r["method"] == "adascale"]
    assert all(r["stopped"] in ("t1", "cap") and r["epochs_used"] <= 4 for r in stops)
    assert all(r["steps"] == r["epochs"] * r["steps_per_epoch"] for r in sweep if r["method"] == "as")
    lena = next(r for r in sweep if r["method"] == "lena" and r["batch"] == 256 and r["seed"] == 0)
    assert lena["layer_series"]["quantity"] == "gains" and len(lena["layer_series"]["step"]) <= 5
    assert all("cpu" in r["evals"] and r["train_cpu_seconds"] > 0 for r in sweep)
    ablation = sorted((r["method"], r["warmup"]) for r in summaries["runs"] if r["phase"] == "ablation")
    assert ablation == [("as", "fixed"), ("as", "state-aware"), ("lena", "fixed"), ("lena", "none")]

    page = (tmp_path / "docs" / "results.md").read_text()
    for heading in ("## Verdicts", "## mlp: the epoch budget", "## mlp: base-rate tuning",
                    "## mlp: test accuracy, iterations and time to target", "## mlp: where each AdaScale run stopped",
                    "## mlp: LENA's per-layer gains", "## mlp: warm-up ablation", "## Time measurement"):
        assert heading in page

    # again: nothing trains; then the page from summaries.json alone, without the run directories
    assert main(["study", "--spec", str(spec)]) == 0
    assert ": training" not in capsys.readouterr().out
    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "docs" / "results.md").unlink()
    assert main(["study", "--spec", str(spec), "--report-only"]) == 0
    assert (tmp_path / "docs" / "results.md").read_text() == page


# -- amendments: a family's rate changes after runs finished ---------------------------------------

def _restored_study(tmp_path, clars_lr: float):
    """A paper-v2 study in tmp_path whose committed summaries hold CLARS and LARS sweep runs at rate 3."""
    spec = StudySpec.load(preset="paper-v2", run_dir=str(tmp_path / "runs"), artifacts=str(tmp_path / "results"),
                          out=str(tmp_path / "results.md"))
    runs = [dict(_run(method, batch, seed, 0.87 + 0.01 * seed, [0.8, 0.87]), base_lr=3.0, epochs=34,
                 run=f"{method}-b{batch}-s{seed}")
            for method in ("clars", "lars") for batch in (128, 16384) for seed in (0, 1)]
    runs.append(dict(_run("clars", 16384, 0, 0.85, [0.8, 0.85], phase="ablation", warmup="fixed"),
                     base_lr=3.0, epochs=34, run="clars-wfixed-b16384-s0"))
    data = {"spec": spec.to_dict(), "environment": {}, "tuning": {}, "runs": runs}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "summaries.json").write_text(json.dumps(data))
    assert restore_committed(spec, lambda line: None) == len(runs)
    sweep = sweep_spec(spec, spec.model("mlp"), 34)
    sweep.lrs.update(lars=3.0, clars=clars_lr)
    return spec, sweep


def test_a_finished_run_at_another_base_rate_is_not_taken_for_the_new_one(tmp_path):
    spec, sweep = _restored_study(tmp_path, clars_lr=30.0)
    assert get_method("clars").family == "clars" != get_method("lars").family  # one tuned rate each
    assert finished_differently(sweep.config("clars", 16384, 0)) == "base rate 3, not 30"
    assert finished_differently(sweep.config("lars", 16384, 0)) is None
    assert finished_differently(sweep.config("lamb", 16384, 0)) is None  # not run at all
    sweep.methods, sweep.batches, sweep.seeds, sweep.lrs = ["clars"], [128, 16384], [0, 1], {"clars": 30.0}
    refused = "finished as another run \\(base rate 3, not 30\\): move it away, or use another --run-dir"
    with pytest.raises(ValueError, match=refused):
        run_sweep(sweep, log=lambda line: None)
    assert not (Path(sweep.run_dir) / "sweep.json").exists()  # refused before writing anything


def test_superseded_runs_are_set_aside_kept_in_the_summaries_and_listed_on_the_page(tmp_path):
    spec, sweep = _restored_study(tmp_path, clars_lr=30.0)
    model_root = tmp_path / "runs" / "mlp"
    ablation = [ablation_config(sweep, r) for r in ablation_runs(spec, spec.model("mlp")) if r.same_as is None]
    configs = [sweep.config(m, b, s) for m in ("clars", "lars") for b in (128, 16384) for s in (0, 1)] + ablation
    lines = []
    assert set_aside_superseded(configs, model_root, lines.append) == 5  # 4 sweep runs and 1 ablation run
    assert all("base rate 3, not 30" in line for line in lines)
    assert not (model_root / "runs" / "clars-b128-s0").exists() and (model_root / "runs" / "lars-b128-s0").exists()
    assert (model_root / "superseded" / "ablation" / "runs" / "clars-wfixed-b16384-s0" / "summary.json").exists()
    assert set_aside_superseded(configs, model_root, lines.append) == 0  # nothing left to set aside

    collect(spec)
    data = json.loads((tmp_path / "results" / "summaries.json").read_text())
    superseded = sorted((r["superseded_phase"], r["run"]) for r in data["runs"] if r["phase"] == "superseded")
    assert superseded == [("ablation", "ablation/runs/clars-wfixed-b16384-s0"), ("sweep", "runs/clars-b128-s0"),
                          ("sweep", "runs/clars-b128-s1"), ("sweep", "runs/clars-b16384-s0"),
                          ("sweep", "runs/clars-b16384-s1")]
    assert sorted(r["run"] for r in data["runs"] if r["phase"] == "sweep") == [
        "lars-b128-s0", "lars-b128-s1", "lars-b16384-s0", "lars-b16384-s1"]

    # a new machine: the committed summaries bring the set-aside runs back where they were, unchanged
    shutil.rmtree(tmp_path / "runs")
    restore_committed(spec, lambda line: None)
    assert (model_root / "superseded" / "runs" / "clars-b128-s0" / "summary.json").exists()
    collect(spec)
    assert json.loads((tmp_path / "results" / "summaries.json").read_text())["runs"] == data["runs"]

    page = write_study_report(tmp_path / "results" / "summaries.json", tmp_path / "results.md").read_text()
    amendments = page[page.index("### Amendments to the protocol"):page.index("## mlp")]
    assert "1. CLARS tunes its own base rate" in amendments
    assert ("| mlp | sweep | clars | default | 3 | B = 128: 87.50 ± 0.71% (2); B = 16384: 87.50 ± 0.71% (2) "
            "| base rate 3, not 30 |") in amendments
    assert "lars-masked: lars-masked; lamb: lamb; clars: clars; lars: lars" in page


def test_summaries_written_before_clars_had_a_family_of_its_own_keep_their_caveats():
    spec = dict(StudySpec.load(preset="paper-small").to_dict(), models=[{"name": "mlp", "epochs": 1}])
    earlier = {"mlp": {"sgd": {"lr": 0.1, "grid": {"0.01": 0.8, "0.1": 0.9, "1": 0.1}},
                       "lars": {"lr": 10.0, "grid": {"0.1": 0.5, "1": 0.7, "10": 0.9}}}}
    table = method_table(StudySpec.load(preset="paper-small"))
    study = Study({"spec": spec, "methods": table, "tuning": earlier, "runs": []}, Path("."), Path("."))
    assert study.family_of("clars") == "lars"  # its runs carried the lars family's rate
    assert study.caveats("mlp", ("clars",)) == "the lars family's best rate is an end of its tuning grid"
    both = {"mlp": {**earlier["mlp"], "clars": {"lr": 30.0, "grid": {"3": 0.8, "30": 0.9, "300": 0.1}}}}
    study = Study({"spec": spec, "methods": table, "tuning": both, "runs": []}, Path("."), Path("."))
    assert study.family_of("clars") == "clars" and study.caveats("mlp", ("clars",)) == ""
