"""Per-micro-batch, per-worker and per-example gradient statistics for one step.

:class:`GradientStatistics` attaches to a model (or a
``DistributedDataParallel`` wrapper) and, for each optimiser step, yields a
:class:`GradientSummary` of per-layer squared norms: what AdaScale, LENA and
CLARS consume (methods.md). A "layer" is one parameter tensor.

Scales. Let ``g^(i)`` be the *mean* gradient over the examples of sample i
(a micro-batch or a worker), ``m`` the local number of micro-batches and ``b``
the examples per micro-batch. The tensor hook sees ``h_i = s g^(i)`` with
``s = (1/m if accumulation == "mean" else 1) * (b if loss_reduction == "sum"
else 1)``, and ``p.grad = s m gbar`` after the step's backwards (averaged over
workers by DDP). Every reported number is on the scale of ``g^(i)``, so the
estimators (estimators.py) and the noise scale in examples are meaningful
whatever the accumulation and reduction conventions. Workers are assumed to run
the same number of micro-batches of the same size, as DDP with ``no_sync``
accumulation does.

All norms are taken as the backward passes leave the gradients: a GradScaler's
loss scale S multiplies A and B by S^2 (example norms by S) even if ``p.grad``
was unscaled before ``summary()``; gain ratios and noise scales are unaffected.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_leaves

from ._ghost import BLOCK_BYTES
from ._norms import sq_norm_into, sq_norms
from .ddp import all_reduce_sum, forward_synchronises, may_launch_before_finalize
from .summary import GradientSummary, loss_scale, warn_if_unscaled

__all__ = ["GradientStatistics", "GradientSummary"]

_SAMPLES = ("micro_batch", "worker")
_APPLIED_NORM = ("backward", "every_backward", "summary")
_REDUCTIONS = ("mean", "sum")


def first_batch_size(args: tuple, kwargs: dict) -> int:
    """Leading dimension of the first tensor among a forward call's arguments (0 if none)."""
    if args and isinstance(args[0], Tensor) and args[0].dim() > 0:  # the usual call, without pytree
        return args[0].shape[0]
    for leaf in tree_leaves((args, kwargs)):
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    return 0


