"""largebatch.advise from Python: its answer when every batch or no batch pays, its summary, the batch forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import largebatch
from largebatch.train.advise import Advice, largest_paying, paying


def small_problem(seed: int = 0, examples: int = 512):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    x, y = torch.randn(examples, 10, generator=g), torch.randint(0, 3, (examples,), generator=g)
    return model, x, y


def test_every_batch_paying_and_no_batch_paying_are_different_answers():
    assert largest_paying(math.inf) == math.inf and paying(largest_paying(math.inf)) == "all"
    assert largest_paying(1.5) == 0 and paying(largest_paying(1.5)) == "none"
    assert largest_paying(1000) == 256 and paying(256) == "some"
    with pytest.raises(ValueError, match="NaN"):
        largest_paying(math.nan)


def signed_problem(signs: list[float]):
    """A 1-weight model whose micro-batch gradients are exactly ``signs`` (each micro-batch of 4 examples)."""
    model = nn.Linear(1, 1, bias=False)
    x = torch.ones(4 * len(signs), 1)
    t = torch.tensor(signs).repeat_interleave(4)
    return model, (lambda out, target: (out.squeeze(1) * target).mean()), [(x, t)]


def test_every_batch_pays_and_no_batch_pays_are_told_apart():
    # Opposite micro-batch gradients: the mean gradient is not resolved (|G|^2 estimated < 0): every batch pays.
    model, loss, batches = signed_problem([1.0, -1.0, 1.0, -1.0])
    everything = largebatch.advise(model, loss, batches, micro_batch=4)
    assert math.isinf(everything.noise_scale)
    assert everything.largest_paying_batch == math.inf and everything.paying == "all"
    assert all(row["verdict"].startswith("pays") for row in everything.batches)
    # Identical micro-batch gradients: no noise at all, so no batch above 1 example pays.
    model, loss, batches = signed_problem([1.0, 1.0, 1.0, 1.0])
    nothing = largebatch.advise(model, loss, batches, micro_batch=4)
    assert nothing.noise_scale == 0
    assert nothing.largest_paying_batch == 0 and nothing.paying == "none"
    assert not any(row["verdict"].startswith("pays") for row in nothing.batches)
    assert "every batch in the table still pays" in everything.summary()
    assert "no batch larger than 1 pays" in nothing.summary()


@pytest.mark.parametrize("noise, expect", [(math.inf, "all"), (1.0, "none"), (5000.0, "some")])
def test_the_field_agrees_with_the_table(noise, expect):
    from largebatch.train.advise import tradeoff

    largest = largest_paying(noise)
    rows = [tradeoff(2**k, noise) for k in range(0, 15)]
    advice = Advice(noise, {}, 1.0, 1.0, rows, largest, 1024, 128, 1, "a test")
    assert advice.paying == expect
    assert all((row["batch"] <= advice.largest_paying_batch) == row["verdict"].startswith("pays") for row in rows)


def test_the_summary_is_exported_and_reads_as_a_sentence():
    model, x, y = small_problem()
    advice = largebatch.advise(model, nn.functional.cross_entropy, [(x, y)], micro_batch=64)
    text = advice.summary()
    assert text == largebatch.format_advice(advice)
    assert "format_advice" in largebatch.__all__ and "advise" in largebatch.__all__
    header = text.splitlines()[0]
    assert "of at" not in header
    assert header.startswith("Gradient noise scale (McCandlish et al. 2018) of the model at its current parameters, "
                             "over 1 batch(es), at batch 512 (8 micro-batches of 64):")


def test_one_pair_of_tensors_is_one_batch():
    model, x, y = small_problem()
    as_list = largebatch.advise(model, nn.functional.cross_entropy, [(x, y)], micro_batch=64)
    as_pair = largebatch.advise(model, nn.functional.cross_entropy, (x, y), micro_batch=64)
    assert as_pair.measured_batches == 1 and as_pair.batch == 512
    assert as_pair.noise_scale == pytest.approx(as_list.noise_scale, rel=1e-6)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(10, 3), nn.Linear(4, 3)

    def forward(self, x, extra):
        return self.a(x) + self.b(extra)


@pytest.mark.parametrize("form", ["tuple", "list", "dict"])
def test_tuple_list_and_dict_inputs_are_split_into_micro_batches(form):
    torch.manual_seed(0)
    model = TwoInputs()
    x, extra, y = torch.randn(512, 10), torch.randn(512, 4), torch.randint(0, 3, (512,))
    inputs = {"tuple": (x, extra), "list": [x, extra], "dict": {"x": x, "extra": extra}}[form]
    advice = largebatch.advise(model, nn.functional.cross_entropy, [(inputs, y), [inputs, y]], micro_batch=128)
    reference = largebatch.advise(model, lambda out, t: nn.functional.cross_entropy(out, t),
                                  [((x, extra), y)] * 2, micro_batch=128)
    assert advice.measured_batches == 2 and advice.batch == 512 and advice.micro_batch == 128
    assert advice.noise_scale == pytest.approx(reference.noise_scale, rel=1e-6)
    assert set(advice.layer_noise_scales) == {"a.weight", "a.bias", "b.weight", "b.bias"}


def test_dict_targets_are_split_too():
    model, x, y = small_problem()
    advice = largebatch.advise(model, lambda out, t: nn.functional.cross_entropy(out, t["label"]),
                               [(x, {"label": y})], micro_batch=64)
    plain = largebatch.advise(model, nn.functional.cross_entropy, [(x, y)], micro_batch=64)
    assert advice.noise_scale == pytest.approx(plain.noise_scale, rel=1e-6)


def one_line_error(call, *needles):
    with pytest.raises(ValueError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_a_batch_not_divisible_by_the_micro_batch_is_refused_as_the_command_line_refuses_it():
    model, _, _ = small_problem()
    x, y = torch.randn(1000, 10), torch.randint(0, 3, (1000,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one_line_error(lambda: largebatch.advise(model, nn.functional.cross_entropy, [(x, y)], micro_batch=128),
                   "batch 0 has 1000 examples", "multiple of micro_batch 128")
    # The last, short batch of a DataLoader without drop_last: refused too, naming which batch.
    one_line_error(lambda: largebatch.advise(model, nn.functional.cross_entropy, [(x[:512], y[:512]),
                                                                                 (x[512:], y[512:])],
                                             micro_batch=128), "batch 1 has 488 examples")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    from largebatch.cli import main

    assert main(["advise", "--batch", "1000", "--micro-batch", "128"]) == 2  # the command line's rule


@pytest.mark.parametrize("batches, needle", [
    (lambda x, y: [{"inputs": x, "targets": y}], "batch 0 is a dict with keys inputs, targets"),
    (lambda x, y: [(x, y, y)], "batch 0 is a tuple of 3"),
    (lambda x, y: x, "batches is one tensor"),
    (lambda x, y: [(x, y[:100])], "disagree on the number of examples (100, 512"),
    (lambda x, y: [("text", 3)], "batch 0 holds no tensor"),
])
def test_other_batch_forms_are_refused_in_one_line(batches, needle):
    model, x, y = small_problem()
    one_line_error(lambda: largebatch.advise(model, nn.functional.cross_entropy, batches(x, y), micro_batch=64),
                   needle)


def test_non_finite_statistics_are_refused_not_read_as_every_batch_pays():
    model, x, y = small_problem()
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    one_line_error(lambda: largebatch.advise(model, nn.functional.cross_entropy, [(x, y)], micro_batch=64),
                   "not finite")
