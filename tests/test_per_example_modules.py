"""Per-example norms on attention, transformer and recurrent modules, 0-dim parameters,
parametrized weights and sparse embeddings; recovery after a backward that raised.

References are independent of the engine: torch.func per-example gradients (one
example at a time: the fused RNN kernels have no vmap rule), or, where dropout
draws masks, autograd on the batched graph for one example's loss at a time
(examples do not interact in these modules, so that is the per-example gradient
with the same masks).
"""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from largebatch.stats.engine import GradientStatistics
from largebatch.stats.per_example import PerExampleNorms

RTOL = 1e-9


@pytest.fixture(autouse=True)
def _float64(float64):
    """Every test here runs in float64 (the shared fixture in conftest.py)."""


def first(out):
    return out[0] if isinstance(out, tuple) else out


def example_losses(out, target):
    """Loss of each example (dimension 0 of ``out``)."""
    return ((out - target) ** 2).flatten(1).sum(1)


def func_norms(model, inputs, dims, target, read=first):
    """Per-example gradient norms {name: (B,)} by torch.func, one example at a time.

    ``inputs``: the forward's positional tensors; ``dims``: each one's example dimension.
    """
    model = copy.deepcopy(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    batch = inputs[0].shape[dims[0]]

    def loss(p, i):
        args = tuple(t.narrow(d, i, 1) for t, d in zip(inputs, dims))
        out = read(functional_call(model, p, args))
        return example_losses(out, target[i : i + 1]).sum()

    per = [grad(loss)(params, i) for i in range(batch)]
    return {n: torch.stack([g[n].flatten().norm() for g in per]) for n in params}


def graph_norms(model, inputs, target, read=first):
    """Per-example gradient norms from the batched graph, one example's loss at a time (same dropout masks)."""
    params = dict(model.named_parameters())
    losses = example_losses(read(model(*inputs)), target)
    norms = {n: [] for n in params}
    for loss in losses:
        grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
        for n, g in zip(params, grads):
            norms[n].append(torch.zeros(()) if g is None else g.norm())
    return {n: torch.stack(v) for n, v in norms.items()}


def measure(model, inputs, target, read=first, reduction="mean", **kwargs):
    norms = PerExampleNorms(model, loss_reduction=reduction, **kwargs)
    losses = example_losses(read(model(*inputs)), target)
    (losses.mean() if reduction == "mean" else losses.sum()).backward()
    norm_sum, sq_sum, count = norms.accumulators()
    assert count == target.shape[0]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {n: (norm_sum[k], sq_sum[k]) for k, n in enumerate(names)}, norms


def assert_matches(got, want_norms):
    assert got.keys() == want_norms.keys()
    for name, norms in want_norms.items():
        torch.testing.assert_close(got[name][0], norms.sum(), rtol=RTOL, atol=1e-12, msg=name)
        torch.testing.assert_close(got[name][1], norms.square().sum(), rtol=RTOL, atol=1e-12, msg=name)


def target_for(model, inputs, read=first):
    with torch.no_grad():
        return torch.randn_like(read(model(*inputs)))


# ------------------------------------------------------------------ recovery after an exception


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [KeyboardInterrupt, Boom])
def test_reset_after_a_backward_that_raised(error):
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    x, target = torch.randn(5, 3), torch.randn(5, 2)
    want = func_norms(model, (x,), (0,), target)
    norms = PerExampleNorms(model)

    def guard(g):
        raise error()

    handle = model[2].weight.register_hook(guard)  # mid-backward: outputs seen, the callback queued
    with pytest.raises(error):
        example_losses(model(x), target).mean().backward()
    handle.remove()
    norms.reset()
    example_losses(model(x), target).mean().backward()
    norm_sum, sq_sum, count = norms.accumulators()
    assert count == 5
    names = [n for n, _ in model.named_parameters()]
    assert_matches({n: (norm_sum[k], sq_sum[k]) for k, n in enumerate(names)}, want)


def test_engine_reset_after_a_backward_that_raised():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x, target = torch.randn(6, 3, 4), torch.randn(6, 3, 2)  # sequences: the tapped weight-gradient path
    want = func_norms(model, (x,), (0,), target)
    stats = GradientStatistics(model, per_example=True)
    handle = model[0].bias.register_hook(lambda g: (_ for _ in ()).throw(Boom()))
    with pytest.raises(Boom):
        example_losses(model(x), target).mean().backward()
    handle.remove()
    stats.reset()
    model.zero_grad()
    example_losses(model(x), target).mean().backward()
    summary = stats.summary()
    names = [n for n, _ in model.named_parameters()]
    for k, n in enumerate(names):
        torch.testing.assert_close(summary.example_sq_norm_mean[k], want[n].square().mean(), rtol=RTOL, atol=0)
    assert all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------ 0-dim parameters


