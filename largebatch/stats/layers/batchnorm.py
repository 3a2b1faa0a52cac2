"""BatchNorm (1d/2d/3d, lazy ones included): each example's contribution to the batch gradient.

BatchNorm policy. In train mode BatchNorm normalises with batch statistics, so
an example's loss depends on the other examples and no exact per-example
gradient exists. ``batchnorm="contribution"`` (the default) reports example
``i``'s additive contribution ``sum_s g_is * xhat_is`` (and ``sum_s g_is`` for
the bias) to the batch gradient: the contributions sum to the exact gradient,
but their norms are an approximation, and the gradients reaching earlier layers
carry the same coupling. In eval mode the same formula is exact.
``batchnorm="error"`` refuses models with a BatchNorm in train mode.
``nn.SyncBatchNorm`` is refused: its batch statistics span workers.
"""

from __future__ import annotations

import functools

import torch.nn.functional as F
from torch import Tensor, nn

from .. import _ghost
from .base import Call, Rule

__all__ = ["BatchNormRule", "SyncBatchNormRule", "batch_norm_uses"]


class BatchNormRule(Rule):
    def check(self, module: nn.Module, name: str) -> None:
        if self.norms.batchnorm == "error":
            _refuse_train_batchnorm(module, name)

    def label(self, name: str) -> str | None:
        return "batchnorm-contribution"

    def watch(self, module: nn.Module, name: str) -> list:
        if self.norms.batchnorm != "error":
            return []
        check = functools.partial(_refuse_train_batchnorm, name=name)
        return [module.register_forward_pre_hook(lambda m, _, c=check: c(m))]

    def capture(self, module: nn.Module, x: Tensor, output: Tensor, transposed: bool):
        return _eval_batchnorm_stats(module)

    def uses(self, call: Call, x: Tensor, g: Tensor, tracked: dict[str, int]):
        weight, bias = batch_norm_uses(call.module, x, g, call.context)
        label = "batchnorm-contribution" if call.context is None else "norm-affine"
        return {"weight": (weight, label), "bias": (bias, label)}


class SyncBatchNormRule(BatchNormRule):
    params = None
    any_forward = True

    def refuses(self, module: nn.Module) -> bool:
        return True  # batch statistics span workers; neither formula nor fallback is right


def _refuse_train_batchnorm(module: nn.Module, name: str = "") -> None:
    if module.training or module.running_mean is None:
        raise ValueError(
            f"BatchNorm {name or type(module).__name__!r} normalises with batch statistics "
            "(train mode), which couples examples; batchnorm='error' refuses it "
            "(use model.eval() for it, or batchnorm='contribution')"
        )


def _eval_batchnorm_stats(module: nn.Module) -> tuple[Tensor, Tensor] | None:
    """Running statistics at forward time if the module uses them, else None (batch statistics)."""
    if module.training or module.running_mean is None:
        return None
    return module.running_mean.detach().clone(), module.running_var.detach().clone()


def batch_norm_uses(
    module: nn.modules.batchnorm._NormBase, x: Tensor, g: Tensor, stats: tuple[Tensor, Tensor] | None
) -> tuple[Tensor | None, Tensor | None]:
    """BatchNorm: example i's contribution ``sum_s g_is * xhat_is`` to the batch gradient.

    ``stats`` holds (running_mean, running_var) captured at forward time in
    eval mode, where the result is the exact per-example gradient; ``None``
    means batch statistics (train mode), where examples are coupled and the
    contributions are an approximation (they sum to the exact batch gradient).
    """
    dtype = _ghost.compute_dtype(x, g)
    x, g = x.to(dtype), g.to(dtype)
    if stats is None:
        xhat = F.batch_norm(x, None, None, training=True, eps=module.eps)
    else:
        xhat = F.batch_norm(x, stats[0].to(dtype), stats[1].to(dtype), training=False, eps=module.eps)
    reduce = list(range(2, x.dim()))
    gx = g * xhat
    return (
        (gx.sum(reduce) if reduce else gx) if module.weight is not None else None,
        (g.sum(reduce) if reduce else g) if module.bias is not None else None,
    )
