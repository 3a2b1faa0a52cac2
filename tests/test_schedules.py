import io
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim.lr_scheduler import (
    ChainedScheduler,
    CosineAnnealingLR,
    ExponentialLR,
    LambdaLR,
    SequentialLR,
)

from largebatch.schedules import (
    GradualWarmup,
    epochs_to_steps,
    linear_scaling,
    scale_lr,
    sqrt_scaling,
    warmup_factor,
    warmup_then,
)


def sgd(lr=3.2, groups=1):
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))]} for _ in range(groups)]
    return torch.optim.SGD(params, lr=lr)


def rates(optimizer, scheduler, steps, group=0):
    """The rate each of ``steps`` updates uses, stepping the scheduler after each."""
    seen = []
    for _ in range(steps):
        seen.append(float(optimizer.param_groups[group]["lr"]))
        optimizer.step()
        scheduler.step()
    return seen


# ---- scaling rules -------------------------------------------------------------------


def test_scaling_rules_hand_computed():
    assert linear_scaling(0.1, 256, 8192) == pytest.approx(3.2)  # Goyal et al.: 0.1 * 32
    assert linear_scaling(0.05, 128, 64) == pytest.approx(0.025)
    assert sqrt_scaling(0.1, 128, 8192) == pytest.approx(0.8)  # 0.1 * sqrt(64)
    assert sqrt_scaling(0.2, 100, 200) == pytest.approx(0.2 * math.sqrt(2))
    assert scale_lr("linear", 0.1, 128, 1024) == pytest.approx(0.8)
    assert scale_lr("sqrt", 0.1, 128, 512) == pytest.approx(0.2)
    assert scale_lr("none", 0.1, 128, 1024) == 0.1


@settings(max_examples=50, deadline=None)
@given(
    lr=st.floats(1e-6, 10.0),
    base=st.integers(1, 4096),
    batch=st.integers(1, 1 << 20),
)
def test_scaling_rules_relations(lr, base, batch):
    linear, root = linear_scaling(lr, base, batch), sqrt_scaling(lr, base, batch)
    assert root**2 == pytest.approx(lr * linear, rel=1e-9)
    assert linear_scaling(lr, base, base) == pytest.approx(lr) == sqrt_scaling(lr, base, base)
    assert (linear >= root) == (batch >= base) or linear == pytest.approx(root)


@pytest.mark.parametrize("argument, position", [("base_lr", 0), ("base_batch", 1), ("batch", 2)])
@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "8", True, None])
@pytest.mark.parametrize("rule", [linear_scaling, sqrt_scaling, lambda *a: scale_lr("none", *a)])
def test_scaling_rejects_bad_numbers_naming_argument(rule, argument, position, bad):
    args = [0.1, 128, 1024]
    args[position] = bad
    with pytest.raises(ValueError, match=f"^{argument} must be"):
        rule(*args)


def test_scale_lr_unknown_rule():
    with pytest.raises(ValueError, match="rule must be one of 'linear', 'sqrt', 'none'"):
        scale_lr("cubic", 0.1, 128, 1024)


# ---- warm-up factor and step counts --------------------------------------------------


def test_epochs_to_steps_rounds_to_nearest():
    assert epochs_to_steps(5, 390) == 1950  # Goyal et al.: 5 epochs
    assert epochs_to_steps(5.5, 390) == 2145  # LSW: 5.5% of 100 epochs
    assert epochs_to_steps(0.3, 10) == 3  # 0.3 * 10 = 3.0000000000000004
    assert epochs_to_steps(0.25, 10) == 3  # halves round up
    assert epochs_to_steps(0, 10) == 0


