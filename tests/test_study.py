"""Warm-up modes for every method, and the study command end to end on a slice of Fashion-MNIST."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from _cli_data import needs_fashion_mnist
from torch import nn

from largebatch.cli import main
from largebatch.train.config import TrainConfig
from largebatch.train.methods import RunShape, build, get_method, state_aware_theta, warmup_mode, warmup_steps

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


# -- the study command ---------------------------------------------------------------------

TINY_SPEC = """
name = "tiny"
methods = ["lsw", "lena"]
batches = [128, 256]
seeds = [0]
tune_grid = [0.01, 0.1]
ablation_methods = ["lena"]
ablation_batches = [256]
train_limit = 512
test_limit = 200
val_size = 200
evals_per_epoch = 2
early_epochs = 1
layer_every = 1
run_dir = "{root}/runs"
artifacts = "{root}/results"
out = "{root}/docs/results.md"
benchmarks = "{benchmarks}"

[[models]]
name = "mlp"
epochs = 1
"""


@needs_fashion_mnist
def test_study_tunes_sweeps_ablates_writes_the_page_and_resumes(tmp_path, capsys):
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_SPEC.format(root=tmp_path, benchmarks=benchmarks))
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


def test_study_refuses_a_bad_specification(tmp_path, capsys):
    spec = tmp_path / "bad.toml"
    spec.write_text('name = "x"\nmethods = ["sgd"]\nbatches = [128]\nseeds = [0]\ntune_grid = [0.1]\n'
                    'models = [{name = "mlp", epochs = 1}]\nbatch_sizes = [1]\n')
    assert main(["study", "--spec", str(spec), "--estimate-only"]) == 2
    assert "unknown key(s) in the study specification: batch_sizes" in capsys.readouterr().err
    assert main(["study", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


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
