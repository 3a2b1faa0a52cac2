"""idx labels must be the classes 0..K-1: a stray label is refused in one line naming its file."""

from __future__ import annotations

import numpy as np
import pytest
from test_data import make_idx_dir, write_idx

from largebatch.cli import main
from largebatch.data import IdxFormatError, load_dataset


def with_labels(directory, train=None, test=None):
    make_idx_dir(directory)
    if train is not None:
        write_idx(directory / "train-labels-idx1-ubyte.gz", np.asarray(train), compress=True)
    if test is not None:
        write_idx(directory / "t10k-labels-idx1-ubyte.gz", np.asarray(test), compress=True)
    return directory


def ten_classes(n: int = 40) -> np.ndarray:
    return (np.arange(n) % 10).astype(np.uint8)


def refused(directory, *needles: str) -> str:
    with pytest.raises(IdxFormatError) as caught:
        load_dataset("idx", data_dir=directory, val_size=5)
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_a_training_label_of_200_among_ten_classes_is_refused_naming_the_file(tmp_path):
    labels = ten_classes()
    labels[7] = 200
    directory = with_labels(tmp_path / "d", train=labels)
    refused(directory, str(directory / "train-labels-idx1-ubyte.gz"), "label 200 (1 example)", "201 classes",
            "classes 10-199 have no training example", "[0, classes)")


def test_the_command_line_refuses_it_in_one_line(tmp_path, capsys):
    labels = ten_classes()
    labels[7] = 200
    directory = with_labels(tmp_path / "d", train=labels)
    assert main(["train", "--method", "sgd", "--batch", "8", "--micro-batch", "8", "--epochs", "1", "--val-size",
                 "5", "--data-dir", str(directory), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train-labels-idx1-ubyte.gz: label 200" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_label_larger_than_the_training_set_is_refused_without_counting_to_it(tmp_path):
    labels = ten_classes().astype(np.int32)
    labels[0] = 2_000_000_000
    refused(with_labels(tmp_path / "d", train=labels), "label 2000000000", "only 40 training examples")


def test_a_missing_class_in_the_middle_is_refused(tmp_path):
    labels = ten_classes()
    labels[labels == 4] = 5
    refused(with_labels(tmp_path / "d", train=labels), "label 9", "classes 4 have no training example")


def test_negative_and_non_integer_labels_are_refused(tmp_path):
    labels = ten_classes().astype(np.int32)
    labels[3] = -1
    refused(with_labels(tmp_path / "a", train=labels), "label -1 is negative")
    refused(with_labels(tmp_path / "b", train=ten_classes().astype(np.float32)), "labels must be integers")


def test_test_labels_outside_the_training_classes_are_refused(tmp_path):
    test = (np.arange(10) % 10).astype(np.uint8)
    test[2] = 10
    directory = with_labels(tmp_path / "d", test=test)
    refused(directory, str(directory / "t10k-labels-idx1-ubyte.gz"), "label 10 lies outside [0, 10)")


def test_good_labels_load_with_their_class_count(tmp_path):
    data = load_dataset("idx", data_dir=with_labels(tmp_path / "d"), val_size=5)
    assert data.num_classes == 10
    three = (np.arange(40) % 3).astype(np.uint8)
    data = load_dataset("idx", data_dir=with_labels(tmp_path / "e", train=three, test=three[:10]), val_size=5)
    assert data.num_classes == 3
