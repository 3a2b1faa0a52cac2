"""Per-example gradient norms against torch.func vmap(grad) ground truth (float64)."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from largebatch.stats.per_example import PerExampleNorms

RTOL = 1e-5


@pytest.fixture(autouse=True)
def _float64(float64):
    """Every test here runs in float64 (the shared fixture in conftest.py)."""


def squared_error(out, target, reduction):
    """Per-example loss sum over non-batch dims of (out - target)^2, reduced over examples."""
    per_example = ((out - target) ** 2).flatten(1).sum(1)
    return per_example.mean() if reduction == "mean" else per_example.sum()


def true_norms(model, x, target, loss=squared_error):
    """(norm_sum, sq_norm_sum) per named parameter from explicit per-example gradients."""
    model = copy.deepcopy(model)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def example_loss(p, x_i, t_i):
        out = functional_call(model, p, (x_i.unsqueeze(0),))
        return loss(out, t_i.unsqueeze(0), "sum")

    grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, target)
    norms = {n: g.flatten(1).norm(dim=1) for n, g in grads.items()}
    return {n: (v.sum(), (v**2).sum()) for n, v in norms.items()}


def measured(model, x, target, loss=squared_error, reduction="mean", **kwargs):
    norms = PerExampleNorms(model, loss_reduction=reduction, **kwargs)
    out = model(x)
    loss(out, target, reduction).backward()
    norm_sum, sq_sum, count = norms.accumulators()
    names = [n for n, _ in model.named_parameters()]
    assert count == x.shape[0]
    return {n: (norm_sum[k], sq_sum[k]) for k, n in enumerate(names)}, norms


def assert_close(got, want):
    assert got.keys() == want.keys()
    for name in want:
        for g, w in zip(got[name], want[name]):
            assert torch.allclose(g, w, rtol=RTOL, atol=1e-12), (name, g.item(), w.item())


def check(model, x, reduction="mean", **kwargs):
    model = model.double()
    with torch.no_grad():
        target = torch.randn_like(model(x))
    want = true_norms(model, x, target)
    got, norms = measured(model, x, target, reduction=reduction, **kwargs)
    assert_close(got, want)
    return norms


# ------------------------------------------------------------------ Linear


def test_linear_2d():
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    norms = check(model, torch.randn(6, 5))
    assert norms.methods() == {
        "0.weight": "linear-outer", "0.bias": "direct", "2.weight": "linear-outer", "2.bias": "direct",
    }


# 40, 41: the Gram form splits positions in halves (41: unequal halves);
# "transposed": a non-contiguous activation, which cannot be viewed as pairs of halves
@pytest.mark.parametrize("length", [7, 40, 41, "transposed"])
@pytest.mark.parametrize("method", ["gram", "direct", "auto"])
def test_linear_sequence_input(method, length):
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    x = torch.randn(3, 6, 40).transpose(1, 2) if length == "transposed" else torch.randn(3, length, 6)
    norms = check(model, x, method=method)
    if method != "auto":
        assert norms.methods()["0.weight"] == method


def test_linear_auto_picks_cheaper_form():
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    norms = check(model, torch.randn(2, 9, 64))
    # 2 T^2 = 162 <= 64*64 -> Gram; 162 > 64*2 -> direct
    assert norms.methods()["0.weight"] == "gram"
    assert norms.methods()["2.weight"] == "direct"


def test_linear_4d_input():
    check(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), torch.randn(2, 3, 5, 3))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_reduction_scale(reduction):
    check(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), torch.randn(5, 4), reduction=reduction)


# ------------------------------------------------------------------ Conv


@pytest.mark.parametrize("method", ["gram", "direct"])
@pytest.mark.parametrize(
    "conv, shape",
    [
        (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2), (3, 4, 11)),
        (lambda: nn.Conv1d(4, 4, 3, groups=4, padding="same", padding_mode="reflect"), (3, 4, 9)),
        (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (3, 4, 7, 6)),
        (lambda: nn.Conv2d(4, 6, (3, 2), dilation=(2, 1), padding=(2, 0), groups=2), (3, 4, 8, 7)),
        (lambda: nn.Conv2d(4, 8, 3, groups=4, padding=1, padding_mode="circular"), (2, 4, 5, 5)),
        (lambda: nn.Conv2d(3, 4, 2, bias=False, padding="same"), (2, 3, 5, 4)),
        (lambda: nn.Conv3d(4, 6, 2, stride=(1, 2, 1), padding=1, dilation=(2, 1, 1), groups=2), (2, 4, 5, 4, 4)),
        (lambda: nn.Conv3d(2, 2, 3, groups=2, padding=1), (2, 2, 3, 4, 3)),
    ],
    ids=["1d", "1d-depthwise-reflect", "2d", "2d-groups2-dilated", "2d-depthwise-x2-circular",
         "2d-same-nobias", "3d-groups2", "3d-depthwise"],
)
def test_conv(conv, shape, method):
    model = nn.Sequential(conv(), nn.Tanh())
    norms = check(model, torch.randn(*shape), method=method)
    assert norms.methods()["0.weight"] == method


@settings(max_examples=30, deadline=None)
@given(
    nd=st.integers(1, 3), groups=st.sampled_from([1, 2, 4]), out_mult=st.integers(1, 2),
    kernel=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 2),
    dilation=st.integers(1, 2), size=st.integers(5, 9), method=st.sampled_from(["gram", "direct"]),
)
def test_conv_geometry_property(nd, groups, out_mult, kernel, stride, padding, dilation, size, method):
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
    layer = conv(4, groups * out_mult, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups)
    sizes = (size, 5, 5)[:nd]  # >= dilation * (kernel - 1) + 1, so every geometry is valid
    check(nn.Sequential(layer, nn.Tanh()), torch.randn(2, 4, *sizes), method=method)


def test_grouped_conv_is_not_treated_as_dense():
    """A formula ignoring groups would be off; check the depthwise case is exact with many groups."""
    check(nn.Sequential(nn.Conv2d(6, 6, 3, groups=6), nn.Tanh(), nn.Conv2d(6, 2, 1)), torch.randn(4, 6, 6, 6))


# ------------------------------------------------------------------ Embedding and norms


def test_embedding_repeats_and_padding_idx():
    model = nn.Sequential(nn.Embedding(7, 5, padding_idx=0), nn.Tanh(), nn.Linear(5, 3))
    ids = torch.tensor([[1, 2, 1, 0, 1], [0, 0, 3, 3, 6], [5, 4, 3, 2, 1]])
    norms = check(model, ids)
    assert norms.methods()["0.weight"] == "embedding"


@pytest.mark.parametrize(
    "norm, shape",
    [
        (lambda: nn.LayerNorm(6), (4, 3, 6)),
        (lambda: nn.LayerNorm((3, 6)), (4, 3, 6)),
        (lambda: nn.GroupNorm(2, 4), (3, 4, 5, 2)),
        (lambda: nn.GroupNorm(2, 4), (3, 4)),
        (lambda: nn.RMSNorm(6), (4, 3, 6)),
        (lambda: nn.RMSNorm(6, eps=1e-3), (4, 6)),
    ],
    ids=["layernorm", "layernorm-2d-shape", "groupnorm", "groupnorm-nospatial", "rmsnorm", "rmsnorm-2d"],
)
def test_norm_affine(norm, shape):
    layer = norm()
    with torch.no_grad():  # move away from the trivial initialisation
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    norms = check(nn.Sequential(layer, nn.Tanh()), torch.randn(*shape))
    assert set(norms.methods().values()) == {"norm-affine"}


@pytest.mark.parametrize("saved", [True, False], ids=["saved-moments", "recomputed"])
def test_layer_norm_from_saved_moments_or_recomputed(saved, monkeypatch):
    """LayerNorm normalises with the (mean, rstd) its forward saved, or recomputes them."""
    import largebatch.stats.layers.normalisation as per_example

    found = []
    original = per_example._layer_norm_moments

    def spy(output, x):
        moments = original(output, x) if saved else None
        found.append(moments is not None)
        return moments

    monkeypatch.setattr(per_example, "_layer_norm_moments", spy)
    layer = nn.LayerNorm((3, 6), eps=1e-3)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    check(nn.Sequential(nn.Linear(6, 6), layer, nn.Tanh()), torch.randn(4, 2, 3, 6))
    assert found == [saved]


def test_batchnorm_eval_is_exact():
    bn = nn.BatchNorm2d(3)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), bn, nn.Tanh()).eval()
    norms = check(model, torch.randn(4, 2, 5, 5), batchnorm="error")
    assert norms.methods()["1.weight"] == "norm-affine"


def test_batchnorm_train_contribution_formula():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh()).double()
    x = torch.randn(5, 2, 6, 6)
    norms = PerExampleNorms(model)
    hidden = model[0](x)
    xhat = ((hidden - hidden.mean((0, 2, 3), keepdim=True)) /
            torch.sqrt(hidden.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)).detach()
    bn_out = model[1](hidden)
    bn_out.retain_grad()
    (model[2](bn_out) ** 2).flatten(1).sum(1).mean().backward()
    g = bn_out.grad * x.shape[0]
    weight = (g * xhat).sum((2, 3)).norm(dim=1)
    bias = g.sum((2, 3)).norm(dim=1)
    norm_sum, sq_sum, _ = norms.accumulators()
    assert torch.allclose(norm_sum[2], weight.sum(), rtol=RTOL)
    assert torch.allclose(sq_sum[3], (bias**2).sum(), rtol=RTOL)
    assert norms.methods()["1.weight"] == "batchnorm-contribution"


def test_batchnorm_error_policy():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="BatchNorm"):
        PerExampleNorms(model, batchnorm="error")
    norms = PerExampleNorms(model.eval(), batchnorm="error")
    model.train()
    with pytest.raises(ValueError, match="train mode"):
        model(torch.randn(2, 3))
    norms.remove()


# ------------------------------------------------------------------ fallback and whole models


class Gate(nn.Module):
    """A module without a formula: y = x * tanh(w) + v x^2."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))
        self.v = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * torch.tanh(self.w) + self.v * x * x