def test_warmup_factor_values():
    assert [warmup_factor(t, 4, 0.2) for t in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert warmup_factor(4, 4, 0.2) == 1.0
    assert warmup_factor(0, 0, 0.2) == 1.0


# ---- GradualWarmup on its own --------------------------------------------------------


def test_rate_sequence_hand_computed():
    opt = sgd(lr=3.2)
    sched = GradualWarmup(opt, 4, start_lr=0.1)  # eta0 = 0.1 -> 3.2, step (3.2 - 0.1) / 4
    seen = rates(opt, sched, 8)
    assert seen[:4] == pytest.approx([0.1, 0.875, 1.65, 2.425], rel=1e-12)
    assert seen[4:] == [3.2, 3.2, 3.2, 3.2]  # the peak exactly, then untouched
    assert sched.finished and sched.get_last_lr() == [3.2]


def test_explicit_start_factor_and_finished():
    opt = sgd(lr=1.0)
    sched = GradualWarmup(opt, warmup_steps=3, start_factor=0.25)
    assert not sched.finished
    assert rates(opt, sched, 5) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert sched.factors() == [1.0]


def test_per_group_start_rates():
    opt = torch.optim.SGD(
        [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in (1.0, 2.0)], lr=1.0
    )
    sched = GradualWarmup(opt, 2, start_lr=0.5)
    assert sched.start_factors == [0.5, 0.25]
    assert sched.get_last_lr() == pytest.approx([0.5, 0.5])  # both groups start at eta0
    assert rates(opt, sched, 3, group=0) == pytest.approx([0.5, 0.75, 1.0])
    assert sched.get_last_lr() == [1.0, 2.0]
    opt = sgd(groups=2)
    assert GradualWarmup(opt, 2, start_factor=[0.5, 1.0]).get_last_lr() == pytest.approx([1.6, 3.2])


def test_zero_warmup_steps_leaves_rate_alone():
    opt = sgd(lr=0.4)
    assert rates(opt, GradualWarmup(opt, 0, start_factor=0.1), 3) == [0.4, 0.4, 0.4]


def test_warmup_in_epochs():
    opt = sgd(lr=1.0)
    sched = GradualWarmup(opt, warmup_epochs=1.5, steps_per_epoch=10, start_factor=0.4)
    assert sched.warmup_steps == 15
    seen = rates(opt, sched, 17)
    assert seen[0] == pytest.approx(0.4) and seen[1] == pytest.approx(0.44)
    assert seen[14] < 1.0 and seen[15:] == [1.0, 1.0]


def test_rate_changed_by_hand_after_warmup_is_kept():
    opt = sgd(lr=1.0)
    sched = GradualWarmup(opt, 2, start_factor=0.5)
    rates(opt, sched, 3)
    opt.param_groups[0]["lr"] = 0.3
    assert rates(opt, sched, 2) == [0.3, 0.3]


def test_stray_get_lr_call_does_not_change_the_sequence():
    opt = sgd()
    reference = rates(opt, GradualWarmup(opt, 5, start_factor=0.2), 8)
    opt = sgd()
    sched = GradualWarmup(opt, 5, start_factor=0.2)
    seen = rates(opt, sched, 2)
    with pytest.warns(UserWarning, match="use get_last_lr"):
        sched.get_lr()
    assert seen + rates(opt, sched, 6) == reference


def test_no_warnings_in_the_usual_loop():
    opt = sgd()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = warmup_then(opt, lambda o: ExponentialLR(o, 0.9), warmup_steps=3, start_factor=0.5)
        rates(opt, sched, 5)


@settings(max_examples=40, deadline=None)
@given(
    warmup_steps=st.integers(1, 40),
    start_factor=st.floats(1e-4, 1.0),
    peak=st.floats(1e-4, 10.0),
    tensor_lr=st.booleans(),
)
def test_warmup_monotone_within_bounds_and_ends_at_peak(warmup_steps, start_factor, peak, tensor_lr):
    lr = torch.tensor(peak, dtype=torch.float64) if tensor_lr else peak
    opt = sgd(lr=lr)
    seen = rates(opt, GradualWarmup(opt, warmup_steps, start_factor=start_factor), warmup_steps + 3)
    tol = 1e-12 * peak
    assert all(b >= a - tol for a, b in zip(seen, seen[1:]))
    assert all(start_factor * peak - tol <= r <= peak + tol for r in seen)
    assert seen[0] == pytest.approx(start_factor * peak, rel=1e-12)
    assert seen[warmup_steps:] == [peak] * 3
    # Constant increments: linear in the step.
    steps = [b - a for a, b in zip(seen[:warmup_steps], seen[1 : warmup_steps + 1])]
    assert steps == pytest.approx([steps[0]] * len(steps), rel=1e-6, abs=1e-12)


# ---- composition with torch schedulers -----------------------------------------------


def expected_product(peak, start_factor, warmup_steps, decay, steps):
    return [peak * warmup_factor(t, warmup_steps, start_factor) * decay(t) for t in range(steps)]


@pytest.mark.parametrize("warmup_first", [True, False])
def test_chained_with_exponential_gives_product(warmup_first):
    opt = sgd(lr=2.0)
    warm = GradualWarmup(opt, 4, start_factor=0.1)
    decay = ExponentialLR(opt, gamma=0.9)
    sched = ChainedScheduler([warm, decay] if warmup_first else [decay, warm], optimizer=opt)
    expected = expected_product(2.0, 0.1, 4, lambda t: 0.9**t, 12)
    assert rates(opt, sched, 12) == pytest.approx(expected, rel=1e-12)


def test_chained_with_cosine_gives_product():
    opt = sgd(lr=1.5)
    sched = warmup_then(opt, lambda o: CosineAnnealingLR(o, T_max=20), warmup_steps=5, start_lr=0.3)
    cosine = lambda t: (1 + math.cos(math.pi * t / 20)) / 2  # noqa: E731
    assert rates(opt, sched, 15) == pytest.approx(expected_product(1.5, 0.2, 5, cosine, 15), rel=1e-12)


def test_sequential_hands_over_to_decay_at_the_peak():
    opt = sgd(lr=1.0)
    warm = GradualWarmup(opt, 3, start_factor=0.25)
    sched = SequentialLR(opt, [warm, ExponentialLR(opt, gamma=0.5)], milestones=[3])
    assert rates(opt, sched, 6) == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.5, 0.25], rel=1e-12)


