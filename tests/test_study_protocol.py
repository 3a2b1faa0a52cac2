"""The study's rules and specification: the budget rule, tuning with grid extension, the presets, bad specifications."""

from __future__ import annotations

import math

import pytest

from largebatch.cli import main
from largebatch.study import (
    StudySpec,
    choose_epochs,
    min_epochs_for_updates,
    next_rate,
    tune_with_extension,
)

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
    assert spec.grid_of("lars-masked") == spec.grid_of("lars") and len(spec.amendments) == 3
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


def test_study_refuses_a_bad_specification(tmp_path, capsys):
    spec = tmp_path / "bad.toml"
    spec.write_text('name = "x"\nmethods = ["sgd"]\nbatches = [128]\nseeds = [0]\ntune_grid = [0.1]\n'
                    'models = [{name = "mlp", epochs = 1}]\nbatch_sizes = [1]\n')
    assert main(["study", "--spec", str(spec), "--estimate-only"]) == 2
    assert "unknown key(s) in the study specification: batch_sizes" in capsys.readouterr().err
    assert main(["study", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