def test_fallback_custom_module():
    norms = check(nn.Sequential(nn.Linear(3, 4), Gate(4), nn.Linear(4, 2)), torch.randn(5, 3))
    assert norms.methods()["1.w"] == "func-fallback"


def test_unsupported_module_without_fallback_raises():
    with pytest.raises(ValueError, match="Gate.*fallback=False"):
        PerExampleNorms(nn.Sequential(Gate(3)), fallback=False)


class Block(nn.Module):
    """Pre-norm transformer block: attention written with Linear layers, then an MLP."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.RMSNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab=11, d=8, tied=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(Block(d, 2), Block(d, 2))
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.blocks(self.embed(ids)))


def lm_loss(logits, target, reduction):
    per_token = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    per_example = per_token.mean(1)
    return per_example.mean() if reduction == "mean" else per_example.sum()


@pytest.mark.parametrize("tied", [False, True])
def test_small_transformer_end_to_end(tied):
    model = TinyLM(tied=tied).double()
    ids, target = torch.randint(0, 11, (3, 6)), torch.randint(0, 11, (3, 6))
    want = true_norms(model, ids, target, loss=lm_loss)
    got, norms = measured(model, ids, target, loss=lm_loss)
    assert_close(got, want)
    if tied:
        assert sorted(norms.methods()["embed.weight"].split("+")) == ["embedding", "gram"]


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.GroupNorm(2, 8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 6, 1), nn.ReLU(),
        )
        self.classifier = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def test_small_cnn_end_to_end():
    model = SmallCNN().double()
    x, target = torch.randn(4, 3, 8, 8), torch.randn(4, 5)
    want = true_norms(model, x, target)
    got, _ = measured(model, x, target)
    assert_close(got, want)


# ------------------------------------------------------------------ hooks and accumulation


def test_accumulation_over_micro_batches():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    reference = copy.deepcopy(model)
    norms = PerExampleNorms(model)
    xs, targets = torch.randn(3, 5, 4), torch.randn(3, 5, 2)
    want_norm, want_sq = 0, 0
    for x, target in zip(xs, targets):
        squared_error(model(x), target, "mean").backward()
        truth = true_norms(reference, x, target)
        want_norm = want_norm + torch.stack([truth[n][0] for n, _ in model.named_parameters()])
        want_sq = want_sq + torch.stack([truth[n][1] for n, _ in model.named_parameters()])
    norm_sum, sq_sum, count = norms.accumulators()
    assert count == 15
    assert torch.allclose(norm_sum, want_norm, rtol=RTOL) and torch.allclose(sq_sum, want_sq, rtol=RTOL)
    norms.reset()
    with pytest.raises(RuntimeError, match="no backward"):
        norms.accumulators()


def test_accumulators_before_backward_raises():
    norms = PerExampleNorms(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="no backward pass"):
        norms.accumulators()


def test_inplace_relu_after_layer():
    check(nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2)), torch.randn(5, 4))
    # Linear on (B, T, d) returns a view of a 2-d result; in-place ops on it must not drop the hook.
    check(nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2)), torch.randn(5, 3, 4))


class ViewOut(nn.Module):
    """A fallback module whose output is a strided view."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return (x * self.w)[:, ::2]


