"""Per-layer rules for per-example gradient norms: one file per layer type, registered here.

``RULES`` maps a module class to the rule that measures it. A module is
measured by the rule of the nearest class in its type's MRO, if it keeps that
class's ``forward``; a module of any other type with parameters of its own,
or that overrides ``forward``, gets the torch.func fallback. A new layer type
is one file with a :class:`~.base.Rule` subclass and one line below.
"""

from __future__ import annotations

from torch import nn

from .attention import AttentionRule, sequence_first_layers
from .base import Call, Deferred, Forward, Rule
from .batchnorm import BatchNormRule, SyncBatchNormRule
from .conv import ConvRule
from .embedding import EmbeddingRule
from .fallback import FallbackRule, batch_size
from .linear import LinearRule
from .normalisation import NormRule
from .recurrent import RecurrentRule

__all__ = ["RULES", "Call", "Deferred", "Forward", "Rule", "FallbackRule", "batch_size", "rule_class", "sequence_first_layers"]

RULES: dict[type[nn.Module], type[Rule]] = {
    nn.Linear: LinearRule,
    nn.Conv1d: ConvRule,
    nn.Conv2d: ConvRule,
    nn.Conv3d: ConvRule,
    nn.Embedding: EmbeddingRule,
    nn.LayerNorm: NormRule,
    nn.GroupNorm: NormRule,
    nn.RMSNorm: NormRule,
    nn.modules.batchnorm._BatchNorm: BatchNormRule,
    nn.SyncBatchNorm: SyncBatchNormRule,
    nn.MultiheadAttention: AttentionRule,
    nn.RNN: RecurrentRule,
    nn.GRU: RecurrentRule,
    nn.LSTM: RecurrentRule,
}


def rule_class(module: nn.Module) -> tuple[type[Rule] | None, type[Rule]]:
    """(the rule registered for the module's type family, the rule that measures it).

    They differ when the module overrides its registered class's ``forward``:
    then the family's checks still apply, but the fallback measures it.
    """
    for cls in type(module).__mro__:
        rule = RULES.get(cls)
        if rule is not None:
            return rule, rule if rule.any_forward or type(module).forward is cls.forward else FallbackRule
    return None, FallbackRule
