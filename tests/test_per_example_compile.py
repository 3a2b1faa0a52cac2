"""Per-example norms of a ``torch.compile``d model: the eager model's norms, checked against torch.func.

The fast tests compile with ``backend="aot_eager"`` (Dynamo and AOTAutograd,
which decide what the hooks see, without Inductor's code generation); the
slow one with the default backend.
"""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from largebatch.stats import GradientStatistics


class Encoder(nn.Module):
    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(1 if self.batch_first else 0))


def _inputs(batch_first: bool):
    x = torch.randn(6, 5, 16) if batch_first else torch.randn(5, 6, 16)
    return x, torch.randn(6, 3)


def _loss(out, target):
    return (out - target).square().sum(1).mean()


def _func_sq_norms(model, x, target, batch_first):
    """Mean over examples of each parameter's squared per-example gradient norm (torch.func reference)."""
    model = copy.deepcopy(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    dim = 0 if batch_first else 1

    def example_loss(p, x_i, t_i):
        return _loss(functional_call(model, p, (x_i.unsqueeze(dim),)), t_i.unsqueeze(0))

    grads = vmap(grad(example_loss), in_dims=(None, dim, 0))(params, x, target)
    return torch.stack([g.flatten(1).square().sum(1).mean() for g in grads.values()])


def _compiled_sq_norms(model, x, target, wrap, backend):
    compiled = torch.compile(model, backend=backend)
    stats = GradientStatistics(compiled if wrap == "compiled" else model, per_example=True, loss_reduction="mean")
    _loss(compiled(x), target).backward()
    return stats.summary().example_sq_norm_mean


@pytest.mark.parametrize("wrap", ["original", "compiled"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_compiled_transformer_layer_gives_exact_norms(wrap, batch_first):
    """Used to fail: Dynamo traced nn.MultiheadAttention's projections past the rule that watches them."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Encoder(batch_first)
    x, target = _inputs(batch_first)
    want = _func_sq_norms(model, x, target, batch_first)
    got = _compiled_sq_norms(model, x, target, wrap, "aot_eager")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_compiled_transformer_layer_inductor():
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Encoder()
    x, target = _inputs(True)
    want = _func_sq_norms(model, x, target, True)
    got = _compiled_sq_norms(model, x, target, "original", "inductor")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_attention_forward_is_restored_and_copies_use_their_own_parameters():
    """The attention call runs through the engine's forward: remove() restores it, and a deep copy of
    the model (an EMA copy, say) computes with its own parameters, not the original's."""
    torch.manual_seed(0)
    model = Encoder()
    stats = GradientStatistics(model, per_example=True)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for p in copied.parameters():
            p.mul_(2)
    plain = Encoder()
    plain.load_state_dict(copied.state_dict())
    x, _ = _inputs(True)
    torch.testing.assert_close(copied(x), plain(x))
    stats.remove()
    assert "forward" not in vars(model.enc.self_attn)

