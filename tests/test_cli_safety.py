"""The command line never loses or overwrites a run: refusals, interruptions, damaged checkpoints, divergence,
bad input in one line, machine settings recorded (small slices of real Fashion-MNIST)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cli_data import SLICE, needs_fashion_mnist

from largebatch.cli import build_parser, main
from largebatch.train.faults import SIGNAL_AT_STEP_ENV

pytestmark = needs_fashion_mnist


def train_args(run_dir: Path, *extra: str, method: str = "lsw", batch: str = "256", epochs: str = "2") -> list[str]:
    # 1,024 images / 256 = 4 steps per epoch
    return ["train", "--method", method, "--model", "mlp", "--batch", batch, "--micro-batch", "128",
            "--epochs", epochs, "--seed", "1", "--run-dir", str(run_dir), *SLICE, *extra]


def records(path: Path, kind: str | None = None) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in lines if kind is None or r.get("kind") == kind]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def one_error_line(err: str, *needles: str) -> None:
    assert err.startswith("largebatch: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_train_refuses_a_directory_that_holds_a_run_unless_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, "--max-steps", "2")) == 0
    capsys.readouterr()
    partial = snapshot(run)
    assert main(train_args(run)) == 2
    one_error_line(capsys.readouterr().err, "already holds a run", "--resume", "--overwrite")
    assert snapshot(run) == partial  # nothing replaced

    assert main(train_args(run, "--resume")) == 0
    capsys.readouterr()
    finished = snapshot(run)
    assert main(train_args(run, "--lr", "0.01")) == 2
    one_error_line(capsys.readouterr().err, "finished after 8 steps")
    assert snapshot(run) == finished

    assert main(train_args(run, "--overwrite", "--max-steps", "1")) == 0
    capsys.readouterr()
    assert [r["step"] for r in records(run / "metrics.jsonl", "step")] == [1]  # replaced, as asked
    assert not (run / "summary.json").exists()
    assert main(train_args(run, "--overwrite", "--resume")) == 2
    one_error_line(capsys.readouterr().err, "--resume and --overwrite")


def test_resume_with_nothing_to_resume_says_so_and_starts_at_step_0(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, "--resume", "--max-steps", "1", epochs="1")) == 0
    err = capsys.readouterr().err
    assert f"nothing to resume in {run} (no checkpoint.pt): starting at step 0" in err
    assert "stopped at step 1 of 4 (--max-steps 1)" in err and "--resume" in err


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "not a checkpoint"])
def test_resume_from_a_damaged_checkpoint_gives_one_line_and_touches_nothing(damage, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, "--max-steps", "2")) == 0
    capsys.readouterr()
    path = run / "checkpoint.pt"
    whole = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": whole[: len(whole) // 2], "garbage": os.urandom(4096),
                      "not a checkpoint": b""}[damage])
    if damage == "not a checkpoint":
        torch.save({"weights": torch.zeros(2)}, path)
    before = snapshot(run)
    assert main(train_args(run, "--resume")) == 2
    one_error_line(capsys.readouterr().err, str(path), "nothing was changed", "--overwrite")
    assert snapshot(run) == before


@pytest.mark.parametrize("signame", ["INT", "TERM"])
def test_a_signal_writes_a_checkpoint_at_the_current_step_and_resume_is_exact(signame, tmp_path, capsys,
                                                                                 monkeypatch):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    handler = signal.getsignal(signal.SIGINT)  # the default, or ignored in a job started in the background
    assert main(train_args(whole, "--checkpoint-every", "0")) == 0
    monkeypatch.setenv(SIGNAL_AT_STEP_ENV, f"3:{signame}")
    code = main(train_args(stopped, "--checkpoint-every", "0"))
    err = capsys.readouterr().err
    sig = getattr(signal, f"SIG{signame}")
    assert code == 128 + sig, err
    assert f"SIG{signame} at step 3: checkpoint written to {stopped / 'checkpoint.pt'}; continue with --resume" in err
    assert torch.load(stopped / "checkpoint.pt", weights_only=False)["position"]["step"] == 3
    assert not (stopped / "summary.json").exists()
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored
    monkeypatch.delenv(SIGNAL_AT_STEP_ENV)

    assert main(train_args(stopped, "--checkpoint-every", "0", "--resume")) == 0
    assert "resuming" in capsys.readouterr().err
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False)["model"] for d in (whole, stopped))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)

    def without_clock(path):
        return [{k: v for k, v in r.items() if k not in ("train_seconds", "train_cpu_seconds", "load")}
                for r in records(path)]

    assert without_clock(stopped / "metrics.jsonl") == without_clock(whole / "metrics.jsonl")


def test_sigterm_from_outside_a_process_leaves_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "largebatch.cli", *train_args(run)],
        env={**os.environ, SIGNAL_AT_STEP_ENV: "2:TERM"}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "SIGTERM at step 2" in done.stderr and "Traceback" not in done.stderr
    assert torch.load(run / "checkpoint.pt", weights_only=False)["position"]["step"] == 2


def test_checkpoints_are_periodic_by_default():
    args = build_parser().parse_args(["train", "--method", "sgd", "--batch", "128", "--run-dir", "x"])
    assert args.checkpoint_every == 100
    from largebatch.train.config import TrainConfig

    assert TrainConfig().checkpoint_every == 100


def test_a_diverged_run_stops_and_says_where(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, "--lr", "1000", method="sgd", epochs="3")) == 1
    err = capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    k = summary["diverged_at_step"]
    assert k is not None and summary["steps"] == k < 12  # stopped, not 12 steps of NaN
    assert f"diverged at step {k}" in err
    steps = records(run / "metrics.jsonl", "step")
    assert [r["step"] for r in steps] == list(range(1, k + 1))
    assert not all(map(lambda r: abs(r["loss"]) < float("inf"), steps))
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert f"diverged at step {k}" in report
    assert main(train_args(run, "--lr", "1000", method="sgd", epochs="3")) == 2
    assert f"already holds a run (diverged at step {k})" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--max-steps", "0"], "--max-steps must be a positive integer, got 0"),
        (["--test-limit", "0"], "--test-limit must be a positive integer, got 0"),
        (["--train-limit", "0"], "--train-limit must be a positive integer, got 0"),
        (["--lr", "inf"], "--lr must be a positive finite number, got inf"),
        (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
        (["--val-size", "-5"], "--val-size must be >= 0, got -5"),
        (["--threads", "0"], "--threads must be a positive integer, got 0"),
        (["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
        (["--device", "cuda:7"], "--device cuda:7"),
        (["--layer-every", "0"], "--layer-every must be a positive integer"),
    ],
)
def test_bad_settings_give_one_line_naming_the_flag_and_leave_no_directory(extra, needle, tmp_path, capsys):
    if extra[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    run = tmp_path / "new" / "run"
    assert main(train_args(run, *extra)) == 2
    one_error_line(capsys.readouterr().err, needle)
    assert not (tmp_path / "new").exists()


def test_a_run_that_fails_after_creating_its_directory_leaves_none(tmp_path, capsys):
    run = tmp_path / "new" / "run"
    assert main(train_args(run, "--data-dir", str(tmp_path))) == 2  # no idx files there
    one_error_line(capsys.readouterr().err, "idx files not found")
    assert not (tmp_path / "new").exists()


def test_max_steps_says_it_stopped(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, "--max-steps", "3")) == 0
    captured = capsys.readouterr()
    assert f"stopped at step 3 of 8 (--max-steps 3); checkpoint in {run}, continue with --resume" in captured.err
    assert "test accuracy" not in captured.out


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`largebatch advise ... | head`: the reader goes away; no BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)  # every write now fails with EPIPE, as after `head` exits
    try:
        done = subprocess.run(
            [sys.executable, "-m", "largebatch.cli", "advise", "--batch", "256", "--micro-batch", "128", "--steps",
             "1", "--train-limit", "512"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
        )
    finally:
        os.close(write)
    assert done.returncode == 0, done.stderr
    assert "BrokenPipeError" not in done.stderr and "Traceback" not in done.stderr and "Exception" not in done.stderr


def test_threads_load_and_machine_are_recorded(tmp_path):
    run = tmp_path / "run"
    before = torch.get_num_threads()
    assert main(train_args(run, "--threads", "1", "--device", "cpu", epochs="1")) == 0
    assert torch.get_num_threads() == before  # restored for the caller
    config = json.loads((run / "config.json").read_text())
    assert config["threads"] == 1 and config["device"] == "cpu" and config["precision"] == "fp32"
    machine = json.loads((run / "summary.json").read_text())["machine"]
    assert machine["threads"] == 1 and machine["device"] == "cpu" and machine["cores_available"] >= 1
    if hasattr(os, "getloadavg"):
        assert len(machine["load_average_start"]) == 3 and len(machine["load_average_end"]) == 3
    from largebatch.train.runner import run_threads

    assert run_threads() == len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_in_one_line(tmp_path, capsys):
    assert main(train_args(tmp_path / "run", "--device", "cuda")) == 2
    one_error_line(capsys.readouterr().err, "--device cuda: CUDA is not available here")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_and_resumes_exactly(precision, tmp_path, capsys, monkeypatch):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main(train_args(whole, "--precision", precision, "--checkpoint-every", "0", epochs="1")) == 0
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["machine"]["precision"] == precision and 0.3 < summary["final_test_accuracy"] <= 1
    steps = records(whole / "metrics.jsonl", "step")
    assert all(("loss_scale" in r) == (precision == "fp16") for r in steps)
    monkeypatch.setenv(SIGNAL_AT_STEP_ENV, "2")
    assert main(train_args(stopped, "--precision", precision, "--checkpoint-every", "0", epochs="1")) == 130
    monkeypatch.delenv(SIGNAL_AT_STEP_ENV)
    if precision == "fp16":
        assert torch.load(stopped / "checkpoint.pt", weights_only=False)["scaler"]["scale"] > 0
    # the precision is part of the run: resuming in another one is refused
    assert main(train_args(stopped, "--resume", epochs="1")) == 2
    assert "different run" in capsys.readouterr().err
    assert main(train_args(stopped, "--precision", precision, "--checkpoint-every", "0", "--resume",
                           epochs="1")) == 0
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False)["model"] for d in (whole, stopped))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_sweep_shows_run_k_of_n_and_the_time_left(tmp_path, capsys):
    root = tmp_path / "sweep"
    argv = ["sweep", "--methods", "lsw", "--batches", "256", "--epochs", "1", "--lr", "0.05", "--threads", "1",
            "--precision", "bf16", "--run-dir", str(root), *SLICE]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "run 1 of 2: sgd batch 128 seed 0: training (2 to train; the time left is estimated after the first)" in out
    assert "run 2 of 2: lsw batch 256 seed 0: training (1 to train, about " in out and " per run)" in out
    config = json.loads((root / "runs" / "lsw-b256-s0" / "config.json").read_text())
    assert config["precision"] == "bf16" and config["threads"] == 1
    assert main(argv) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 2


def test_study_takes_device_precision_and_threads():
    from largebatch.study import StudySpec
    from largebatch.study.phases import template

    spec = StudySpec.load(preset="paper-small", precision="bf16", device="cpu", threads=1)
    config = template(spec, spec.models[0])
    assert (config.precision, config.device, config.threads) == ("bf16", "cpu", 1)
    args = build_parser().parse_args(["study", "--preset", "paper-small", "--precision", "fp16", "--device", "cpu",
                                      "--threads", "2", "--estimate-only"])
    assert (args.precision, args.device, args.threads) == ("fp16", "cpu", 2)
    with pytest.raises(ValueError, match="precision 'fp8'"):
        StudySpec.load(preset="paper-small", precision="fp8")


@pytest.mark.parametrize("method", ["lena", "adascale", "clars"])
def test_fp16_statistics_methods_see_the_loss_scale(method, tmp_path):
    """With a GradScaler the statistics carry S^2: the engine must know the scaler, or the gains are off."""
    from largebatch.train.config import TrainConfig
    from largebatch.train.distributed import Context
    from largebatch.train.parts import build_parts
    from largebatch.train.runner import load_data

    config = TrainConfig(method=method, batch=256, epochs=1, run_dir=str(tmp_path / "run"), precision="fp16",
                         train_limit=1024, test_limit=500, val_size=500, progress=False)
    parts = build_parts(config, load_data(config), Context())
    assert parts.scaler is not None and parts.optimizer.stats.grad_scaler is parts.scaler


def test_training_flushes_denormals_and_restores_the_setting(tmp_path, monkeypatch):
    # Weights decayed into denormal floats made a CPU run 15x slower; a run flushes
    # them to zero while it trains and leaves the process's setting as it found it.
    from largebatch.train import runner

    calls, real_flush = [], torch.set_flush_denormal
    monkeypatch.setattr(runner.torch, "set_flush_denormal", lambda on: calls.append(on) or real_flush(on))
    assert main(train_args(tmp_path / "run", "--max-steps", "1")) == 0
    # the command line before torch's worker threads start, train() for its thread, then both cleared
    assert calls == [True, True, False, False]
    x = torch.tensor([1e-39], dtype=torch.float32)  # a denormal: kept again after the run
    assert (x * 1.0).item() != 0.0
