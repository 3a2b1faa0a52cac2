"""The compiled statistics hooks, built on first use: the DDP communication
hook (_ddp_hook.cpp) and the accumulation hook (_accumulate.cpp).

Built with ``torch.utils.cpp_extension.load`` (a C++ compiler and ninja are
needed; the build takes about 80 s once and is cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``).
``LARGEBATCH_NATIVE=0`` in the environment turns it off; the engine then
uses the Python hooks (ddp.py's and its own tensor hooks), which compute
the same statistics.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

_HERE = Path(__file__).parent
_SOURCES = [_HERE / name for name in ("_bindings.cpp", "_ddp_hook.cpp", "_accumulate.cpp")]


def _disabled_by_environment() -> bool:
    return os.environ.get("LARGEBATCH_NATIVE", "").strip().lower() in ("0", "false", "no", "off")


@functools.cache
def _build() -> ModuleType | Exception:
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        return cpp_extension.load(
            name="largebatch_native",
            sources=[str(source) for source in _SOURCES],
            extra_cflags=["-O3"],
            verbose=False,
        )
    except Exception as error:  # a missing compiler, headers or ninja: reported by the caller
        return error


def _put_ninja_on_path() -> None:
    """torch's build looks for ``ninja`` on PATH; the ninja wheel's binary may not be there (no venv activated)."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def load(required: bool) -> ModuleType | None:
    """The compiled module, or None (with one warning) if it cannot be had.

    ``required``: raise instead of returning None.
    """
    if _disabled_by_environment():
        if required:
            raise RuntimeError("native=True, but LARGEBATCH_NATIVE=0 in the environment turns the compiled hooks off")
        return None
    built = _build()
    if isinstance(built, Exception):
        message = (
            f"largebatch's compiled statistics hooks could not be built ({type(built).__name__}: {built}); "
            "needs a C++ compiler and ninja (pip install ninja)"
        )
        if required:
            raise RuntimeError(message) from built
        _warn_once(message + "; using the Python hooks (same statistics, slower)")
        return None
    return built


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def dense_cpu_float(p: torch.Tensor) -> bool:
    """Whether the compiled hooks handle ``p``'s gradients: dense CPU float32/float64."""
    return p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) and p.layout == torch.strided


def unsupported(ddp, params: list) -> str | None:
    """Why the compiled hook cannot reduce ``ddp``'s buckets for these tracked params, or None."""
    if getattr(ddp, "mixed_precision", None) is not None:
        return "DistributedDataParallel(mixed_precision=...) reduces in another dtype"
    if getattr(ddp, "_use_python_reducer", False):
        return "the Python reducer (compiled autograd) does not run C++ comm hooks"
    if any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse for m in ddp.module.modules()):
        return "sparse gradients (Embedding(sparse=True))"
    ignored = set(getattr(ddp, "parameters_to_ignore", ()) or ())
    reduced = [p for name, p in ddp.module.named_parameters() if p.requires_grad and name not in ignored]
    for p in reduced:
        if not dense_cpu_float(p):
            return f"a parameter of {p.dtype} on {p.device} (the compiled hook reduces dense CPU float32/float64)"
    reduced_ids = {id(p) for p in reduced}
    if any(id(p) not in reduced_ids for p in params):
        return "a tracked parameter that DDP does not reduce (parameters_to_ignore)"
    return None


def hands_over_grads(ddp) -> bool:
    """Whether the compiled hook may make p.grad a view of its reduced bucket (_ddp_hook.cpp).

    Not where DDP keeps a globally unused parameter's p.grad as it was
    (find_unused_parameters, static_graph) or where p.grad is the bucket
    (gradient_as_bucket_view).
    """
    return not (ddp.find_unused_parameters or ddp.static_graph or ddp.gradient_as_bucket_view)


def register_statistics_hook(
    module: ModuleType, ddp, params, local_sq, grad_sq, *, measure_local: bool, vector_size: int, fill_statistics
):
    """Register the compiled hook (``module``, from :func:`load`) on ``ddp``'s reducer; returns its state.

    The state has ``wait()`` (the step's statistics collective), ``active``,
    ``hand_over`` (see :func:`hands_over_grads`) and ``handed_over`` (the
    gradients handed over so far).

    ``local_sq`` (K) receives each worker's local squared norms when
    ``measure_local``; ``grad_sq`` (K), the squared norms of the averaged
    gradients. On the last bucket the hook calls ``fill_statistics(out)``,
    ``out`` being where the statistics travel in the all-reduce; it returns
    the step's statistics vector (``vector_size`` long, ``local_sq`` in its
    first K entries), which the hook copies into ``out``, with the number of
    examples to write into its last entry (or None: the vector has it), or
    None to send nothing.
    """
    state = module.register_statistics_hook(
        ddp.reducer,
        ddp.process_group,
        params,
        local_sq,
        grad_sq,
        measure_local,
        vector_size,
        fill_statistics,
        hands_over_grads(ddp),
    )
    ddp._largebatch_native_hook = True  # DDP's own list of hooks (_comm_hooks) sees only Python hooks
    if ddp.logger is not None:
        ddp.logger._set_comm_hook_name("largebatch_native_statistics_hook")
    return state


def has_hook(ddp) -> bool:
    """Whether the compiled hook is registered on ``ddp`` (a reducer takes one comm hook)."""
    return getattr(ddp, "_largebatch_native_hook", False)


def accumulation_state(module: ModuleType, params, local_sq, grad_sq, eligible: list[bool]):
    """The accumulation hook's state for ``params`` (the engine calls ``begin_backward`` in each backward).

    ``local_sq`` (K) receives, added, each micro-batch's squared gradient
    norms of the parameters the hook measures; ``grad_sq`` (K), their
    ||p.grad||^2 as accumulated, valid when ``applied_sq_norms(params)``;
    ``eligible[k]``: whether ``params[k]`` is for it (:func:`dense_cpu_float`).
    """
    return module.AccumulationState(local_sq, grad_sq, eligible)
