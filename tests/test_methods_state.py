"""The per-layer state of LENA and AdaScale across checkpoints, LENA's warm-up end points,
the ``adapt`` mask, and ProgressLR checkpoints."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from _method_stats import FakeStats
from largebatch.optim import LENA, AdaScale
from largebatch.optim.adascale import ProgressLR


def set_random_grads(params, generator):
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)


def _half_model(dtype):
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(s).to(dtype)) for s in [(5, 3), (5,), (4, 5), (4,)]]


def _round_trip(opt, make):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = make()
    fresh.load_state_dict(torch.load(buffer))
    return fresh


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lena_state_of_a_half_precision_model_survives_a_checkpoint(dtype):
    """S_k = 70001.5 rounds to 70144 in bfloat16 and is inf in float16; the state keeps its
    float32 values and warmup_end stays an integer."""
    params = _half_model(dtype)

    def make():
        return LENA(params, lr=0.1, stats=FakeStats(params, n=4), base_iterations=10**6)

    opt = make()
    set_random_grads(params, torch.Generator().manual_seed(1))
    opt.step()
    for p in params:
        opt.state[p]["progress"].fill_(70001.5)
        opt.state[p]["sample_sq_norm_avg"].fill_(1e-6)
    fresh = _round_trip(opt, make)
    for p in params:
        state = fresh.state[p]
        assert state["progress"].dtype == torch.float32 and float(state["progress"]) == 70001.5
        assert float(state["sample_sq_norm_avg"]) == pytest.approx(1e-6, rel=1e-6)
        assert state["warmup_end"].dtype == torch.long
        assert state["momentum_buffer"].dtype == dtype  # parameter-shaped state follows the parameter
    assert fresh.warmup_ends().dtype == torch.long


def test_adascale_clock_of_a_half_precision_model_survives_a_checkpoint():
    params = _half_model(torch.float16)

    def make():
        return AdaScale(params, lr=0.1, stats=FakeStats(params, n=4))

    opt = make()
    set_random_grads(params, torch.Generator().manual_seed(1))
    opt.step()
    for p in params:
        opt.state[p]["progress"].fill_(70001.5)
    fresh = _round_trip(opt, make)
    assert fresh.progress.dtype == torch.float32 and float(fresh.progress) == 70001.5
    scheduler = ProgressLR(fresh, lambda tau: 1.0)
    assert not fresh.done(10**6) and scheduler.get_last_lr() == [0.1]


def test_warmup_ends_is_minus_one_without_warmup_and_an_integer_after_resume():
    params = _half_model(torch.float32)

    def make(warmup):
        return LENA([{"params": params[:2], "warmup": warmup}, {"params": params[2:]}], lr=0.1,
                    stats=FakeStats(params, n=4, gain=4.0), base_iterations=10, alpha=0.5)

    opt = make(False)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        set_random_grads(params, g)
        opt.step()
    # theta = 5, S_k grows by 4 a step: the warmed-up group ends at update 2, the other never warms up
    assert opt.warmup_ends().tolist() == [-1, -1, 2, 2]
    fresh = _round_trip(opt, lambda: make(False))
    ends = fresh.warmup_ends()
    assert ends.dtype == torch.long and ends.tolist() == [-1, -1, 2, 2]


def test_progress_lr_with_a_lambda_can_be_saved_and_loaded():
    """As LambdaLR: a function is not saved (it may not pickle); a callable object's
    attributes are."""
    params = _half_model(torch.float32)
    opt = AdaScale(params, lr=0.1, stats=FakeStats(params, n=4))
    scheduler = ProgressLR(opt, lambda tau: 0.5 ** tau)
    set_random_grads(params, torch.Generator().manual_seed(1))
    opt.step()
    scheduler.step()
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)  # PicklingError before
    buffer.seek(0)
    other = ProgressLR(AdaScale(params, lr=0.1, stats=FakeStats(params, n=4)), lambda tau: 1.0)
    other.load_state_dict(torch.load(buffer, weights_only=False))
    assert other.last_epoch == scheduler.last_epoch
    assert other.lr_lambda(2.0) == 1.0  # its own function is kept

    class Halving:
        def __init__(self, every):
            self.every = every

        def __call__(self, tau):
            return 0.5 ** (tau // self.every)

    saved = ProgressLR(opt, Halving(3)).state_dict()
    restored = ProgressLR(opt, Halving(100))
    restored.load_state_dict(saved)
    assert restored.lr_lambda.every == 3


def test_lena_honours_the_adapt_mask():
    """adapt=False (param_groups gives it to biases and norm weights): gain 1 and no warm-up,
    momentum SGD at the group's rate; the adapted group keeps its gain and warm-up."""
    params = _half_model(torch.float64)
    sgd_params = [nn.Parameter(p.detach().clone()) for p in params[:2]]
    opt = LENA([{"params": params[:2], "adapt": False}, {"params": params[2:]}], lr=0.1, momentum=0.9,
               weight_decay=1e-3, stats=FakeStats(params, n=4, gain=3.0), base_iterations=100, alpha=0.5)
    sgd = torch.optim.SGD(sgd_params, lr=0.1, momentum=0.9, weight_decay=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        set_random_grads(params, g)
        for p, q in zip(params[:2], sgd_params):
            q.grad = p.grad.clone()
        opt.step()
        sgd.step()
        assert opt.last_gains[0].tolist() == [1.0, 1.0]
        assert opt.last_warmup_factors[0].tolist() == [1.0, 1.0]
        assert torch.all(opt.last_gains[1] > 1)
        assert torch.all(opt.last_warmup_factors[1] < 1)
    for p, q in zip(params[:2], sgd_params):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert opt.warmup_ends().tolist()[:2] == [-1, -1]


def test_adascale_refuses_the_adapt_mask():
    """AdaScale's gain is one for the whole model: a group asking for no adaptation is refused, not ignored."""
    params = _half_model(torch.float32)
    with pytest.raises(ValueError, match="adapt"):
        AdaScale([{"params": params[:2], "adapt": False}, {"params": params[2:]}], stats=FakeStats(params))
    AdaScale([{"params": params[:2], "adapt": True}, {"params": params[2:]}], stats=FakeStats(params))