def test_view_output_modified_in_place():
    norms = check(nn.Sequential(nn.Linear(3, 6), ViewOut(6), nn.ReLU(inplace=True), nn.Linear(3, 2)),
                  torch.randn(4, 3))
    assert norms.methods()["1.w"] == "func-fallback"


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.inner(torch.tanh(self.norm(self.inner(x))))


@pytest.mark.parametrize("shape", [(5, 4), (3, 6, 4)])
def test_module_called_twice_is_combined_exactly(shape):
    norms = check(Twice(), torch.randn(*shape))
    assert "+" in norms.methods()["inner.weight"]


def test_tied_linear_and_conv_weights():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6, bias=False)
            self.b.weight = self.a.weight
            self.c, self.d = nn.Conv1d(2, 2, 3, groups=2), nn.Conv1d(1, 2, 3)
            self.d.weight = self.c.weight  # same shape, different grouping

        def forward(self, x):
            h = self.b(torch.tanh(self.a(x)))
            return torch.cat([self.c(h.view(-1, 2, 3)).flatten(1), self.d(h.view(-1, 1, 6)).flatten(1)], 1)

    norms = check(Tied(), torch.randn(5, 6))
    assert norms.methods()["a.weight"] == "linear-outer+linear-outer"


def test_parameter_without_gradient_contributes_nothing():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            self.unused(x)  # computed, but not part of the loss
            return self.used(x)

    model = Branchy().double()
    norms = PerExampleNorms(model)
    model(torch.randn(4, 3)).pow(2).sum().backward()
    norm_sum, sq_sum, _ = norms.accumulators()
    assert (norm_sum[2:] == 0).all() and (norm_sum[:2] > 0).all()


