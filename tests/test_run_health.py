"""Runs that have failed but keep going are stopped and reported: a finite loss that explodes (diverged),
a loss that stays at chance (collapsed). The rules are checked against every run the study v2 committed."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

from largebatch.cli import main
from largebatch.train.health import COLLAPSE_UPDATES, LossWatch, judge_windows

ROOT = Path(__file__).resolve().parent.parent
SUMMARIES = ROOT / "results/study-v2/summaries.json"
CHANCE = math.log(10)


def committed_runs() -> list[dict]:
    return [r for r in json.loads(SUMMARIES.read_text())["runs"] if r.get("evals")]


def healthy(run: dict) -> bool:
    """What the study counts as healthy: it did not diverge and ended clearly above chance (10% on the ten
    classes of Fashion-MNIST): at 15% or more."""
    return run.get("diverged_at_step") is None and run["final_test_accuracy"] >= 0.15


def verdict(run: dict):
    return judge_windows(zip(run["evals"]["step"], run["evals"]["loss"]), 10)


def test_no_run_the_study_counts_as_healthy_is_flagged():
    runs = [r for r in committed_runs() if healthy(r)]
    assert len(runs) > 250  # the file holds the study's runs with their losses
    flagged = [(r["model"], r["phase"], r["method"], r["batch"], r["seed"], verdict(r)) for r in runs if verdict(r)]
    assert flagged == []


def test_the_study_runs_that_failed_but_kept_going_are_flagged():
    # main-sweep runs by (model, method, batch, seed, base rate), those a later rate set aside included
    by_key = {}
    for r in committed_runs():
        if r["phase"] == "sweep" or r.get("superseded_phase") == "sweep":
            by_key[(r["model"], r["method"], r["batch"], r["seed"], r["base_lr"])] = r
    # CLARS at base rate 30 on the MLP exploded from 1K up without a non-finite loss, and ended at 10%.
    for batch in (1024, 2048, 4096, 8192):
        for seed in (0, 1, 2):
            run = by_key[("mlp", "clars", batch, seed, 30.0)]
            assert run.get("diverged_at_step") is None and run["final_test_accuracy"] <= 0.11
            failure = verdict(run)
            assert failure is not None and failure.kind == "diverged" and failure.step < run["steps"] / 4
    # CLARS on LeNet-5-BN at 1K and 2K sat at log 10 for hundreds of updates.
    for key in (("lenet5-bn", "clars", 1024, 1), ("lenet5-bn", "clars", 2048, 0), ("lenet5-bn", "clars", 2048, 1)):
        failure = verdict(by_key[(*key, 30.0)])
        assert failure is not None and failure.kind == "collapsed" and "of chance (2.303)" in failure.reason
    # ... while seed 0 at 1K spent 104 updates at chance and recovered to 85%: not flagged.
    recovered = by_key[("lenet5-bn", "clars", 1024, 0, 30.0)]
    assert healthy(recovered) and verdict(recovered) is None


def test_an_exploding_finite_loss_is_diverged_at_the_first_window_past_the_limit():
    windows = [(6, 2.3), (12, 14.0), (18, 7e4), (24, 7e6), (30, 1.5e12)]
    failure = judge_windows(windows, 10)
    assert failure.kind == "diverged" and failure.step == 18 and "above 1000 x log K" in failure.reason
    assert judge_windows([(6, 2.3), (12, 14.0), (18, 820.0), (24, 3.0)], 10) is None


def test_collapse_needs_the_stretch_at_chance_to_last():
    watch = LossWatch(10)
    for step in range(1, COLLAPSE_UPDATES):
        assert watch.judge(step, 1, CHANCE + 0.01) is None
    assert watch.judge(COLLAPSE_UPDATES, 1, CHANCE).kind == "collapsed"
    # a window off chance starts the count again
    watch = LossWatch(10)
    assert watch.judge(150, 150, CHANCE) is None and watch.judge(160, 10, 2.0) is None
    assert watch.judge(310, 150, CHANCE) is None
    # the prior of unbalanced labels is chance too
    watch = LossWatch(10, prior_entropy=1.5)
    assert watch.judge(COLLAPSE_UPDATES, COLLAPSE_UPDATES, 1.5).kind == "collapsed"


DEAD_MODEL = """
    import torch
    from torch import nn

    class Dead(nn.Module):
        '''Uniform logits whatever the input: the loss is log K at every step.'''

        def __init__(self, num_classes):
            super().__init__()
            self.num_classes = num_classes
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return (x.flatten(1)[:, :1] * self.w).expand(-1, self.num_classes) * 0

    def tensors():
        y = torch.arange(900) % 10
        return (torch.randn(900, 1, 4, 4, generator=torch.Generator().manual_seed(0)), y), \\
            (torch.zeros(20, 1, 4, 4), y[:20])
    """


def test_a_collapsed_run_is_stopped_and_its_summary_says_when_and_why_also_after_resume(tmp_path, monkeypatch,
                                                                                           capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lb_dead.py").write_text(textwrap.dedent(DEAD_MODEL))

    def args(run, *extra):
        return ["train", "--method", "sgd", "--batch", "4", "--micro-batch", "4", "--epochs", "2", "--model",
                "lb_dead:Dead", "--dataset", "lb_dead:tensors", "--val-size", "100", "--eval-every", "50",
                "--run-dir", str(run), "--checkpoint-every", "25", "--no-progress", "--threads", "1", *extra]

    whole = tmp_path / "whole"
    assert main(args(whole)) == 1
    err = capsys.readouterr().err
    assert f"collapsed at step {COLLAPSE_UPDATES}" in err and "of chance" in err
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["steps"] == COLLAPSE_UPDATES and summary["diverged_at_step"] == COLLAPSE_UPDATES
    assert summary["failure"]["kind"] == "collapsed" and summary["failure"]["step"] == COLLAPSE_UPDATES
    assert "200 updates to step 200" in summary["failure"]["reason"]
    # stopped at step 130 (inside a window) and resumed: the watch picks up the updates already at chance
    broken = tmp_path / "broken"
    assert main(args(broken, "--max-steps", "130")) == 0
    assert main(args(broken, "--resume")) == 1
    assert json.loads((broken / "summary.json").read_text())["failure"] == summary["failure"]


def test_a_run_whose_loss_explodes_stops_where_it_is_found(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lb_dead.py").write_text(textwrap.dedent(DEAD_MODEL))
    run = tmp_path / "run"
    assert main(["train", "--method", "sgd", "--lr", "1e6", "--batch", "4", "--micro-batch", "4", "--epochs", "1",
                 "--model", "mlp", "--dataset", "lb_dead:tensors", "--val-size", "100", "--run-dir", str(run),
                 "--no-progress", "--threads", "1", "--warmup", "none"]) == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["failure"]["kind"] == "diverged" and summary["diverged_at_step"] == summary["steps"]
