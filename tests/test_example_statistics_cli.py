"""``--statistics example`` in the command line: train, sweep, resume and the errors (small Fashion-MNIST slice)."""

from __future__ import annotations

import json

import pytest
from _cli_data import SLICE, needs_fashion_mnist

from largebatch.cli import build_parser, main
from largebatch.optim import SingleSampleWarning
from largebatch.train.config import TrainConfig
from largebatch.train.methods import RunShape, build, get_method

pytestmark = needs_fashion_mnist


def args(command: str, run_dir, *extra: str) -> list[str]:
    seed = ["--seeds", "1"] if command == "sweep" else ["--seed", "1"]
    return [command, "--model", "mlp", "--epochs", "1", *seed, "--run-dir", str(run_dir), *SLICE, *extra]


def test_train_lena_with_example_statistics_from_one_micro_batch(tmp_path, recwarn, capsys):
    run = tmp_path / "run"
    assert main(args("train", run, "--method", "lena", "--batch", "256", "--micro-batch", "256",
                     "--statistics", "example", "--layer-every", "1")) == 0
    assert not [w for w in recwarn if issubclass(w.category, SingleSampleWarning)]
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["statistics"] == "example" and config["micro_batches_per_rank"] == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["statistics"] == "example" and summary["micro_batch"] == 256
    gains = [json.loads(line)["gains"] for line in (run / "layers.jsonl").read_text().splitlines()]
    assert max(max(g.values()) for g in gains) > 1  # measured from one micro-batch: n = 256/128 = 2
    # resuming it with the other statistics would be another run
    capsys.readouterr()
    assert main(args("train", run, "--method", "lena", "--batch", "256", "--micro-batch", "256", "--resume")) == 2
    assert "belongs to a different run (statistics" in capsys.readouterr().err


def test_one_micro_batch_with_micro_batch_statistics_warns(tmp_path):
    with pytest.warns(SingleSampleWarning, match="statistics='example'"):
        assert main(args("train", tmp_path / "run", "--method", "adascale", "--batch", "256",
                         "--micro-batch", "256", "--max-steps", "2")) == 0


def test_sweep_gives_example_statistics_to_lena_only(tmp_path, capsys):
    root = tmp_path / "sweep"
    assert main(args("sweep", root, "--methods", "lena,lsw", "--batches", "256", "--micro-batch", "256",
                     "--statistics", "example")) == 0
    runs = sorted(p.name for p in (root / "runs").iterdir())
    assert runs == ["lena-sexample-b256-s1", "lsw-b256-s1", "sgd-b128-s1"]
    lena = json.loads((root / "runs" / "lena-sexample-b256-s1" / "summary.json").read_text())
    lsw = json.loads((root / "runs" / "lsw-b256-s1" / "summary.json").read_text())
    assert lena["statistics"] == "example" and lsw["statistics"] == "micro_batch"


def test_statistics_example_for_a_method_without_gains_is_one_line(tmp_path, capsys):
    assert main(args("train", tmp_path / "run", "--method", "lsw", "--batch", "256", "--statistics", "example")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--statistics example applies to the gain-ratio methods (lena, adascale, as)" in err
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(args("train", tmp_path / "run", "--method", "lena", "--batch", "256",
                                       "--statistics", "examples"))
    assert raised.value.code == 2


def test_methods_build_their_optimiser_for_the_statistics_mode():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    for name in ("lena", "adascale"):
        shape = RunShape(base_lr=0.1, base_batch=128, batch=1024, steps_per_epoch=10, epochs=1, statistics="example")
        opt, _ = build(get_method(name), model, shape)
        assert opt.statistics == "example" and opt.param_groups[0]["base_batch"] == 128
        assert opt.stats.per_example is not None
        opt.stats.remove()
        opt, _ = build(get_method(name), model, RunShape(base_lr=0.1, base_batch=128, batch=1024,
                                                         steps_per_epoch=10, epochs=1))
        assert opt.statistics == "micro_batch" and opt.stats.per_example is None
        opt.stats.remove()
    # a run of the default mode keeps the identity of checkpoints written before the option
    assert "statistics" not in TrainConfig(method="lena").run_identity()
    assert TrainConfig(method="lena", statistics="example").run_identity()["statistics"] == "example"