class GradientStatistics:
    """Collect A_k, B_k (and per-example norms) for each optimiser step.

    Call ``summary()`` after the step's last backward and before
    ``optimizer.step()``; call ``reset()`` after it. See the module docstring
    for the scales and ``summary()`` for what n counts.

    Args:
        model: the module, or a ``DistributedDataParallel`` wrapping it. DDP
            keeps its own reduction and any comm hook registered on it; the
            statistics get one small all-reduce of their own per step (ddp.py).
        per_example: also collect per-example gradient norms (ghost norms).
        loss_reduction: "mean" or "sum" over the examples of a micro-batch.
        accumulation: "mean" when the loss is divided by the number of
            micro-batches, "sum" when it is not.
        sample: "micro_batch" (n = workers x micro-batches) or "worker"
            (each worker's accumulated local gradient; n = workers).
        batchnorm: per-example policy for BatchNorm layers (per_example only).
        per_example_fallback: allow the per-module torch.func fallback for
            layers without a ghost-norm rule (per_example only).
        per_example_strategy, per_example_block_bytes: how each layer's
            per-example norms are formed and the memory bound of their blocks
            (``PerExampleNorms``' ``strategy`` and ``block_bytes``; see ``strategies()``).
        applied_norm: when B = ||p.grad||^2 is read. "backward" (default): as
            the step's last backward leaves p.grad, so GradScaler.unscale_ or
            clipping before summary() cannot skew A/B. Under DDP that is the
            synchronised backward. In one process the last backward is
            predicted from the previous step's count; a step with fewer
            backwards is read in summary() if p.grad is unchanged, and refused
            (RuntimeError) if it was changed in place. "every_backward": read
            after every backward, never refused, one extra gradient read per
            micro-batch. "summary": once, in summary(), refused if p.grad was
            changed in place after the last backward.
        process_group: group for the statistics' all-reduce (default: DDP's).
            Another group must carry nothing else during a backward.
        params: the tracked parameters (default: all trainable ones).
        grad_scaler: the ``torch.amp.GradScaler`` that scales the losses, if
            any: ``summary().loss_scale`` is then its scale (a tensor).

    Mechanics and limits: a tensor hook on each parameter sees every
    micro-batch's gradient before accumulation (also under ``no_sync``), so a
    backward is one micro-batch: ``torch.autograd.grad`` calls that reach the
    parameters inside a step count too; one backward at a time per model. The
    same plain PyTorch hooks run on every device and backend (no compiled
    code). Examples are counted from the leading
    dimension of the first tensor passed to the model's forward, for the
    forwards a backward of the step propagates through to the parameters (a
    logging forward or an input-gradient backward adds nothing). One forward
    backpropagated in two backward passes (``retain_graph``, a gradient
    penalty) would be two samples of the same examples: ``summary()`` refuses
    it. Statistics live on the first parameter's device.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        per_example: bool = False,
        loss_reduction: str = "mean",
        accumulation: str = "mean",
        sample: str = "micro_batch",
        batchnorm: str = "contribution",
        per_example_fallback: bool = True,
        per_example_strategy: str = "rule",
        per_example_block_bytes: int = BLOCK_BYTES,
        applied_norm: str = "backward",
        process_group=None,
        params=None,
        grad_scaler=None,
    ):
        _check_choice("loss_reduction", loss_reduction, _REDUCTIONS)
        _check_choice("accumulation", accumulation, _REDUCTIONS)
        _check_choice("sample", sample, _SAMPLES)
        _check_choice("applied_norm", applied_norm, _APPLIED_NORM)
        self.applied_norm = applied_norm
        self.grad_scaler = grad_scaler
        self.ddp = model if isinstance(model, DistributedDataParallel) else None
        self.module = model.module if self.ddp is not None else model
        self.loss_reduction, self.accumulation, self.sample = loss_reduction, accumulation, sample
        self.params = _unique_trainable(params if params is not None else self.module.parameters())
        if not self.params:
            raise ValueError("params: no parameter requires grad")
        _refuse_sharded(model, self.params)
        self._index_of = {id(p): k for k, p in enumerate(self.params)}
        # Weak: hooks left on autograd nodes of a retained graph must not keep the engine alive.
        self._weak_self = weakref.ref(self)
        anchor = self.params[0]
        self._dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        self._device = anchor.device
        K = len(self.params)
        # Everything a step sums over workers, in one vector: the local sample
        # sums (K), per-example norm and squared-norm sums (2K), examples (1).
        self._vector = torch.zeros(K + (2 * K if per_example else 0) + 1, dtype=self._dtype, device=self._device)
        self._examples_entry = self._vector[-1]
        # sum over this worker's samples of ||sample||^2: the micro-batches' h_i, or
        # (sample="worker", under DDP) the accumulated local gradient
        self._local_sq = self._vector[:K]
        self._local_slots = list(self._local_sq.unbind())
        self._backward_sq = torch.zeros(K, dtype=self._dtype, device=self._device)  # this backward's ||h_i||^2
        self._backward_slots = list(self._backward_sq.unbind())
        self._handles = [p.register_hook(self._grad_hook(k)) for k, p in enumerate(self.params)]
        self._handles.append(self.module.register_forward_hook(self._watch_forward, with_kwargs=True))
        self.per_example = None
        if per_example:
            from .per_example import PerExampleNorms

            try:
                self.per_example = PerExampleNorms(
                    self.module, loss_reduction=loss_reduction, batchnorm=batchnorm, fallback=per_example_fallback,
                    params=self.params, strategy=per_example_strategy, block_bytes=per_example_block_bytes,
                )
            except BaseException:  # a refused model keeps no hook of a half-built engine
                for handle in self._handles:
                    handle.remove()
                raise
        self._active = True
        self._ddp_forward_synchronises = False  # set by DDP's forward, taken by the model's
        self._group = None
        self._world: int | None = None
        if self.ddp is not None:
            self._attach_ddp(process_group)
        self._backwards = 0
        self._unscaling_checked = False
        self._backwards_last_step = 0  # where applied_norm="backward" expects a step's last backward
        self.reset()

    # -- public -----------------------------------------------------------
    def index_of(self, p: Tensor) -> int:
        try:
            return self._index_of[id(p)]
        except KeyError:
            raise KeyError("parameter is not tracked by this GradientStatistics") from None

    def reset(self) -> None:
        """Start a new step (call after ``optimizer.step()``)."""
        if self._backwards:
            self._backwards_last_step = self._backwards
        self._backwards = 0
        self._in_backward = False
        self._examples = 0  # examples of the forwards backpropagated in this step
        self._step_serial = getattr(self, "_step_serial", -1) + 1
        self._pending_forwards: list[_Forward] = []  # reached by the running backward, not yet counted
        self._repeated_forward = False
        self._backward_added = False
        self._backward_synced = False  # a forward this backward reached is one DDP averages
        self._launch_pending = False  # a synchronised backward's statistics wait for DDP's finalize
        self._vector.zero_()
        self._reduced: Tensor | None = None  # the statistics vector, summed over workers once _work is done
        self._work = None
        self._grad_sq: Tensor | None = None
        self._grad_versions: list | None = None
        self._reductions = 0
        self._backwards_at_reduction = 0
        if self.per_example is not None:
            self.per_example.reset()

    def remove(self) -> None:
        """Detach every hook; the model (and DDP) are left as they were before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.per_example is not None:
            self.per_example.remove()
        self._active = False

    def strategies(self) -> dict:
        """Parameter name -> how its per-example norms were formed, and why (``PerExampleNorms.strategies``)."""
        if self.per_example is None:
            raise RuntimeError("GradientStatistics.strategies(): built without per_example=True, no per-example norms")
        return self.per_example.strategies()

    def summary(self) -> GradientSummary:
        """Statistics of the backwards since ``reset()``; nothing is synced to host.

        n = workers x local micro-batches (sample="micro_batch") or workers
        (sample="worker"; in one process n = 1).
        """
        if self._backwards == 0:
            raise RuntimeError("GradientStatistics.summary(): no backward since reset()")
        if self._repeated_forward:
            raise RuntimeError(
                "GradientStatistics.summary(): one forward pass of the model was backpropagated in two "
                "backward passes of this step (retain_graph, a second loss on the same outputs, a "
                "gradient penalty's autograd.grad). Each backward counts as one gradient sample, so "
                "the per-sample norms would be wrong: sum the losses of one forward and call "
                "backward once."
            )
        m, world = self._backwards, self._world_size()
        sample_scale = self._micro_batch_scale(m)  # h_i = sample_scale * g^(i)
        grad_scale = sample_scale * m  # p.grad = grad_scale * gbar
        if self.sample == "micro_batch":  # A = (sum of ||h_i||^2) / a_divisor
            n = world * m
            a_divisor = sample_scale**2 * n
        else:
            n = world
            a_divisor = grad_scale**2 * n
        extra = None
        if self.ddp is None:
            B = self._mean_grad_sq(grad_scale)
            A = self._local_sq / a_divisor if self.sample == "micro_batch" else B.clone()
            num_examples: int | Tensor = self._examples
        else:
            self._check_reduced(m)
            if self._work is not None:
                self._work.wait()
            K = len(self.params)
            sums, extra = self._reduced[:K], self._reduced[K:]
            num_examples = extra[-1]
            B = self._mean_grad_sq(grad_scale)
            A = sums / a_divisor
            self._work = None  # done; do not hold the collective past the step
        example_norm_mean = example_sq_norm_mean = None
        if self.per_example is not None:
            per_example_scale = m if self.accumulation == "mean" else 1
            if extra is None:
                norm_sum, sq_sum, count = self.per_example.accumulators()
                num_examples = count
            else:
                K = len(self.params)
                norm_sum, sq_sum = extra[:K], extra[K : 2 * K]
            example_norm_mean = norm_sum.to(self._dtype) * per_example_scale / num_examples
            example_sq_norm_mean = sq_sum.to(self._dtype) * per_example_scale**2 / num_examples
        if not self._unscaling_checked:  # the first summary only: one host read
            self._unscaling_checked = True
            if self.grad_scaler is None and self.applied_norm != "summary":
                warn_if_unscaled(B, grad_scale, self._read_grad_sq().sum())
        return GradientSummary(
            n=n,
            sample_sq_norm_mean=A,
            mean_grad_sq_norm=B,
            num_examples=num_examples,
            example_norm_mean=example_norm_mean,
            example_sq_norm_mean=example_sq_norm_mean,
            grad_scale=grad_scale,
            loss_scale=loss_scale(self.grad_scaler),
        )

    # -- hooks --------------------------------------------------------------
    def _grad_hook(self, k: int):
        slot = self._backward_slots[k]
        per_micro_batch = self.sample == "micro_batch"

        def hook(grad: Tensor) -> None:
            if not self._in_backward:
                self._start_backward()
            if per_micro_batch:
                sq_norm_into(grad, slot)

        return hook

    def _local_grad_hook(self, k: int):
        """sample="worker" under DDP: ||p.grad||^2 as AccumulateGrad leaves it, this worker's own.

        A post-accumulate-grad hook runs before DDP's reducer hook on the same
        node copies the gradient into its bucket (and, with
        ``gradient_as_bucket_view``, divides it there). Every backward
        overwrites the slot, so the synchronised one leaves the whole local
        accumulation; a parameter it does not reach keeps its earlier value,
        which is still its p.grad.
        """
        slot = self._local_slots[k]

        def hook(param: Tensor) -> None:
            sq_norm_into(param.grad, slot)

        return hook

    def _start_backward(self) -> None:
        """The first parameter gradient of a backward pass arrived."""
        self._in_backward = True
        self._backwards += 1
        self._backward_added = False
        self._backward_synced = False
        if self.sample == "micro_batch":
            self._backward_sq.zero_()  # parameters this backward does not reach add 0
        torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    def _end_backward(self) -> None:
        """The backward's graph has run: every norm of it is taken."""
        self._count_forwards()
        self._in_backward = False
        if self.sample == "micro_batch" and not self._backward_added:  # this backward's norms, added once
            self._local_sq.add_(self._backward_sq)
            self._backward_added = True
        if self.ddp is None:
            self._snapshot_grad_sq_norms()
            return
        if self._backward_synced:
            self._reductions += 1
            self._backwards_at_reduction = self._backwards
            self._synced_once = True
            self._launch_pending = True
            if may_launch_before_finalize(self.ddp, self._group):
                self._launch_statistics()
        # Queued now, this runs after DDP's own end-of-backward callback, which
        # waits for the gradient reductions and writes the averaged gradients
        # into p.grad.
        torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        """Under DDP, after its finalize: p.grad holds the averaged gradient."""
        if self._backwards_at_reduction != self._backwards:
            return  # a no_sync backward: p.grad is local, not the applied gradient
        if self._launch_pending:
            self._launch_statistics()  # held back for a comm hook's collectives
        self._snapshot_grad_sq_norms()

    def _snapshot_grad_sq_norms(self) -> None:
        """||p.grad||^2 as the backward left it, on the same scale as the hook norms.

        Taken here rather than in summary(): by then a GradScaler may have
        unscaled p.grad (or clipping rescaled it) while the per-sample norms
        still carry the loss scale; A/B must compare like with like.
        """
        # In one process a backward is not known to be the step's last; one
        # expected to be followed by another (fewer than the previous step's
        # count) is not read: it would be superseded, and summary() can still
        # read an unchanged p.grad. Under DDP only the last backward gets here.
        deferred = self.applied_norm == "summary" or (
            self.applied_norm == "backward" and self.ddp is None and self._backwards < self._backwards_last_step
        )
        if deferred:
            self._grad_sq, self._grad_versions = None, _grad_versions(self.params)
        else:
            self._grad_sq, self._grad_versions = self._read_grad_sq(), None

    def _mean_grad_sq(self, grad_scale: float) -> Tensor:
        """B: ||p.grad||^2 on the scale of the mean gradient, a new tensor (callers may keep or edit it)."""
        grad_sq = self._applied_grad_sq()
        if grad_scale != 1.0:
            return grad_sq / grad_scale**2
        return grad_sq.clone() if grad_sq is self._grad_sq else grad_sq  # the kept one, or read just now

    def _applied_grad_sq(self) -> Tensor:
        if self._grad_sq is not None:
            return self._grad_sq
        if self._grad_versions is None:
            raise RuntimeError("GradientStatistics.summary(): the last backward did not complete")
        if _grad_versions(self.params) != self._grad_versions:
            if self.applied_norm == "summary":
                raise RuntimeError(
                    "p.grad was changed in place after the last backward (GradScaler.unscale_, "
                    "gradient clipping?), so B would not match A; use applied_norm='backward'"
                )
            raise RuntimeError(
                f"p.grad was changed in place after the last backward (GradScaler.unscale_, gradient "
                f"clipping?) in a step of {self._backwards} backwards, fewer than the previous step's "
                f"{self._backwards_last_step}, after which applied_norm='backward' reads ||p.grad||^2; "
                "use applied_norm='every_backward' when the number of micro-batches per step varies"
            )
        return self._read_grad_sq()

    def _read_grad_sq(self) -> Tensor:
        """||p.grad||^2 of the tracked parameters (a missing gradient counts as 0)."""
        return sq_norms([p.grad for p in self.params], self._dtype, self._device)

    def _watch_forward(self, module, args, kwargs, output) -> None:
        """Count this forward's examples when, and only if, a backward reaches its outputs.

        A forward whose outputs are not backpropagated (logging, evaluation
        with grad enabled) adds nothing; the count follows the gradient, as
        the norms do. The hook sits on the outputs' autograd nodes, which
        later in-place edits of the outputs do not remove.
        """
        synced, self._ddp_forward_synchronises = self._ddp_forward_synchronises, False
        if not torch.is_grad_enabled():
            return
        if isinstance(output, Tensor):  # the usual case, without pytree
            nodes = [output.grad_fn] if output.grad_fn is not None else []
        else:
            unique = {}
            for leaf in tree_leaves(output):
                if isinstance(leaf, Tensor) and leaf.grad_fn is not None:
                    unique.setdefault(id(leaf.grad_fn), leaf.grad_fn)
            nodes = list(unique.values())
        if nodes:
            forward = _Forward(first_batch_size(args, kwargs), synced, self._weak_self)
            for node in nodes:
                node.register_prehook(forward)

    def _forward_reached(self, forward: "_Forward") -> None:
        if forward in self._pending_forwards:
            return  # another output of the same forward, same backward
        if not self._pending_forwards:
            torch.autograd.Variable._execution_engine.queue_callback(self._count_forwards)
        self._pending_forwards.append(forward)

    def _count_forwards(self) -> None:
        """Add the examples of the forwards the running backward reached, if it reached parameters.

        A backward that reaches the model's outputs but none of its
        parameters (the gradient with respect to the inputs only, as in
        adversarial training) is not a gradient sample; its forwards stay
        uncounted.
        """
        if not self._pending_forwards:
            return
        if self._in_backward:
            for forward in self._pending_forwards:
                if forward.step == self._step_serial:
                    self._repeated_forward = True
                else:
                    forward.step = self._step_serial
                    self._examples += forward.examples
                self._backward_synced = self._backward_synced or forward.synced
        self._pending_forwards = []

    def _micro_batch_scale(self, m: int) -> float:
        scale = 1.0 / m if self.accumulation == "mean" else 1.0
        if self.loss_reduction == "sum":
            if self._examples <= 0:
                raise RuntimeError(
                    "loss_reduction='sum' needs the micro-batch size, but no batched tensor "
                    "reached the model's forward"
                )
            scale *= self._examples / m
        return scale

    # -- DDP --------------------------------------------------------------------
    def _attach_ddp(self, process_group) -> None:
        ddp = self.ddp
        self._group = process_group if process_group is not None else ddp.process_group
        if self.sample == "worker":
            self._handles += [p.register_post_accumulate_grad_hook(self._local_grad_hook(k)) for k, p in enumerate(self.params)]
        self._synced_once = False
        self._handles.append(ddp.register_forward_pre_hook(self._on_ddp_forward))

    def _world_size(self) -> int:
        if self.ddp is None:
            return 1
        if self._world is None:
            self._world = dist.get_world_size(self._group)
        return self._world

    def _launch_statistics(self) -> None:
        """All-reduce the step's statistics vector (ddp.py says when); summary() waits."""
        self._launch_pending = False
        self._reduced = self._statistics_vector().clone()  # reduced in place; the local sums stay local
        self._work = all_reduce_sum(self._group, self._reduced)

    def _statistics_vector(self) -> Tensor:
        """Every statistic of the step in one vector: sample sums, per-example sums, examples."""
        if self.per_example is None:
            self._examples_entry.fill_(float(self._examples))
            return self._vector
        K = len(self.params)
        # PerExampleNorms combines a backward's layer uses in its own
        # end-of-backward callback, whose order relative to this one is not
        # guaranteed; every output gradient is there by now, so flush them.
        self.per_example.flush()
        norm_sum, sq_sum, count = self.per_example.accumulators()
        self._vector[K : 2 * K].copy_(norm_sum)
        self._vector[2 * K : 3 * K].copy_(sq_sum)
        self._vector[-1:].copy_(count.reshape(1))
        return self._vector

    def _check_reduced(self, m: int) -> None:
        if self._reduced is None:
            raise RuntimeError(
                "no synchronised backward since reset(): under DDP the step's last backward must "
                "run outside no_sync() (gradients and statistics are reduced there)"
            )
        if self._backwards_at_reduction != m:
            raise RuntimeError(
                "a backward ran under no_sync() after the last synchronised backward; its gradient "
                "was not averaged across workers"
            )
        if self.sample == "worker" and self._reductions > 1:
            raise RuntimeError(
                "sample='worker' needs one synchronised backward per step (accumulate the other "
                f"micro-batches under no_sync()); this step synchronised {self._reductions} times"
            )

    def _on_ddp_forward(self, module, args) -> None:
        """DDP's forward begins: note whether it will average this forward's backward.

        The model's own forward hook takes the note; a forward of the model
        called outside DDP's finds none, and its backward is local.
        """
        ddp = self.ddp
        self._ddp_forward_synchronises = forward_synchronises(ddp)
        first_synced = self._synced_once or getattr(ddp, "_static_graph_delay_allreduce_enqueued", False)
        if ddp.static_graph and not ddp.require_backward_grad_sync and not first_synced:
            raise RuntimeError(
                "DistributedDataParallel(static_graph=True) cannot start with a no_sync() "
                "micro-batch (PyTorch issue 143580: the reducer asserts in backward). Make the "
                "first micro-batch of training a synchronised one, or use static_graph=False."
            )


