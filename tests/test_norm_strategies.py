"""Per-example norm strategies: each exact against torch.func, the rule's choices, measurement, the memory bound."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from largebatch.models import LeNet5
from largebatch.stats import GradientStatistics, strategy
from largebatch.stats._ghost import BLOCK_BYTES
from largebatch.stats.layers.conv import conv_uses
from largebatch.stats.per_example import PerExampleNorms

RTOL = 1e-6
MODES = ["rule", "measure", "ghost", "bmm", "conv-backward"]


@pytest.fixture(autouse=True)
def _fresh_measurements():
    strategy.clear_measurements()
    yield
    strategy.clear_measurements()


def true_norms(model, x, target):
    """Per parameter: (sum of per-example norms, sum of squares) from torch.func per-example gradients."""
    model = copy.deepcopy(model)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def example_loss(p, x_i, t_i):
        out = functional_call(model, p, (x_i.unsqueeze(0),))
        return ((out - t_i.unsqueeze(0)) ** 2).sum()

    grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, target)
    norms = {n: g.flatten(1).norm(dim=1) for n, g in grads.items()}
    return {n: (v.sum(), (v**2).sum()) for n, v in norms.items()}


def check(model, x, **kwargs) -> PerExampleNorms:
    """Norms of a sum-of-squares loss (summed over examples) against torch.func, within RTOL."""
    with torch.no_grad():
        target = torch.randn_like(model(x))
    want = true_norms(model, x, target)
    norms = PerExampleNorms(model, loss_reduction="sum", **kwargs)
    ((model(x) - target) ** 2).sum().backward()
    norm_sum, sq_sum, count = norms.accumulators()
    assert count == x.shape[0]
    for k, name in enumerate(n for n, _ in model.named_parameters()):
        for got, expected in zip((norm_sum[k], sq_sum[k]), want[name]):
            assert torch.allclose(got, expected, rtol=RTOL, atol=1e-12), (name, got.item(), expected.item())
    return norms


# (layer, input shape, the rule's choice for its weight): shapes where each strategy is the rule's,
# and groups, stride, padding (modes), dilation in 1, 2 and 3 dimensions.
CONV_CASES = {
    "2d-ghost": (lambda: nn.Conv2d(16, 16, 3, padding=1), (3, 16, 4, 4), "ghost"),  # 2*16^2 <= 16*144
    "2d-bmm-stride": (lambda: nn.Conv2d(2, 16, 3, padding=1, stride=2), (3, 2, 8, 8), "bmm"),  # T = 16 < 2*16
    "2d-conv-backward": (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 3, 8, 8), "conv-backward"),  # T = 64 >= 2*4
    "1d-ghost": (lambda: nn.Conv1d(8, 8, 3, padding=1), (2, 8, 4), "ghost"),
    "1d-groups-dilated": (lambda: nn.Conv1d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2), (3, 4, 12),
                          "bmm"),  # per group p = 4, T = 6 < 8
    "2d-depthwise-reflect": (lambda: nn.Conv2d(4, 8, 3, groups=4, padding=1, padding_mode="reflect"), (2, 4, 5, 5),
                             "conv-backward"),
    "2d-same-dilated-nobias": (lambda: nn.Conv2d(3, 4, 2, bias=False, padding="same", dilation=2), (2, 3, 6, 5),
                               "conv-backward"),
    "3d-bmm": (lambda: nn.Conv3d(1, 16, 2, stride=2), (2, 1, 6, 6, 6), "bmm"),  # T = 27 < 2*16
    "3d-groups": (lambda: nn.Conv3d(4, 6, 2, stride=(1, 2, 1), padding=1, dilation=(2, 1, 1), groups=2),
                  (2, 4, 5, 4, 4), "conv-backward"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_every_strategy_is_exact_on_convolutions(float64, case, mode):
    layer, shape, ruled = CONV_CASES[case]
    model = nn.Sequential(layer(), nn.Tanh())
    norms = check(model, torch.randn(*shape), strategy=mode)
    choice = norms.strategies()["0.weight"]
    expected = {"rule": ruled, "measure": choice.strategy}.get(mode, mode)
    assert choice.strategy == expected, choice
    assert choice.reason.startswith({"rule": "rule:", "measure": "measured on"}.get(mode, "forced"))
    assert norms.methods()["0.weight"] == ("gram" if expected == "ghost" else "direct")


@pytest.mark.parametrize("mode", ["ghost", "bmm", "conv-backward"])
@pytest.mark.parametrize("case", ["2d-ghost", "1d-groups-dilated", "3d-groups"])
def test_blocks_of_one_example_are_exact(float64, case, mode):
    layer, shape, _ = CONV_CASES[case]
    check(nn.Sequential(layer(), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)), torch.randn(*shape), strategy=mode,
          block_bytes=1)


@pytest.mark.parametrize("mode", MODES)
def test_linear_on_sequences_every_strategy(float64, mode):
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))  # rule: Gram, then bmm (test_per_example)
    norms = check(model, torch.randn(3, 9, 64), strategy=mode, block_bytes=4096)
    chosen = norms.strategies()
    if mode in ("ghost", "bmm"):
        assert chosen["0.weight"].strategy == chosen["2.weight"].strategy == mode
    if mode == "conv-backward":  # not offered by a Linear layer: the rule's choice, saying so
        assert "not offered" in chosen["0.weight"].reason and chosen["0.weight"].strategy == "ghost"
    assert chosen["0.bias"].strategy == "dense"


def test_the_rule_and_its_estimate():
    """fastDP's 2T^2 <= p d, then bmm exactly when T < 2 p (UNFOLD_COST against GROUPED_COST)."""
    x = torch.randn(2, 64, 8, 8)

    def ruled(conv, x):
        g = torch.randn_like(conv(x))
        use, _ = conv_uses(conv, x, g)
        return strategy.rule_choice(use).strategy

    assert ruled(nn.Conv2d(64, 64, 3, padding=1), x) == "ghost"  # T = 64: 8192 <= 64 * 576
    assert ruled(nn.Conv2d(64, 64, 1), x) == "bmm"  # 8192 > 64 * 64, and T = 64 < 128
    assert ruled(nn.Conv2d(64, 16, 1), x) == "conv-backward"  # T = 64 >= 32
    assert strategy.GROUPED_COST == 2 * strategy.UNFOLD_COST