def test_warmup_then_sequential_with_lambda_decay():
    opt = sgd(lr=1.0)
    sched = warmup_then(
        opt,
        lambda o: LambdaLR(o, lambda t: 1 / (1 + t)),
        warmup_steps=2,
        start_factor=0.5,
        compose="sequential",
    )
    assert rates(opt, sched, 5) == pytest.approx([0.5, 0.75, 1.0, 0.5, 1 / 3], rel=1e-12)


def test_warmup_then_accepts_instance_and_none():
    opt = sgd(lr=1.0)
    sched = warmup_then(opt, ExponentialLR(opt, gamma=0.5), warmup_steps=2, start_factor=0.5)
    assert isinstance(sched, ChainedScheduler)
    assert rates(opt, sched, 4) == pytest.approx([0.5, 0.375, 0.25, 0.125], rel=1e-12)
    opt = sgd(lr=1.0)
    assert isinstance(warmup_then(opt, warmup_steps=2, start_factor=0.5), GradualWarmup)


def test_lsw_in_two_lines():
    epochs, steps_per_epoch, batch = 100, 6, 8192
    total = epochs * steps_per_epoch
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=linear_scaling(0.1, 128, batch), momentum=0.9,
                          weight_decay=5e-4)
    sched = warmup_then(opt, ExponentialLR(opt, gamma=0.01 ** (1 / total)),
                        warmup_epochs=0.055 * epochs, steps_per_epoch=steps_per_epoch, start_lr=0.1)
    seen = rates(opt, sched, total + 1)
    assert seen[0] == pytest.approx(0.1)
    assert seen[33] == pytest.approx(6.4 * 0.01 ** (33 / total))  # W = round(5.5 * 6) = 33
    assert seen[total] == pytest.approx(6.4 * 0.01)


# ---- tensor lr ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_lr_filled_in_place(dtype):
    lr = torch.tensor(2.0, dtype=dtype)
    opt = sgd(lr=lr)
    sched = warmup_then(opt, lambda o: ExponentialLR(o, gamma=0.9), warmup_steps=4, start_factor=0.1)
    seen = []
    for _ in range(8):
        assert opt.param_groups[0]["lr"] is lr  # never replaced by a float or a new tensor
        seen.append(float(lr))
        opt.step()
        sched.step()
    rel = 1e-6 if dtype == torch.float32 else 1e-12
    assert seen == pytest.approx(expected_product(2.0, 0.1, 4, lambda t: 0.9**t, 8), rel=rel)
    assert isinstance(sched.get_last_lr()[0], torch.Tensor)


def test_float32_tensor_lr_reaches_peak_exactly_alone():
    lr = torch.tensor(0.7)
    opt = sgd(lr=lr)
    seen = rates(opt, GradualWarmup(opt, 7, start_factor=0.3), 9)
    assert seen[7:] == [float(torch.tensor(0.7))] * 2


# ---- checkpoints ----------------------------------------------------------------------