class _Forward:
    """One forward pass of the model: its examples, whether DDP will average its backward,
    the step whose count includes them, and the pre-hook of its outputs' autograd nodes
    (a backward reached it)."""

    __slots__ = ("examples", "synced", "step", "engine")

    def __init__(self, examples: int, synced: bool, engine: weakref.ref):
        self.examples, self.synced, self.step, self.engine = examples, synced, -1, engine

    def __call__(self, grad_outputs) -> None:
        engine = self.engine()
        if engine is not None and engine._active:
            engine._forward_reached(self)


def _grad_versions(params: list[Tensor]) -> list:
    """Identity and in-place version counter of each p.grad (detects later modification)."""
    return [None if p.grad is None else (id(p.grad), p.grad._version) for p in params]


def _refuse_sharded(model: nn.Module, params: list[Tensor]) -> None:
    """Norms of shards are partial norms: refuse rather than report wrong numbers (stats.md)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without distributed support has neither
        return
    if isinstance(model, FullyShardedDataParallel) or any(isinstance(p, DTensor) for p in params):
        raise ValueError(
            "model: sharded parameters (FSDP / DTensor) are not supported; per-layer norms of "
            "shards are partial norms. Use DistributedDataParallel or a single process."
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _unique_trainable(params) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if isinstance(p, tuple):  # named_parameters()
            p = p[1]
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