def test_measure_keeps_the_fastest_and_caches_it_per_shape(monkeypatch):
    times = {"ghost": 3.0, "bmm": 1.0, "conv-backward": 2.0}
    calls = []

    def fake_timed(use, name, block_bytes):
        calls.append(name)
        return times[name]

    monkeypatch.setattr(strategy, "_timed", fake_timed)
    x = torch.randn(4, 3, 6, 6)

    def run():
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh())
        norms = PerExampleNorms(model, strategy="measure")
        model(x).sum().backward()
        return norms.strategies()["0.weight"]

    choice = run()
    assert choice.strategy == "bmm" and "bmm 1e+03 ms" in choice.reason and sorted(calls) == sorted(times)
    times["bmm"] = 9.0  # a second engine on the same shape: the process's cached choice, no timing
    assert run().strategy == "bmm" and len(calls) == 3
    strategy.clear_measurements()
    assert run().strategy == "conv-backward" and len(calls) == 6


class LargestAllocation(TorchDispatchMode):
    """The largest storage among the outputs of every operation run inside (backward included)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type != "meta":
                self.bytes = max(self.bytes, t.untyped_storage().nbytes())
        return out


def largest_in_backward(model, x, **kwargs) -> int:
    """The largest tensor allocated by a backward with per-example norms (``kwargs`` for the engine)."""
    norms = PerExampleNorms(model, **kwargs)
    loss = F.cross_entropy(model(x), torch.zeros(x.shape[0], dtype=torch.long))
    with LargestAllocation() as mode:
        loss.backward()
        norms.accumulators()
    norms.remove()
    model.zero_grad(set_to_none=True)
    return mode.bytes


def plain_largest(model, x) -> int:
    """The same for a plain backward."""
    loss = F.cross_entropy(model(x), torch.zeros(x.shape[0], dtype=torch.long))
    with LargestAllocation() as mode:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return mode.bytes


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 4))


@pytest.mark.parametrize("mode", ["rule", "ghost", "bmm", "conv-backward"])
def test_blocks_bound_the_largest_intermediate(mode):
    """Under a 256 KB block budget no tensor of the per-example work outgrows the plain backward's largest
    (the conv output's gradient, 512 KB); unblocked, the Gram matrices (16 MB) and the unfold (1.7 MB) do."""
    model, x = small_cnn(), torch.randn(64, 3, 16, 16)
    plain = plain_largest(model, x)
    bounded = largest_in_backward(model, x, strategy=mode, block_bytes=256 << 10)
    assert bounded <= plain, (bounded, plain)
    if mode in ("ghost", "bmm"):
        assert largest_in_backward(model, x, strategy=mode, block_bytes=1 << 40) > plain


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["rule", "bmm", "conv-backward"])
def test_memory_bound_at_8192_examples_in_one_micro_batch(mode):
    """LeNet-5-BN, B = 8192 in one micro-batch: the per-example work allocates nothing larger than
    max(the plain backward's largest tensor, BLOCK_BYTES); the unfolded input alone would be 490-640 MB."""
    torch.manual_seed(0)
    model, x = LeNet5(batch_norm=True), torch.randn(8192, 1, 28, 28)
    plain = plain_largest(model, x)
    assert largest_in_backward(model, x, strategy=mode) <= max(plain, BLOCK_BYTES)