class Temperature(nn.Module):
    """CLIP-style logit scale on the root module, and a ReZero gate inside a block."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.block = ReZero(4)
        self.logit_scale = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        return self.block(self.lin(x)) * self.logit_scale.exp()


class ReZero(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.f = nn.Linear(d, d)
        self.alpha = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return x + self.alpha * torch.tanh(self.f(x))


def test_zero_dim_parameters():
    model = Temperature()
    x = torch.randn(5, 3)
    target = target_for(model, (x,))
    want = func_norms(model, (x,), (0,), target)
    got, norms = measure(model, (x,), target)
    assert_matches(got, want)
    assert norms.methods()["logit_scale"] == "func-fallback"


# ------------------------------------------------------------------ attention


@pytest.mark.parametrize(
    "kwargs, cross",
    [
        ({"batch_first": True}, False),
        ({"batch_first": False}, False),
        ({"batch_first": True}, "kv"),  # key is value, query differs: two row blocks of in_proj_weight
        ({"batch_first": True}, "all"),  # three inputs: three row blocks
        ({"batch_first": True, "kdim": 3, "vdim": 5}, "all"),  # q/k/v_proj_weight
        ({"batch_first": True, "add_bias_kv": True}, False),
        ({"batch_first": False, "bias": False}, "kv"),
    ],
)
def test_multihead_attention_matches_torch_func(kwargs, cross):
    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(6, 2, **kwargs)

        def forward(self, q, k, v):
            return self.attn(q, k, v, need_weights=False)[0]

    model = Attend()
    bf = kwargs["batch_first"]
    shape = lambda length, d: (4, length, d) if bf else (length, 4, d)  # noqa: E731
    q = torch.randn(shape(3, 6))
    k = torch.randn(shape(5, kwargs.get("kdim", 6))) if cross else q
    v = k if cross != "all" else torch.randn(shape(5, kwargs.get("vdim", 6)))
    dim = 0 if bf else 1
    read = lambda out: out if bf else out.transpose(0, 1)  # noqa: E731
    target = target_for(model, (q, k, v), read)
    want = func_norms(model, (q, k, v), (dim, dim, dim), target, read)
    got, norms = measure(model, (q, k, v), target, read)
    assert_matches(got, want)
    assert norms.methods()["attn.out_proj.weight"] in ("gram", "direct")


def test_multihead_attention_weights_in_the_loss_and_padding_mask():
    model = nn.MultiheadAttention(4, 2, batch_first=True)
    x = torch.randn(3, 5, 4)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 3:] = True

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = model

        def forward(self, x, mask):
            out, weights = self.attn(x, x, x, key_padding_mask=mask)
            return torch.cat([out.flatten(1), weights.flatten(1)], 1)

    both = Both()
    target = target_for(both, (x, mask))
    want = func_norms(both, (x, mask), (0, 0), target)
    got, _ = measure(both, (x, mask), target)
    assert_matches(got, want)


def test_multihead_attention_called_twice_is_combined_exactly():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            h = self.attn(x, x, x, need_weights=False)[0]
            return self.attn(torch.tanh(h), x, x, need_weights=False)[0]

    model = Twice()
    x = torch.randn(3, 5, 4)
    target = target_for(model, (x,))
    want = func_norms(model, (x,), (0,), target)
    got, norms = measure(model, (x,), target, method="gram")
    assert_matches(got, want)
    assert norms.methods()["attn.in_proj_weight"] == "gram+gram"


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_with_dropout(norm_first):
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).train()
    x = torch.randn(4, 6, 8)
    target = target_for(model, (x,))
    torch.manual_seed(1)
    want = graph_norms(copy.deepcopy(model), (x,), target)
    torch.manual_seed(1)  # the same dropout masks
    got, _ = measure(model, (x,), target)
    assert_matches(got, want)


def test_sequence_first_transformer_without_dropout_matches_torch_func():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=False)
    model = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8), enable_nested_tensor=False)
    x = torch.randn(6, 4, 8)
    read = lambda out: out.transpose(0, 1)  # noqa: E731
    target = target_for(model, (x,), read)
    want = func_norms(model, (x,), (1,), target, read)
    got, _ = measure(model, (x,), target, read)
    assert_matches(got, want)


def test_attention_errors_name_the_module():
    model = nn.Sequential(nn.Linear(4, 4))
    model.add_module("attn", nn.MultiheadAttention(4, 2))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = model

        def forward(self, x):
            return self.encoder.attn(x, x, x)[0]

    wrap = Wrap()
    PerExampleNorms(wrap)
    with pytest.raises(ValueError, match=r"'encoder\.attn'.*batched"):
        wrap(torch.randn(5, 4))  # unbatched: no example dimension


# ------------------------------------------------------------------ recurrent


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM])
@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent_modules_match_torch_func(cls, batch_first):
    extra = {"proj_size": 2} if cls is nn.LSTM else {}
    rnn = cls(3, 4, num_layers=2, bidirectional=True, batch_first=batch_first, **extra)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = rnn, nn.Linear(4 if cls is nn.LSTM else 8, 2)

        def forward(self, x, h0):
            hx = (h0, torch.zeros(4, h0.shape[1], 4)) if cls is nn.LSTM else h0
            out, state = self.rnn(x, hx)
            h_n = state[0] if cls is nn.LSTM else state
            # both the sequence output and the final state reach the loss
            return self.head(out if batch_first else out.transpose(0, 1)).sum(1) + h_n.sum((0, 2)).unsqueeze(1)

    model = Model()
    x = torch.randn((3, 5, 3) if batch_first else (5, 3, 3))
    h0 = torch.randn(4, 3, 2 if cls is nn.LSTM else 4)
    target = target_for(model, (x, h0))
    want = func_norms(model, (x, h0), (0 if batch_first else 1, 1), target)
    got, norms = measure(model, (x, h0), target)
    assert_matches(got, want)
    assert norms.methods()["rnn.weight_hh_l1_reverse"] == "func-fallback"


def test_recurrent_refusals_name_the_module():
    model = nn.Sequential()
    model.add_module("lstm", nn.LSTM(3, 4, num_layers=2, dropout=0.5))
    PerExampleNorms(model)
    with pytest.raises(RuntimeError, match=r"'lstm'.*dropout"):
        model(torch.randn(5, 2, 3))
    model.eval()  # no dropout in eval mode
    model(torch.randn(5, 2, 3))[0].sum().backward()
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    with pytest.raises(ValueError, match=r"'lstm'.*PackedSequence"):
        model(packed)


# ------------------------------------------------------------------ sparse embeddings


@pytest.mark.parametrize("per_example", [False, True])
def test_sparse_embedding_statistics_equal_dense(per_example):
    def make(sparse):
        torch.manual_seed(3)
        return nn.Sequential(nn.Embedding(10, 3, sparse=sparse), nn.Flatten(), nn.Linear(12, 2))

    ids = [torch.randint(0, 4, (5, 4)) for _ in range(2)]  # repeated ids: an uncoalesced sparse gradient
    summaries = []
    for sparse in (True, False):
        model = make(sparse)
        stats = GradientStatistics(model, per_example=per_example)
        for batch in ids:
            model(batch).pow(2).mean().backward()
        assert model[0].weight.grad.is_sparse == sparse
        summaries.append(stats.summary())
    sparse, dense = summaries
    torch.testing.assert_close(sparse.sample_sq_norm_mean, dense.sample_sq_norm_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(sparse.mean_grad_sq_norm, dense.mean_grad_sq_norm, rtol=1e-12, atol=0)
    if per_example:
        torch.testing.assert_close(sparse.example_sq_norm_mean, dense.example_sq_norm_mean, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ parametrized weights


@pytest.mark.parametrize(
    "make", [nn.utils.parametrizations.weight_norm, nn.utils.parametrizations.spectral_norm]
)
def test_parametrized_weights_are_refused_at_construction(make):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    model.add_module("head", make(nn.Linear(4, 2)))
    with pytest.raises(ValueError, match=r"'head'.*'weight'.*parametrization.*parametrizations\.weight\.original"):
        PerExampleNorms(model)
    with pytest.raises(ValueError, match=r"'head'.*parametrization"):
        GradientStatistics(model, per_example=True)
    # Left untracked, the rest is measured as usual (the head's bias included).
    params = [p for n, p in model.named_parameters() if ".original" not in n]
    norms = PerExampleNorms(model, params=params)
    model(torch.randn(5, 3)).pow(2).sum().backward()
    assert norms.accumulators()[2] == 5
