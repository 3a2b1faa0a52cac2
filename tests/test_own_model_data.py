"""The user's own model and data on the command line: --model and --dataset as package.module:callable,
CIFAR-10/100 python folders, .npz files, --augment crop-flip, ResNet-18, and each bad file's one-line error.

The CIFAR folders are synthetic, written in the official format by the tests (tests/_cifar_data.py).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from _cifar_data import make_cifar

from largebatch.cli import main
from largebatch.data import DataFormatError, DatasetNotFoundError, load_dataset
from largebatch.data.augment import crop_flip, crop_flip_draws
from largebatch.models import ResNet18, build_model

# 300 training images in all; tiny slices keep ResNet-18 (0.56 G multiply-adds per image) to seconds.
TINY = ["--val-size", "20", "--test-limit", "20", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory) -> Path:
    return make_cifar(tmp_path_factory.mktemp("data"), "cifar10")


def records(path: Path, kind: str | None = None) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in lines if kind is None or r.get("kind") == kind]


def one_line_error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("largebatch: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- data ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_folders_load_standardised_per_channel(tmp_path, name, classes):
    folder = make_cifar(tmp_path, name)
    for data_dir in (folder, tmp_path):  # the folder itself or the directory holding it
        data = load_dataset(name, data_dir=data_dir, val_size=50)
        assert data.image_shape == (3, 32, 32) and data.num_classes == classes
        assert (len(data.train), len(data.val), len(data.test)) == (250, 50, 100)
    per_channel = data.train.images.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(3), atol=1e-3, rtol=0)
    # black, standardised: the padding of crop-flip
    raw = np.concatenate([pickle.loads((folder / f).read_bytes(), encoding="bytes")[b"data"]
                          for f in sorted(p.name for p in folder.iterdir())])
    assert all(f < -1 for f in data.fill) and len(data.fill) == 3 and raw.dtype == np.uint8


def test_the_new_formats_are_imported_only_when_used():
    code = ("import json, sys, largebatch.cli, largebatch.train.runner, largebatch.train.sweep\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('largebatch.data.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out)
    assert "largebatch.data.datasets" in loaded  # the check sees the package's modules
    assert not {"largebatch.data.cifar", "largebatch.data.npz", "largebatch.data.user"} & set(loaded), loaded


@pytest.mark.parametrize("layout", ["NCHW", "NHW"])
def test_npz_files_train_end_to_end(tmp_path, layout, capsys):
    rng = np.random.default_rng(0)
    for part, n in (("train", 200), ("test", 40)):
        y = np.arange(n) % 4
        x = (rng.normal(0, 1, (n, 2, 28, 28)) + y[:, None, None, None]).astype(np.float32)
        np.savez(tmp_path / f"{part}.npz", x=x if layout == "NCHW" else x[:, 0], y=y)
    data = load_dataset("npz", data_dir=tmp_path, val_size=40)
    assert data.image_shape == ((2, 28, 28) if layout == "NCHW" else (1, 28, 28)) and data.num_classes == 4
    run = tmp_path / "run"
    assert main(["train", "--method", "sgd", "--batch", "32", "--micro-batch", "16", "--epochs", "1", "--model",
                 "lenet5", "--dataset", "npz", "--data-dir", str(tmp_path), "--augment", "crop-flip",
                 "--run-dir", str(run), *TINY]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 160 // 32


def write_module(directory: Path, name: str, code: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(code))


def test_a_dataset_callable_of_tensors_or_datasets(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_module(tmp_path, "lb_test_mydata", """
        import torch

        def tensors():
            y = torch.arange(240) % 3
            x = torch.randn(240, 1, 10, 10, generator=torch.Generator().manual_seed(0)) + y[:, None, None, None]
            return (x, y), (x[:30], y[:30])

        class Items(torch.utils.data.Dataset):
            def __init__(self, n):
                self.n = n
            def __len__(self):
                return self.n
            def __getitem__(self, i):
                return torch.full((3, 8, 8), float(i % 5)), i % 5

        def datasets(data_dir):
            assert data_dir is None
            return Items(150), Items(25)
        """)
    tensors = load_dataset("lb_test_mydata:tensors", val_size=40)
    assert tensors.image_shape == (1, 10, 10) and tensors.num_classes == 3 and len(tensors.train) == 200
    items = load_dataset("lb_test_mydata:datasets", val_size=25)
    assert items.image_shape == (3, 8, 8) and items.num_classes == 5 and len(items.test) == 25
    assert torch.equal(items.train.images[:, 0, 0, 0].long(), items.train.labels)  # used as given
    run = tmp_path / "run"
    assert main(["train", "--method", "lars", "--batch", "50", "--micro-batch", "25", "--epochs", "1", "--model",
                 "mlp", "--dataset", "lb_test_mydata:tensors", "--run-dir", str(run), "--val-size", "40",
                 "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["dataset"]["source"] == "lb_test_mydata:tensors"


# -- models ------------------------------------------------------------------------------

def test_a_model_callable_from_a_file_in_the_working_directory(tmp_path, monkeypatch, cifar10, capsys):
    monkeypatch.chdir(tmp_path)
    write_module(tmp_path, "lb_test_mymodels", """
        from torch import nn

        seen = {}

        def tiny(num_classes, in_channels, image_size):
            seen.update(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
            return nn.Sequential(nn.Conv2d(in_channels, 4, 3, stride=4), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * (image_size // 4) ** 2, num_classes))

        def classes_only(num_classes):  # takes only what it names
            return nn.Linear(3 * 32 * 32, num_classes)
        """)
    run = tmp_path / "run"
    assert main(["train", "--method", "sgd", "--batch", "64", "--micro-batch", "32", "--epochs", "1", "--model",
                 "lb_test_mymodels:tiny", "--dataset", "cifar10", "--data-dir", str(cifar10), "--augment",
                 "crop-flip", "--run-dir", str(run), *TINY]) == 0
    import lb_test_mymodels

    assert lb_test_mymodels.seen == {"num_classes": 10, "in_channels": 3, "image_size": 32}
    assert isinstance(build_model("lb_test_mymodels:classes_only", 7, 3, 32), torch.nn.Linear)
    sweep = tmp_path / "sweep"
    assert main(["sweep", "--methods", "sgd,lars", "--batches", "64,128", "--model", "lb_test_mymodels:tiny",
                 "--dataset", "cifar10", "--data-dir", str(cifar10), "--epochs", "1", "--micro-batch", "64",
                 "--run-dir", str(sweep), "--base-batch", "64", *TINY]) == 0
    assert len(list((sweep / "runs").iterdir())) == 4


@pytest.mark.parametrize("code, expected", [
    ("raise ImportError('no such thing')", "cannot import lb_bad_{n} (ImportError: no such thing)"),
    ("def make(num_classes):\n    raise RuntimeError('out of ideas')",
     "the call with num_classes=10 failed (RuntimeError: out of ideas)"),
    ("def make(**kwargs):\n    return 3", "returned an object of type int, not a torch.nn.Module"),
    ("make = 3", "make is an object of type int, not a callable"),
    ("", "has no attribute 'make'"),
])
def test_a_model_callable_that_fails_gives_one_line(tmp_path, monkeypatch, capsys, cifar10, code, expected):
    monkeypatch.chdir(tmp_path)
    n = abs(hash(code)) % 10**8
    (tmp_path / f"lb_bad_{n}.py").write_text(code + "\n")
    err = one_line_error(["train", "--method", "sgd", "--batch", "64", "--micro-batch", "64", "--model", f"lb_bad_{n}:make",
                          "--dataset", "cifar10", "--data-dir", str(cifar10), "--run-dir", str(tmp_path / "r"),
                          *TINY], capsys)
    assert f"--model lb_bad_{n}:make" in err and expected.format(n=n) in err, err
    assert not (tmp_path / "r").exists()


def test_resnet18_is_the_cifar_variant():
    model = ResNet18(10, 3)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    model.eval()
    features = model.stages(model.stem(torch.zeros(2, 3, 32, 32)))
    assert features.shape == (2, 512, 4, 4)  # torchvision's ImageNet stem would leave 1 x 1


# -- end to end on CIFAR: train, sweep and advise, ResNet-20 and ResNet-18, crop-flip, fp32 and bf16 -------

@pytest.mark.parametrize("model, precision", [
    ("resnet20", "fp32"), ("resnet20", "bf16"),
    ("resnet18", "fp32"), pytest.param("resnet18", "bf16", marks=pytest.mark.slow),
])
def test_train_on_cifar_with_crop_flip(tmp_path, cifar10, model, precision, capsys):
    run = tmp_path / "run"
    assert main(["train", "--method", "lars", "--batch", "32", "--micro-batch", "16", "--epochs", "1",
                 "--train-limit", "32", "--model", model, "--dataset", "cifar10", "--data-dir", str(cifar10),
                 "--augment", "crop-flip", "--precision", precision, "--run-dir", str(run), *TINY]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["final_test_accuracy"] is not None
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["augment"] == "crop-flip" and config["precision"] == precision


@pytest.mark.parametrize("model", ["resnet20", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_sweep_and_advise_on_cifar(tmp_path, cifar10, model, capsys):
    sweep = tmp_path / "sweep"
    assert main(["sweep", "--methods", "sgd,lena", "--batches", "16,32", "--model", model, "--dataset", "cifar10",
                 "--data-dir", str(cifar10), "--epochs", "1", "--micro-batch", "16", "--base-batch", "16",
                 "--train-limit", "32", "--augment", "crop-flip", "--run-dir", str(sweep), *TINY]) == 0
    assert len(list((sweep / "runs").iterdir())) == 4
    assert main(["advise", "--model", model, "--dataset", "cifar10", "--data-dir", str(cifar10), "--batch", "32",
                 "--micro-batch", "16", "--steps", "2", "--train-limit", "64", "--val-size", "20", "--threads", "1"]) == 0
    assert "B_noise" in capsys.readouterr().out


# -- augmentation -------------------------------------------------------------------------

def test_crop_flip_pads_with_black_crops_and_flips_each_image_as_drawn():
    images = torch.randn(6, 3, 8, 8)
    offsets, flips = crop_flip_draws(6, epoch_seed=11)
    fill = (-1.5, 0.5, 2.0)
    out = crop_flip(images, offsets, flips, fill)
    for i in range(6):
        padded = torch.tensor(fill).view(3, 1, 1).expand(3, 16, 16).clone()
        padded[:, 4:12, 4:12] = images[i]
        r, c = offsets[i].tolist()
        want = padded[:, r:r + 8, c:c + 8]
        torch.testing.assert_close(out[i], want.flip(-1) if flips[i] else want, rtol=0, atol=0)
    again = crop_flip_draws(6, epoch_seed=11)
    assert torch.equal(again[0], offsets) and torch.equal(again[1], flips)
    other = crop_flip_draws(6, epoch_seed=12)
    assert not (torch.equal(other[0], offsets) and torch.equal(other[1], flips))


def test_crop_flip_is_identical_under_resume(tmp_path, cifar10, capsys):
    def args(run, *extra, augment="crop-flip"):
        return ["train", "--method", "sgd", "--batch", "50", "--micro-batch", "50", "--epochs", "2", "--model",
                "mlp", "--dataset", "cifar10", "--data-dir", str(cifar10), "--augment", augment, "--val-size",
                "50", "--run-dir", str(run), "--checkpoint-every", "2", "--no-progress", *extra]

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert main(args(whole)) == 0
    assert main(args(broken, "--max-steps", "7")) == 0  # stops inside the second epoch (5 steps each)
    assert main(args(broken, "--resume")) == 0

    def without_clock(path):
        return [{k: v for k, v in r.items() if k not in ("train_seconds", "train_cpu_seconds", "load")}
                for r in records(path)]

    assert without_clock(broken / "metrics.jsonl") == without_clock(whole / "metrics.jsonl")
    wa, wb = (torch.load(d / "checkpoint.pt", weights_only=False)["model"] for d in (whole, broken))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0)
    # and augmentation changes the run: without it the weights differ
    plain = tmp_path / "plain"
    assert main(args(plain, augment="none")) == 0
    wc = torch.load(plain / "checkpoint.pt", weights_only=False)["model"]
    assert any(not torch.equal(wa[name], wc[name]) for name in wa)


# -- bad files: one line naming the file and what was expected -------------------------------

def cifar_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A CIFAR-10 folder broken one way, and the file the error must name."""
    folder = make_cifar(tmp_path, "cifar10")
    target = folder / "data_batch_2"
    content = pickle.loads(target.read_bytes(), encoding="bytes")
    if case == "truncated pickle":
        target.write_bytes(target.read_bytes()[:5000])
    elif case == "wrong shape":
        content[b"data"] = content[b"data"][:, :3000]
        target.write_bytes(pickle.dumps(content, protocol=2))
    elif case == "label out of range":
        content[b"labels"][3] = 10
        target.write_bytes(pickle.dumps(content, protocol=2))
    elif case == "empty":
        content[b"data"], content[b"labels"] = content[b"data"][:0], []
        target.write_bytes(pickle.dumps(content, protocol=2))
    elif case == "missing file":
        target.unlink()
    elif case == "not a CIFAR pickle":  # would run code if unpickled without restriction
        target.write_bytes(pickle.dumps({b"data": subprocess.Popen}, protocol=2))
    return folder, str(target)


@pytest.mark.parametrize("case, expected", [
    ("truncated pickle", "truncated"),
    ("wrong shape", "'data' is a uint8 array of shape (60, 3000); expected"),
    ("label out of range", "label 10 lies outside [0, 10)"),
    ("empty", "no images (an empty dataset)"),
    ("missing file", "is missing"),
    ("not a CIFAR pickle", "refers to subprocess.Popen"),
])
def test_a_bad_cifar_file_gives_one_line_naming_it(tmp_path, capsys, case, expected):
    folder, named = cifar_case(tmp_path, case)
    with pytest.raises(DataFormatError, match="data_batch_2"):
        load_dataset("cifar10", data_dir=folder)
    err = one_line_error(["train", "--method", "sgd", "--batch", "32", "--micro-batch", "32", "--dataset", "cifar10", "--data-dir",
                          str(folder), "--run-dir", str(tmp_path / "r"), *TINY], capsys)
    assert named in err and expected in err, err


def npz_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    x, y = np.zeros((40, 1, 6, 6), np.uint8), np.arange(40) % 4
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "test.npz", x=x[:10], y=y[:10])
    path = tmp_path / ("test.npz" if case == "test label out of range" else "train.npz")
    if case == "no y":
        np.savez(path, x=x, labels=y)
    elif case == "wrong shape":
        np.savez(path, x=x.reshape(40, 36), y=y)
    elif case == "length mismatch":
        np.savez(path, x=x, y=y[:30])
    elif case == "test label out of range":
        np.savez(path, x=x[:10], y=np.full(10, 4))
    elif case == "empty":
        np.savez(path, x=x[:0], y=y[:0])
    elif case == "not an npz":
        path.write_bytes(b"not a zip archive")
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif case == "object array":
        np.savez(path, x=np.array([None] * 40, dtype=object), y=y)
    elif case == "missing":
        path.unlink()
    return tmp_path, str(path)


@pytest.mark.parametrize("case, expected", [
    ("no y", "no array y (it holds labels, x)"),
    ("wrong shape", "x has shape (40, 36); expected"),
    ("length mismatch", "x has 40 images but y has shape (30,)"),
    ("test label out of range", "label 4 lies outside [0, 4)"),
    ("empty", "no images (an empty dataset)"),
    ("not an npz", "cannot read it as .npz"),
    ("truncated", "cannot read it as .npz"),
    ("object array", "cannot read it as .npz"),
    ("missing", "not found"),
])
def test_a_bad_npz_file_gives_one_line_naming_it(tmp_path, capsys, case, expected):
    (tmp_path / "d").mkdir()
    directory, named = npz_case(tmp_path / "d", case)
    with pytest.raises((DataFormatError, DatasetNotFoundError)):
        load_dataset("npz", data_dir=directory, val_size=10)
    err = one_line_error(["train", "--method", "sgd", "--batch", "10", "--micro-batch", "10", "--dataset", "npz",
                          "--data-dir", str(directory), "--val-size", "10", "--run-dir", str(tmp_path / "r"),
                          "--no-progress"], capsys)
    assert named in err and expected in err, err


@pytest.mark.parametrize("code, expected", [
    ("def make():\n    return 3", "returned an object of type int; expected (train, test)"),
    ("import torch\ndef make():\n    return (torch.zeros(5, 1, 4, 4), torch.zeros(5).long()), 7",
     "(test) is an object of type int"),
    ("import torch\ndef make():\n    x = torch.zeros(0, 1, 4, 4)\n    return (x, torch.zeros(0).long()), (x, x)",
     "(train): no images (an empty dataset)"),
    (("import torch\ndef make():\n    x = torch.zeros(5, 1, 4, 4)\n    return (x, torch.tensor([0, 1, 2, 3, 9])), "
      "(x, torch.zeros(5).long())"), "label 9 (1 example) would make 10 classes"),
])
def test_a_dataset_callable_that_fails_gives_one_line(tmp_path, monkeypatch, capsys, code, expected):
    monkeypatch.chdir(tmp_path)
    n = abs(hash(code)) % 10**8
    (tmp_path / f"lb_baddata_{n}.py").write_text(code + "\n")
    err = one_line_error(["train", "--method", "sgd", "--batch", "4", "--micro-batch", "4", "--dataset",
                          f"lb_baddata_{n}:make", "--val-size", "1", "--run-dir", str(tmp_path / "r"),
                          "--no-progress"], capsys)
    assert f"--dataset lb_baddata_{n}:make" in err and expected in err, err
