"""The benchmark scripts run and write what their READMEs promise (smallest configurations; nothing is timed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from _dist import run_command

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def optimizer_step():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import optimizer_step

        yield optimizer_step
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_each_optimiser_of_a_comparison_steps_its_own_parameters(optimizer_step, monkeypatch):
    """The contender and its reference never share parameters, gradients or state."""
    built = []
    original = optimizer_step.build
    monkeypatch.setattr(optimizer_step, "build", lambda name, params: built.append(original(name, params)) or built[-1])
    result = optimizer_step.measure_pair("tiny", "lamb/adamw", pairs=2, warmup=1, threads=None, steady=False)
    contender, reference = built
    assert (type(contender).__name__, type(reference).__name__) == ("LAMB", "AdamW")
    ids = [{id(p) for g in opt.param_groups for p in g["params"]} for opt in built]
    assert ids[0] and not ids[0] & ids[1]
    grads = [{id(p.grad) for g in opt.param_groups for p in g["params"]} for opt in built]
    assert not grads[0] & grads[1]
    assert len(result["paired_ms"]["contender"]) == len(result["paired_ms"]["reference"]) == 2


def test_the_smallest_configuration_writes_paired_ratios_threads_and_load(tmp_path):
    out = tmp_path / "optimizer_step.json"
    done = run_command(
        [sys.executable, str(BENCHMARKS / "optimizer_step.py"), "--lists", "tiny", "--pairs", "3",
         "--fused-lists", "", "--comparisons", "lars/sgd,lars_loop/lars", "--output", str(out)],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["pairs"] == 3 and results["threads"] >= 1 and "fresh process" in results["methodology"]
    assert set(results["load_average"]) == {"before", "after"}
    # the machine is named: ratios move with the CPU and the kernels ATen dispatches to
    assert results["cpu"] and results["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert results["torch"] == torch.__version__ and results["cpu_count"] >= 1
    tiny = results["lists"]["tiny"]
    assert tiny["tensors"] == len(tiny["shapes"]) == 16
    assert list(tiny["comparisons"]) == ["lars/sgd", "lars_loop/lars"]
    lars = tiny["comparisons"]["lars/sgd"]
    assert (lars["contender"], lars["reference"], lars["target"]) == ("lars", "sgd", "<= 1.2")
    assert lars["pairs"] == 3 and len(lars["paired_ms"]["contender"]) == 3 and lars["threads"] >= 1
    low, high = lars["ratio_quartiles"]
    assert lars["ratio_min_max"][0] <= low <= lars["ratio_median"] <= high <= lars["ratio_min_max"][1]
    assert len(lars["load_average"]["before"]) == len(lars["load_average"]["after"]) == 3
    assert lars["malloc"] == "glibc default" and "compile_seconds" not in lars
    assert "lars/sgd" in done.stdout and "wrote" in done.stdout


def test_an_unknown_comparison_is_refused(optimizer_step):
    with pytest.raises(SystemExit):
        optimizer_step.parse_args(["--comparisons", "lars/adamw"])


@pytest.mark.distributed
def test_statistics_overhead_smallest_configuration_writes_every_python_path_row(tmp_path):
    """grad_stats_ddp.py: one process and 2-process DDP, the MLP only, a few pairs."""
    out = tmp_path / "grad_stats_ddp.json"
    done = run_command(
        [sys.executable, str(BENCHMARKS / "grad_stats_ddp.py"), "--models", "mlp", "--steps", "3",
         "--ddp-steps", "3", "--output", str(out)],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["single_process_accumulation"]) == ["mlp/applied_norm=backward", "mlp/applied_norm=summary"]
    assert list(report["ddp_gloo_2_processes"]) == ["mlp/python_comm_hook", "mlp/extra_all_reduce", "mlp/worker", "mlp/micro_batch"]
    assert set(report["load_average"]) == {"before", "after"} and report["threads_per_process"] == 1
    assert report["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    worker = report["ddp_gloo_2_processes"]["mlp/worker"]
    assert worker["steps"] == 3 and worker["target"] == "<= 1.10" and worker["micro_batches_per_worker"] == 1
    for rows in (report["single_process_accumulation"], report["ddp_gloo_2_processes"]):
        for row in rows.values():
            assert not any("native" in key for key in row)
            assert {"reference_ms", "engine_ms", "ratio_median", "ratio_quartiles", "cpu_ratio_median"} <= set(row)


def test_example_statistics_smallest_configuration_writes_its_ratios(tmp_path):
    """example_statistics.py: LENA with example against micro-batch statistics, one model, one batch, 2 rounds."""
    out = tmp_path / "example_statistics.json"
    done = run_command(
        [sys.executable, str(BENCHMARKS / "example_statistics.py"), "--models", "mlp", "--batches", "256",
         "--rounds", "2", "--threads", "1", "--output", str(out)],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["load_average"]) == {"before", "after"} and report["threads"] == 1
    (row,) = report["rows"]
    assert (row["model"], row["batch"], row["rounds"]) == ("mlp", 256, 2)
    assert row["micro_batches"] == {"example": 1, "micro_batch": 2, "plain_one": 1, "plain_split": 2}
    assert list(row["round_ratios"]) == ["example/micro_batch", "example/plain_one", "micro_batch/plain_split"]
    assert "example/micro_batch" in done.stdout and "wrote" in done.stdout


def test_lena_example_statistics_driver_trains_and_tabulates(tmp_path):
    """lena_example_statistics.py on a slice of Fashion-MNIST: every variant, the table and the JSON."""
    from _cli_data import FASHION_MNIST

    if FASHION_MNIST is None:
        pytest.skip("Fashion-MNIST idx files not installed")
    out = tmp_path / "lena.json"
    done = run_command(
        [sys.executable, str(BENCHMARKS / "lena_example_statistics.py"), "--run-dir", str(tmp_path / "runs"),
         "--epochs", "1", "--batches", "256", "--seeds", "0", "--single-sample", "--train-limit", "1024",
         "--test-limit", "300", "--val-size", "300", "--threads", "1", "--output", str(out)],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    labels = [(r["label"], r["statistics"], r["micro_batch"]) for r in report["runs"]]
    assert labels == [("baseline", "micro_batch", 128), ("example", "example", 256),
                      ("micro_batch", "micro_batch", 128), ("single_sample", "micro_batch", 256)]
    assert report["table"] in done.stdout and report["table"].count("\n| 256 |") == 3
