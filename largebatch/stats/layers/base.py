"""What a per-layer rule is, and the records the engine's hooks keep for it.

A rule turns one call of a layer (what its forward hook kept) and the
gradient of the call's output into the per-example gradients of the layer's
parameters, as :mod:`largebatch.stats._ghost` uses: a ``Factored`` weight
gradient ``L_i^T R_i`` or a dense ``(B, *shape)`` tensor. The engine
(:class:`largebatch.stats.per_example.PerExampleNorms`) owns the hooks and the
accumulation; a rule only says what to keep at forward time and what the
gradient means. One rule object serves one engine, so it may keep state.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

__all__ = ["Call", "Deferred", "Forward", "Rule", "Uses", "is_reshape_of_base"]


@dataclass(eq=False)
class Forward:
    """One forward pass of the model: the calls of each module in it."""

    calls: dict = field(default_factory=lambda: defaultdict(int))


@dataclass(eq=False)
class Call:
    """One call of a hooked module: what its backward formula needs."""

    module: nn.Module
    rule: "Rule"
    args: tuple
    kwargs: dict
    batch: int
    forward: Forward
    context: Any = None  # what the rule kept at forward time (Rule.capture)
    grad_shape: Any = None  # set when the hook sits on the output's base
    transposed: bool = False  # input and output are (L, B, ...), see attention.sequence_first_layers


@dataclass(eq=False)
class Deferred:
    """A call whose norms need the gradients of several tensors: its output leaves, or projections inside it.

    ``entries[j]`` says what the gradient of hooked tensor ``j`` means;
    the norms are formed when all have arrived, or at the end of the
    backward from those that did (a tensor the loss does not reach adds 0).
    """

    call: Call
    entries: list = field(default_factory=list)
    grads: dict = field(default_factory=dict)
    done: bool = False


# name -> (per-example gradient, method name or None to let the norm say how it was computed)
Uses = dict[str, tuple[Any, "str | None"]]


class Rule:
    """The per-example gradients of one layer type; subclasses override what differs.

    The default is a layer whose forward hook keeps its first input and whose
    output's gradient gives every parameter's per-example gradient
    (``uses``); a rule with ``deferred = True`` instead hooks tensors itself
    and answers in ``complete`` once their gradients are in.
    """

    #: the parameter names the formula knows; a module with other tracked
    #: parameters of its own goes to the fallback (None: any)
    params: frozenset[str] | None = frozenset({"weight", "bias"})
    #: False for torch.func rules, which ``fallback=False`` refuses
    formula = True
    #: also measures (or refuses) subclasses that override ``forward``
    any_forward = False
    #: hooks tensors itself and forms the uses in ``complete``
    deferred = False
    #: the formula reads the output's gradient only as (B, -1, features), so
    #: the hook may sit on the base of an output that is a reshape
    flat_output = False

    def __init__(self, norms) -> None:
        self.norms = norms  # the engine: its hooks and accumulators (per_example.PerExampleNorms)

    # -- planning -------------------------------------------------------------
    def refuses(self, module: nn.Module) -> bool:
        """True if no per-example gradient exists for this module."""
        return False

    def members(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The parameters a call of ``module`` uses, by the names ``uses`` gives them."""
        return list(module.named_parameters(recurse=False))

    def absorbs(self, module: nn.Module) -> list[nn.Module]:
        """Submodules whose parameters this module uses functionally (planned with it)."""
        return []

    def check(self, module: nn.Module, name: str) -> None:
        """Refuse, at construction, what cannot be measured (ValueError); every module of the type, tracked or not."""

    def watch(self, module: nn.Module, name: str) -> list:
        """Hooks every module of the type gets, tracked or not; returns their handles."""
        return []

    def label(self, name: str) -> str | None:
        """The method ``methods()`` reports for parameter ``name`` before its first backward (None: unresolved)."""
        return None

    def register(self, module: nn.Module, tracked: dict[str, int]) -> list:
        """Register this module's hooks; returns their handles."""
        return [module.register_forward_hook(self.norms._on_forward, with_kwargs=True)]

    def reset(self) -> None:
        """Forget any call in flight (a forward or backward that raised)."""

    # -- one call ---------------------------------------------------------------
    def capture(self, module: nn.Module, x: Tensor, output: Tensor, transposed: bool) -> Any:
        """What the backward formula needs besides the input (kept in ``Call.context``)."""
        return None

    def sq_norms(self, call: Call, g: Tensor, tracked: dict[str, int]) -> dict | None:
        """name -> (squared norms (B,), method) for a parameter's only use, if cheaper than ``uses``."""
        return None

    def uses(self, call: Call, x: Tensor, g: Tensor, tracked: dict[str, int]) -> Uses:
        raise NotImplementedError(f"{type(self).__name__} forms its uses in complete()")

    def complete(self, record: Deferred, tracked: dict[str, int]) -> list[tuple[int, Any, str | None]]:
        """(parameter index, use, method) of a deferred call once its gradients are in."""
        raise NotImplementedError(f"{type(self).__name__} is not deferred")


def is_reshape_of_base(view: Tensor) -> bool:
    """True if ``view`` covers all of its contiguous base in the same order."""
    base = view._base
    return (
        view.is_contiguous()
        and base.is_contiguous()
        and view.numel() == base.numel()
        and view.storage_offset() == base.storage_offset()
    )


def describe(names: dict[nn.Module, str], module: nn.Module) -> str:
    """A module as error messages name it: its name in the model and its type."""
    return f"module {names[module]!r} ({type(module).__name__})"
