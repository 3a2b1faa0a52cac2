"""End-to-end command-line runs on a small slice of real Fashion-MNIST."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli_data import SLICE, needs_fashion_mnist
from _dist import run_command
from matplotlib.image import imread

from largebatch.cli import main
from largebatch.train.faults import CRASH_AT_STEP_ENV

pytestmark = needs_fashion_mnist


def records(path: Path, kind: str | None = None) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in lines if kind is None or r.get("kind") == kind]


def train_args(run_dir: Path, *extra: str, method: str = "lsw", batch: str = "256") -> list[str]:
    return ["train", "--method", method, "--model", "mlp", "--batch", batch, "--micro-batch", "128",
            "--epochs", "2", "--seed", "1", "--run-dir", str(run_dir), *SLICE, *extra]


def test_train_writes_config_metrics_layers_summary_and_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, "--eval-every", "2", "--layer-every", "1")) == 0
    assert "test accuracy" in capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 1 and config["torch_version"] == torch.__version__
    assert "parameter tensor" in config["layer"] and config["micro_batches_per_rank"] == 2
    assert config["method"]["peak_lr"] == pytest.approx(2 * config["method"]["base_lr"])
    steps = records(run / "metrics.jsonl", "step")
    assert [r["step"] for r in steps] == list(range(1, 9))  # 1024 images / 256 = 4 steps x 2 epochs
    evals = records(run / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [2, 4, 6, 8] and all("val_accuracy" in e for e in evals[1::2])
    layers = records(run / "layers.jsonl")
    assert len(layers) == 8 and set(layers[0]["effective_lr"]) == {n for n in config["layers"]}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and 0.3 < summary["final_test_accuracy"] <= 1
    assert (run / "checkpoint.pt").exists()


def test_resume_after_a_crash_gives_the_same_final_metrics(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert main(train_args(whole, "--checkpoint-every", "3")) == 0
    # The crash must kill a real process: run the first attempt as a subprocess.
    crashed = run_command(
        [sys.executable, "-m", "largebatch.cli", *train_args(broken, "--checkpoint-every", "3")],
        env={**__import__("os").environ, CRASH_AT_STEP_ENV: "5"}, timeout=120,
    )
    assert crashed.returncode == 17, crashed.stderr
    assert max(r["step"] for r in records(broken / "metrics.jsonl")) == 5  # logged past the checkpoint at 3
    assert main(train_args(broken, "--checkpoint-every", "3", "--resume")) == 0

    def without_clock(path):
        return [{k: v for k, v in r.items() if k not in ("train_seconds", "train_cpu_seconds", "load")}
                for r in records(path)]

    assert without_clock(broken / "metrics.jsonl") == without_clock(whole / "metrics.jsonl")
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, broken))
    assert a["final_test_accuracy"] == b["final_test_accuracy"] and a["steps"] == b["steps"]
    wa, wb = (torch.load(d / "checkpoint.pt", weights_only=False)["model"] for d in (whole, broken))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0)


def test_resume_refuses_a_different_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, "--max-steps", "2")) == 0
    assert main(train_args(run, "--resume", batch="512")) == 2
    assert "different run" in capsys.readouterr().err


def image_is_a_plot(path: Path) -> None:
    image = imread(path)
    assert image.shape[0] >= 200 and image.shape[1] >= 300
    assert float(np.var(image[..., :3])) > 1e-3  # not a blank canvas


def test_sweep_then_report_then_sweep_again_skips_finished_runs(tmp_path, capsys):
    root = tmp_path / "sweep"
    argv = ["sweep", "--methods", "lsw,lars", "--batches", "128,256", "--seeds", "0", "--epochs", "1",
            "--lr", "sgd=0.05,lars=0.05", "--run-dir", str(root), "--layer-every", "1", "--eval-every", "2", *SLICE]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| method | B = 128 | B = 256 |" in out and "| lars |" in out
    runs = sorted(p.name for p in (root / "runs").iterdir())
    assert runs == ["lars-b128-s0", "lars-b256-s0", "lsw-b128-s0", "lsw-b256-s0", "sgd-b128-s0"]
    report = (root / "report.md").read_text()
    assert "Target: per seed, the final test accuracy of momentum SGD at the base batch 128" in report
    assert "Base rate of the lars family: 0.05 (given with --lr)" in report
    assert "every epoch and every 2 steps" in report
    for name in ("accuracy-b128.png", "accuracy-b256.png", "layers-lars-b256.png"):
        assert f"({name})" in report
        image_is_a_plot(root / name)

    assert main(argv) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 5

    assert main(["report", str(root / "runs" / "lars-b256-s0")]) == 0
    image_is_a_plot(root / "runs" / "lars-b256-s0" / "layers-lars-b256.png")


def test_report_draws_per_layer_warmup_end_points_for_lena(tmp_path):
    run = tmp_path / "lena"
    assert main(train_args(run, "--layer-every", "1", "--epochs", "3", method="lena", batch="512")) == 0
    assert main(["report", str(run)]) == 0
    assert "warmup-lena-b512.png" in (run / "report.md").read_text()
    image_is_a_plot(run / "warmup-lena-b512.png")


def test_tune_picks_the_rate_with_the_best_validation_accuracy(tmp_path, capsys):
    root = tmp_path / "tune"
    assert main(["tune", "--method", "lsw", "--grid", "0.0001,0.05", "--epochs", "1", "--run-dir", str(root),
                 *SLICE]) == 0
    assert "sgd: base rate 0.05" in capsys.readouterr().out
    tuned = json.loads((root / "tuned.json").read_text())
    assert set(tuned["sgd"]["grid"]) == {"0.0001", "0.05"}


def test_advise_reports_the_noise_scale_and_which_batches_pay(tmp_path, capsys):
    assert main(["advise", "--model", "mlp", "--batch", "256", "--micro-batch", "64", "--steps", "4",
                 "--train-limit", "1024", "--run-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "B_noise = tr(Sigma)/|G|^2" in out and "1.weight" in out
    advice = json.loads((tmp_path / "advice.json").read_text())
    assert advice["noise_scale"] > 0 and len(advice["layer_noise_scales"]) == 6
    assert {row["verdict"] for row in advice["batches"]} >= {"does not pay"} or advice["noise_scale"] > 1e5


# -- bad input: one line, exit code 2, no checkpoint ------------------------------------

def write_corrupt_idx(directory: Path) -> Path:
    directory.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        with gzip.open(directory / f"{stem}.gz", "wb") as f:
            f.write(b"\x00\x00\x08\x03not an idx payload")
    return directory


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unknown method", "unknown method 'nope'"),
        ("unknown model", "unknown model 'vgg'"),
        ("indivisible batch", "not divisible by micro-batch x world size"),
        ("missing dataset", "idx files not found"),
        ("corrupt idx", "expected"),
        ("unwritable run dir", "cannot write to run directory"),
        ("bad number", "invalid int value"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(case, expected, tmp_path, capsys):
    run = tmp_path / "run"
    argv = {
        "unknown method": train_args(run, method="nope"),
        "unknown model": train_args(run, "--model", "vgg"),
        "indivisible batch": train_args(run, batch="200"),
        "missing dataset": train_args(run, "--data-dir", str(tmp_path)),
        "corrupt idx": train_args(run, "--data-dir", str(write_corrupt_idx(tmp_path / "idx"))),
        "unwritable run dir": train_args(tmp_path / "a-file" / "run"),
        "bad number": train_args(run, batch="many"),
    }[case]
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) if case == "bad number" else _no_exit() as raised:
        code = main(argv)
    if case == "bad number":
        code = raised.value.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("largebatch: error: ") and err.count("\n") == 1 and expected in err, err
    assert "Traceback" not in err
    assert not (run / "checkpoint.pt").exists()


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