def test_functional_use_of_parameter_is_refused():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.proj = nn.Embedding(5, 3), nn.Linear(3, 3)

        def forward(self, ids):
            return F.linear(self.embed(ids), self.proj.weight)  # proj's hooks never run

    model = Functional()
    PerExampleNorms(model)
    with pytest.raises(RuntimeError, match="proj.weight"):
        model(torch.randint(0, 5, (2, 4))).sum().backward()


def test_parameter_outside_model_is_refused():
    with pytest.raises(ValueError, match="not a parameter of the model"):
        PerExampleNorms(nn.Linear(2, 2), params=[nn.Parameter(torch.zeros(1))])


def test_embedding_scaled_by_frequency_is_refused():
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        PerExampleNorms(nn.Embedding(4, 3, scale_grad_by_freq=True))


def test_tied_weight_with_fallback_use_is_combined():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.lin = Gate(4), nn.Linear(4, 4, bias=False)
            self.lin.weight = nn.Parameter(torch.randn(4, 4))
            self.gate.w = self.lin.weight  # one Parameter, used by a formula and by the fallback

        def forward(self, x):
            h = self.lin(x)  # (B, T=4, 4)
            return self.gate(h)

    check(Shared(), torch.randn(3, 4, 4))


def test_flush_inside_backward_is_idempotent():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    reference = copy.deepcopy(model)
    norms = PerExampleNorms(model)
    x, target = torch.randn(5, 3), torch.randn(5, 2)
    model[0].weight.register_hook(lambda g: norms.flush())  # the last gradient of the backward
    squared_error(model(x), target, "mean").backward()
    norm_sum, sq_sum, count = norms.accumulators()
    truth = true_norms(reference, x, target)
    assert count == 5
    assert torch.allclose(norm_sum, torch.stack([truth[n][0] for n, _ in model.named_parameters()]), rtol=RTOL)