def make_run(lr=1.0):
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = warmup_then(opt, lambda o: ExponentialLR(o, gamma=0.8), warmup_steps=6, start_factor=0.05)
    return model, opt, sched


def train(model, opt, sched, steps):
    seen = []
    for _ in range(steps):
        seen.append(float(opt.param_groups[0]["lr"]))
        opt.zero_grad()
        model(torch.ones(4, 3)).sum().backward()
        opt.step()
        sched.step()
    return seen


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_state_dict_resume_mid_warmup_gives_identical_sequence(tensor_lr):
    lr = torch.tensor(1.0) if tensor_lr else 1.0
    torch.manual_seed(0)
    reference = train(*make_run(lr), 10)

    torch.manual_seed(0)
    model, opt, sched = make_run(torch.tensor(1.0) if tensor_lr else 1.0)
    first = train(model, opt, sched, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)

    buffer.seek(0)
    saved = torch.load(buffer)
    model, opt, sched = make_run(torch.tensor(1.0) if tensor_lr else 1.0)  # scheduler built first,
    model.load_state_dict(saved["model"])  # then the optimizer loaded (torch's order)
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    assert first + train(model, opt, sched, 7) == reference


def test_resume_through_last_epoch_continues_the_warmup():
    opt = sgd(lr=1.0)
    first = rates(opt, GradualWarmup(opt, 8, start_factor=0.2), 3)  # optimizer now holds f(3)
    resumed = GradualWarmup(opt, 8, start_factor=0.2, last_epoch=3)
    # torch's last_epoch convention repeats the held rate once, then continues from f(5).
    assert first + rates(opt, resumed, 3) == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.7, 0.8])


# ---- bad arguments --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"warmup_steps": -1, "start_factor": 0.5}, "warmup_steps"),
        ({"warmup_steps": 2.5, "start_factor": 0.5}, "warmup_steps"),
        ({"warmup_steps": True, "start_factor": 0.5}, "warmup_steps"),
        ({"warmup_steps": "3", "start_factor": 0.5}, "warmup_steps"),
        ({"start_factor": 0.5}, "warmup_steps"),
        ({"warmup_steps": 3, "warmup_epochs": 1, "steps_per_epoch": 3, "start_factor": 0.5}, "warmup_epochs"),
        ({"warmup_epochs": 1, "start_factor": 0.5}, "steps_per_epoch"),
        ({"warmup_epochs": 1, "steps_per_epoch": 0, "start_factor": 0.5}, "steps_per_epoch"),
        ({"warmup_epochs": 1, "steps_per_epoch": 2.5, "start_factor": 0.5}, "steps_per_epoch"),
        ({"warmup_epochs": -1, "steps_per_epoch": 5, "start_factor": 0.5}, "warmup_epochs"),
        ({"warmup_epochs": float("nan"), "steps_per_epoch": 5, "start_factor": 0.5}, "warmup_epochs"),
        ({"warmup_steps": 3}, "start_lr"),
        ({"warmup_steps": 3, "start_lr": 0.1, "start_factor": 0.5}, "start_factor"),
        ({"warmup_steps": 3, "start_factor": 0.0}, "start_factor"),
        ({"warmup_steps": 3, "start_factor": 1.5}, "start_factor"),
        ({"warmup_steps": 3, "start_factor": [0.5, 0.5]}, "start_factor"),
        ({"warmup_steps": 3, "start_lr": 5.0}, "start_lr"),
        ({"warmup_steps": 3, "start_lr": -0.1}, "start_lr"),
        ({"warmup_steps": 3, "start_lr": "0.1"}, "start_lr"),
    ],
)
def test_bad_warmup_arguments_raise_value_error_naming_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        GradualWarmup(sgd(lr=3.2), **kwargs)


def test_bad_warmup_then_arguments():
    opt = sgd()
    with pytest.raises(ValueError, match="compose"):
        warmup_then(opt, warmup_steps=2, start_factor=0.5, compose="parallel")
    with pytest.raises(ValueError, match="decay"):
        warmup_then(opt, 5, warmup_steps=2, start_factor=0.5)
    with pytest.raises(ValueError, match="decay"):
        warmup_then(opt, ExponentialLR(sgd(), 0.9), warmup_steps=2, start_factor=0.5)
    with pytest.raises(TypeError):
        GradualWarmup("not an optimizer", 2, start_factor=0.5)