@pytest.mark.parametrize("mode", ["ghost", "bmm", "conv-backward"])
def test_train_batchnorm_contribution_is_exact_to_its_definition(float64, mode):
    """Train-mode BatchNorm: example i's quantity is its contribution sum_s g_is xhat_is (xhat with the
    batch's statistics) to the batch gradient, whatever the convolutions' strategy and blocks."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh())
    x = torch.randn(6, 2, 6, 6)
    norms = PerExampleNorms(model, strategy=mode, block_bytes=1)
    hidden = model[0](x)
    xhat = F.batch_norm(hidden, None, None, training=True, eps=1e-5).detach()
    out = model[1](hidden)
    out.retain_grad()
    (model[2](out) ** 2).flatten(1).sum(1).mean().backward()
    g = out.grad * x.shape[0]
    norm_sum, sq_sum, _ = norms.accumulators()
    torch.testing.assert_close(norm_sum[2], (g * xhat).sum((2, 3)).norm(dim=1).sum(), rtol=RTOL, atol=0)
    torch.testing.assert_close(sq_sum[3], g.sum((2, 3)).square().sum(), rtol=RTOL, atol=0)
    assert "contribution" in norms.strategies()["1.weight"].reason


def test_gradient_statistics_passes_the_strategy_and_shows_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    stats = GradientStatistics(model, per_example=True, per_example_strategy="bmm", per_example_block_bytes=1024)
    F.cross_entropy(model(torch.randn(5, 3, 6, 6)), torch.zeros(5, dtype=torch.long)).backward()
    chosen = stats.strategies()
    assert chosen["0.weight"].strategy == "bmm" and chosen["3.weight"].strategy == "outer"
    assert str(chosen["0.weight"]) == "bmm (forced (strategy='bmm'))"
    with pytest.raises(RuntimeError, match="per_example=True"):
        GradientStatistics(model).strategies()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strategy="fastest"), "strategy must be one of"),
        (dict(strategy="bmm", method="gram"), "not both"),
        (dict(block_bytes=0), "block_bytes must be a positive int"),
        (dict(block_bytes=2.5), "block_bytes must be a positive int"),
    ],
)
def test_bad_strategy_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PerExampleNorms(nn.Linear(2, 2), **kwargs)