def test_autocast_bfloat16_close_to_float32():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).float()
    x, target = torch.randn(6, 3, 8, dtype=torch.float32), torch.randn(6, 3, 4, dtype=torch.float32)
    want = true_norms(model, x, target)
    norms = PerExampleNorms(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    squared_error(out.float(), target, "mean").backward()
    norm_sum, _, _ = norms.accumulators()
    assert norm_sum.dtype == torch.float32
    for k, (name, _) in enumerate(model.named_parameters()):
        assert torch.allclose(norm_sum[k], want[name][0].float(), rtol=0.05), name


# ------------------------------------------------------------------ per-example gradients as the weight gradient


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("inplace", [False, True])
def test_per_example_gradients_supply_the_weight_gradient(bias, inplace):
    """Sequence inputs, method="direct": autograd computes no weight gradient; the tap's is the same."""
    model = nn.Sequential(nn.Linear(6, 5, bias=bias), nn.ReLU(inplace=inplace), nn.Linear(5, 4))
    x = torch.randn(3, 7, 6)
    with torch.no_grad():
        target = torch.randn_like(model(x))
    reference = copy.deepcopy(model)
    want_norms = true_norms(model, x, target)
    norms = PerExampleNorms(model, method="direct")
    x_engine, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    squared_error(model(x_engine), target, "mean").backward()
    squared_error(reference(x_plain), target, "mean").backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
        assert p.requires_grad
    torch.testing.assert_close(x_engine.grad, x_plain.grad, rtol=1e-12, atol=1e-14)
    norm_sum, sq_sum, _ = norms.accumulators()
    names = [n for n, _ in model.named_parameters()]
    assert_close({n: (norm_sum[k], sq_sum[k]) for k, n in enumerate(names)}, want_norms)
    assert norms.tapped_calls == 2
    assert set(norms.methods().values()) == {"direct"}


def test_auto_taps_only_where_cheaper_than_gram():
    # T = 16: 24 * 8 * 8 = 1536 <= 256 * 16 -> tap; 24 * 64 * 64 > 256 * 128 -> Gram
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64))
    norms = check(model, torch.randn(2, 16, 8))
    assert norms.tapped_calls == 2
    assert norms.methods()["4.weight"] == "gram"


def test_gram_method_never_taps():
    norms = check(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)), torch.randn(3, 7, 6), method="gram")
    assert norms.tapped_calls == 0


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return self.inner(torch.tanh(self.inner(x)))


def test_tapped_layer_called_twice_is_combined_exactly():
    model = CalledTwice()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 6, 4)
    norms = check(model, x, method="direct")
    assert norms.tapped_calls == 2 and "+" in norms.methods()["inner.weight"]
    model.zero_grad()
    target = torch.randn(3, 6, 4)
    squared_error(model(x), target, "mean").backward()
    squared_error(reference(x), target, "mean").backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


def test_forward_that_raises_leaves_the_weight_trainable():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh())
    norms = PerExampleNorms(model, method="direct")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        model(torch.randn(3, 7, 4))  # the pre-hook suspends the weight; F.linear then raises
    assert model[0].weight.requires_grad and not norms._suspended
    model(torch.randn(3, 7, 6)).sum().backward()  # and the next call is tapped as usual
    assert norms.tapped_calls == 1 and model[0].weight.grad is not None


def test_create_graph_through_a_tapped_layer():
    """Second-order gradients (a gradient penalty) through the tap match autograd's."""
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    reference = copy.deepcopy(model)
    x = torch.randn(3, 7, 6)
    norms = PerExampleNorms(model, method="direct")

    def penalty(net):
        grads = torch.autograd.grad(net(x).square().sum(), list(net.parameters()), create_graph=True)
        return sum(g.square().sum() for g in grads)

    penalty(model).backward()
    penalty(reference).backward()
    assert norms.tapped_calls > 0
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


def test_autocast_does_not_tap():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).float()
    norms = PerExampleNorms(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(3, 40, 6, dtype=torch.float32))
    out.float().square().mean().backward()
    assert norms.tapped_calls == 0
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_bfloat16_model_weight_gradient_close_to_autograd(monkeypatch):
    """Half-precision blocks are summed in float32 and rounded once, as autograd's matmul does."""
    from largebatch.stats import _ghost

    monkeypatch.setattr(_ghost, "_BLOCK_BYTES", 1)  # one example a block: 64 partial sums
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)).to(torch.bfloat16)
    reference = copy.deepcopy(model)
    x = torch.randn(64, 24, 16, dtype=torch.bfloat16)
    norms = PerExampleNorms(model, method="direct")
    model(x).float().square().mean().backward()
    reference(x).float().square().mean().backward()
    assert norms.tapped_calls == 2
    for p, q in zip(model.parameters(), reference.parameters()):
        assert p.grad.dtype == torch.bfloat16
        # Summed in bfloat16 the 64 blocks would be about 1% off; in float32, 0.3%.
        error = (p.grad.double() - q.grad.double()).norm() / q.grad.double().norm()
        assert error < 5e-3, error
