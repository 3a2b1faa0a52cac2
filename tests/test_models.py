import pytest
import torch

from largebatch.models import MODELS, build_model


@pytest.mark.parametrize("name", MODELS)
def test_models_forward_backward(name):
    torch.manual_seed(0)
    model = build_model(name)
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg")
