"""The study command end to end on a slice of Fashion-MNIST: run, resume, restore from the summaries, commit, and amendments that change a family's rate."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from _cli_data import needs_fashion_mnist
from _study_records import run_record, tiny_study

from largebatch.cli import main
from largebatch.report.study import write_study_report
from largebatch.study import (
    StudySpec,
    collect,
    restore_committed,
)
from largebatch.study.committer import Committer
from largebatch.study.phases import ablation_config, ablation_runs, sweep_spec
from largebatch.study.run import set_aside_superseded
from largebatch.train.methods import get_method
from largebatch.train.sweep import finished_differently, run_sweep

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- the study command ---------------------------------------------------------------------

TINY_SPEC = dict(name="tiny", methods=["lsw", "lena"], batches=[128, 256], seeds=[0], tune_grid=[0.01, 0.1],
                 ablation_methods=["lena"], ablation_batches=[256], evals_per_epoch=2)


@needs_fashion_mnist
def test_study_tunes_sweeps_ablates_writes_the_page_and_resumes(tmp_path, capsys):
    spec = tiny_study(tmp_path, [{"name": "mlp", "epochs": 1}], **TINY_SPEC)
    assert main(["study", "--spec", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "Estimated wall time" in out and "total" in out
    assert "tune sgd lr 0.01 at batch 128" in out and "tune sgd lr 0.1 at batch 128" in out
    assert "ablation lena --warmup none batch 256 seed 0: test accuracy" in out
    assert "ablation lena --warmup state-aware batch 256 seed 0: the sweep's lena run" in out

    summaries = json.loads((tmp_path / "results" / "summaries.json").read_text())
    phases = sorted((r["phase"], r["method"], r["warmup"], r["batch"]) for r in summaries["runs"])
    assert phases == [
        ("ablation", "lena", "fixed", 256), ("ablation", "lena", "none", 256),
        ("sweep", "lena", "default", 128), ("sweep", "lena", "default", 256),
        ("sweep", "lsw", "default", 128), ("sweep", "lsw", "default", 256), ("sweep", "sgd", "default", 128),
        ("tune", "sgd", "default", 128), ("tune", "sgd", "default", 128),
    ]
    assert set(summaries["tuning"]["mlp"]["sgd"]["grid"]) == {"0.01", "0.1"}
    lena = next(r for r in summaries["runs"] if r["method"] == "lena" and r["batch"] == 256 and r["phase"] == "sweep")
    assert lena["warmup_ends"] and lena["evals"]["step"] == [1, 2]  # 2 steps per epoch, checked twice
    assert (tmp_path / "results" / "summaries.json").stat().st_size < 50_000

    page = (tmp_path / "docs" / "results.md").read_text()
    for heading in ("## Verdicts", "## Protocol", "## mlp: test accuracy, iterations and time to target",
                    "## mlp: warm-up ablation", "## Measured overheads", "## Regenerating"):
        assert heading in page
    assert "| method | B = 128 | B = 256 |" in page and "| lena |" in page
    assert "| method | B = 256, none | B = 256, fixed | B = 256, state-aware |" in page
    assert "starting grid 0.01, 0.1." in page and "| sgd | 0.01: " in page
    assert "(../results/mlp-warmup-ends.png)" in page and (tmp_path / "results" / "mlp-warmup-ends.png").exists()
    assert f"largebatch study --spec {spec} --report-only" in page

    # Again: nothing is trained, the page is rewritten the same way.
    before = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("summary.json")}
    assert main(["study", "--spec", str(spec)]) == 0
    again = capsys.readouterr().out
    assert "test accuracy" not in again.replace("finished, skipped", "")
    assert again.count("finished, skipped") == 5 + 2  # sweep runs + trained ablation runs
    assert {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("summary.json")} == before
    assert (tmp_path / "docs" / "results.md").read_text() == page

    # The page from the summaries alone, without the run directories.
    import shutil

    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "docs" / "results.md").unlink()
    assert main(["study", "--spec", str(spec), "--report-only"]) == 0
    assert (tmp_path / "docs" / "results.md").read_text() == page

    # A new machine: only the committed summaries are there. Every finished run
    # is restored from them, none is trained again, and they come out the same.
    assert main(["study", "--spec", str(spec)]) == 0
    restored = capsys.readouterr().out
    assert "restored 9 finished runs" in restored
    assert "test accuracy" not in restored.replace("finished, skipped", "")
    assert json.loads((tmp_path / "results" / "summaries.json").read_text())["runs"] == summaries["runs"]
    assert (tmp_path / "docs" / "results.md").read_text() == page


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


# -- the pipeline ----------------------------------------------------------------------------------

TINY_V2 = dict(name="tiny-v2", methods=["lsw", "as", "adascale", "lars", "clars", "lena"], batches=[128, 256],
               seeds=[0, 1], tune_grid=[0.01, 0.1], tune_grids={"lars": [1.0, 3.0]}, tune_extend=1, plateau_lr=0.1,
               plateau_tolerance=0.99, min_updates=3, adascale_cap=2.0, ablation_methods=["as", "lena"],
               ablation_batches=[256], ablation_seeds=[0], evals_per_epoch=2, layer_samples=5)


@needs_fashion_mnist
@pytest.mark.slow
def test_v2_pipeline_end_to_end_and_the_page_from_summaries_alone(tmp_path, capsys):
    spec = tiny_study(tmp_path, [{"name": "mlp", "epoch_candidates": [1, 2]}], **TINY_V2,
                      benchmarks=str(tmp_path / "none"))
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
    runs = [dict(run_record(method, batch, seed, 0.87 + 0.01 * seed, [0.8, 0.87]), base_lr=3.0, epochs=34,
                 run=f"{method}-b{batch}-s{seed}")
            for method in ("clars", "lars") for batch in (128, 16384) for seed in (0, 1)]
    runs.append(dict(run_record("clars", 16384, 0, 0.85, [0.8, 0.85], phase="ablation", warmup="fixed"),
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
