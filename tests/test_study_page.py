"""The results page from the summaries alone: the verdicts, the clock, the tuning table and caveats, the headline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _study_records import run_record

from largebatch.report.study import Study, headline_table, write_study_report
from largebatch.report.verdicts import (
    HELD,
    INCONCLUSIVE,
    NOT_HELD,
    combine,
    compare,
    verdicts,
)
from largebatch.study import (
    StudySpec,
)
from largebatch.study.records import method_table

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- verdicts -----------------------------------------------------------------------------------

def _summaries(runs, methods=("sgd", "lsw", "as", "lena")):
    spec = {"name": "hand-made", "dataset": "fashion-mnist", "split_seed": 0, "val_size": 100, "base_batch": 128,
            "micro_batch": 128, "batches": [128, 1024], "seeds": [0, 1], "methods": list(methods),
            "models": [{"name": "mlp", "epochs": 2}], "tune_grid": [0.1], "evals_per_epoch": 2,
            "ablation_methods": [], "benchmarks": "/nonexistent"}
    return {"spec": spec, "environment": {}, "tuning": {}, "runs": runs}


def _base():
    return [run_record("sgd", 128, s, 0.90, [0.85, 0.90]) for s in (0, 1)]


def verdict(data, claim_part):
    found = [v for v in verdicts(Study(data, Path("."), Path("."))) if claim_part in v.claim]
    assert len(found) == 1, [v.claim for v in verdicts(Study(data, Path("."), Path(".")))]
    return found[0]


def test_verdicts_are_computed_from_the_summaries():
    reaches = [run_record("lena", 1024, s, 0.91, [0.80, 0.905]) for s in (0, 1)]
    never = [run_record(m, 1024, s, 0.70, [0.60, 0.70]) for m in ("lsw", "as") for s in (0, 1)]
    data = _summaries(_base() + reaches + never)
    v = verdict(data, "lena reaches")
    assert v.status == HELD and "B = 1024: 2/2 seeds" in v.numbers
    v = verdict(data, "fewer iterations to target than lsw")
    assert v.status == HELD and "2 vs never" in v.numbers
    assert verdict(data, "as never reaches").status == HELD

    missed = [run_record("lena", 1024, s, 0.70, [0.60, 0.70]) for s in (0, 1)]
    data = _summaries(_base() + missed + never)
    assert verdict(data, "lena reaches").status == NOT_HELD
    assert verdict(data, "fewer iterations to target than as").numbers.endswith("neither reaches the target.")
    assert verdict(data, "fewer iterations to target than as").status == INCONCLUSIVE

    half = [run_record("lena", 1024, 0, 0.91, [0.80, 0.905]), run_record("lena", 1024, 1, 0.70, [0.60, 0.70])]
    reached_by_as = [run_record("as", 1024, s, 0.91, [0.91, 0.91]) for s in (0, 1)]
    data = _summaries(_base() + half + reached_by_as)
    assert verdict(data, "lena reaches").status == INCONCLUSIVE
    assert verdict(data, "as never reaches").status == NOT_HELD
    assert verdict(data, "fewer iterations to target than as").status == INCONCLUSIVE  # one seed of two
    data = _summaries(_base() + missed + reached_by_as)
    v = verdict(data, "fewer iterations to target than as")
    assert v.status == NOT_HELD and "never vs 1 (did not hold)" in v.numbers


def test_fewer_iterations_is_not_held_up_by_batches_neither_method_reached():
    """Faster at 1K but neither reaches the target at 2K: the claim "at every large batch" is undecided."""
    faster = [run_record("lena", 1024, s, 0.91, [0.80, 0.905]) for s in (0, 1)]
    slower = [run_record("lsw", 1024, s, 0.91, [0.80, 0.85, 0.905]) for s in (0, 1)]
    neither = [run_record(m, 2048, s, 0.70, [0.60, 0.70]) for m in ("lena", "lsw") for s in (0, 1)]
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
    runs = _base() + [run_record("lsw", 1024, s, 0.7, [0.6, 0.7]) for s in (0, 1)]
    for r, wall in zip(runs, (2.0, 6.0, 2.0, 6.0)):  # wall time disturbed, CPU time steady
        r["train_seconds"] = wall
    study = Study(_summaries(runs), Path("."), Path("."))
    assert study.clock()[0] == "cpu" and "wall time" in study.clock()[1]
    for r in runs:
        del r["train_cpu_seconds"]
    assert Study(_summaries(runs), Path("."), Path(".")).clock()[0] == "wall"


def test_page_and_headline_from_summaries_alone(tmp_path):
    runs = _base() + [run_record(m, 1024, s, 0.7 + 0.01 * s, [0.6, 0.7]) for m in ("lsw", "as", "lena") for s in (0, 1)]
    runs.append(run_record("as", 1024, 0, 0.7, [0.6, 0.7], phase="plateau"))  # a phase the page reads separately
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


def _timing_study(sgd_seconds):
    """Sweep records of equal step counts: lsw and lena at 1 s and 1.05 s per update, sgd as given."""
    spec = {"name": "t", "models": [{"name": "mlp", "epochs": 1}], "base_batch": 128,
            "batches": [128, 1024], "methods": ["sgd", "lsw", "lena"]}
    runs = [{"model": "mlp", "phase": "sweep", "method": m, "batch": 1024, "seed": 0, "steps": 10,
             "train_seconds": 10 * t} for m, t in (("sgd", sgd_seconds), ("lsw", 1.0), ("lena", 1.05))]
    from largebatch.report.study import Study

    return Study({"spec": spec, "runs": runs}, Path("."), Path("."))


def test_time_per_update_claim_is_judged_only_on_undisturbed_times():
    from largebatch.report.study_page import throughput_section
    from largebatch.report.verdicts import lena_throughput

    quiet = lena_throughput(_timing_study(sgd_seconds=1.02), "mlp")
    assert quiet.status == "held" and quiet.numbers == (
        "Measured +5.0% (wall time per update, mean over the large batches) (held: at most 7.5% slower).")
    # sgd and lsw do the same work per update: 1.3x between them means the machine was busy
    busy = _timing_study(sgd_seconds=1.3)
    lines = throughput_section(busy, "mlp")
    assert any("load moved these times" in line and "1.30" in line for line in lines)
    assert lena_throughput(busy, "mlp").status == "inconclusive"


def test_a_tuned_rate_at_the_end_of_its_grid_is_flagged():
    from largebatch.study import StudySpec
    from largebatch.study.records import method_table

    spec = dict(StudySpec.load(preset="paper-small").to_dict(), models=[{"name": "mlp", "epochs": 1}])
    table = method_table(StudySpec.load(preset="paper-small"))
    tuning = {"mlp": {"sgd": {"lr": 1.0, "grid": {"0.1": 0.8, "1": 0.9, "10": 0.1}},
                      "lars": {"lr": 10.0, "grid": {"0.1": 0.5, "1": 0.7, "10": 0.9}}}}
    from largebatch.report.study import Study

    study = Study({"spec": spec, "methods": table, "tuning": tuning, "runs": []}, Path("."), Path("."))
    from largebatch.report.study_page import tuning_section

    lines = tuning_section(study, "mlp")
    assert [line.split(" | ")[0] for line in lines if "**no**" in line] == ["| lars"]
    assert study.caveats("mlp", ("clars", "lena")) == "the lars family's best rate is an end of its tuning grid"
    assert study.caveats("mlp", ("lena", "lsw")) == ""


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
