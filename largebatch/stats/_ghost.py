"""Norms of per-example gradients given in factored form ("ghost norms"), shared by the layer rules.

A *use* is one call of a layer seen in one backward pass. Its rule
(:mod:`largebatch.stats.layers`) gives, for each of the layer's parameters,
the per-example gradient in one of two representations:

* :class:`Factored` -- the per-example gradient of a weight matrix is
  ``L_i^T R_i`` (``L_i``: T x m, ``R_i``: T x n), never materialised. Linear
  layers (``L = dLoss/dOutput``, ``R = input``), convolutions per group
  (``L = G^T``, ``R = unfold(x)^T``) and embeddings (``L = one_hot(ids)``,
  ``R = dLoss/dOutput``) have this form.
* a dense tensor ``(B, *param.shape)`` -- biases, norm affine parameters and the
  torch.func fallback, where the per-example gradient is small or unavoidable.

Squared norms of factored gradients come from one of three strategies, all
exact (:mod:`largebatch.stats.strategy` chooses per layer):

* ``"ghost"``, the Gram form ``||L^T R||^2 = <L L^T, R R^T>``, O(T^2 (m + n)),
  Goodfellow 2015 (arXiv 1510.01799) for T = 1, Li et al. 2021
  (arXiv 2110.05679) for sequences and convolutions;
* ``"bmm"``, the per-example gradients ``L_i^T R_i`` materialised by a batched
  matrix product, O(T m n) (for convolutions after unfold / im2col);
* ``"conv-backward"`` (convolutions only), the per-example gradients from the
  convolution's own weight-gradient kernel with the examples as extra groups.

Each runs over blocks of examples whose intermediates fit ``block_bytes``
(``examples_per_block``), so a micro-batch of any size holds a bounded
amount of per-example work at a time. For Linear layers on sequences the
materialised form can also replace autograd's weight gradient
(``summed_direct``: the per-example gradients are summed into it), which
makes it cheaper than Gram far more often
(``layers.linear.prefers_summed_direct``). Uses of one parameter are combined
exactly through the inner products
``<L_u^T R_u, L_v^T R_v> = <L_u L_v^T, R_u R_v^T>``.

Everything stays on the tensors' device; nothing here synchronises with the host.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BLOCK_BYTES",
    "Factored",
    "examples_per_block",
    "ghost_sq_norms",
    "sq_norms_by",
    "Use",
    "compute_dtype",
    "gram_sq_norms",
    "summed_direct",
    "prefers_gram",
    "sq_norm",
    "row_sq_norms",
    "inner",
    "combined_sq_norm",
]


@dataclass
class Factored:
    """Per-example gradient ``L_i^T R_i`` of a (groups * m) x n weight matrix.

    ``left`` is (B * groups, T, m), or ``None`` when ``L`` is the one-hot matrix
    of ``ids`` (B, T) over ``m`` rows (embeddings). ``right`` is
    (B * groups, T, n). Group ``j`` of example ``i`` sits at row ``i * groups + j``
    and owns weight rows ``j*m .. (j+1)*m``.
    """

    left: Tensor | None
    right: Tensor
    m: int
    groups: int = 1
    ids: Tensor | None = None

    @property
    def batch(self) -> int:
        return self.right.shape[0] // self.groups

    @property
    def length(self) -> int:
        return self.right.shape[1]

    @property
    def n(self) -> int:
        return self.right.shape[2]

    @property
    def tensor(self) -> Tensor:
        """A tensor of the use's device and dtype, at no cost."""
        return self.right

    #: the strategies exact for this use (see the module docstring)
    strategies = ("ghost", "bmm")
    #: entries an unfold adds per example and group before the Gram or bmm form (convolutions)
    unfolded = 0
    #: the parameter name this use belongs to, for the record of choices (set by the engine)
    layer: str | None = None

    def direct(self) -> Tensor:
        """Per-example gradients (B * groups, m, n)."""
        return torch.bmm(self.left.transpose(1, 2), self.right)

    def materialise(self, strategy: str) -> Tensor:
        """Per-example gradients (B * groups, m, n) by ``strategy`` (``"bmm"`` here)."""
        return self.direct()

    def select(self, start: int, stop: int) -> "Factored":
        """The use restricted to examples ``start .. stop``."""
        g = self.groups
        rows = slice(start * g, stop * g)
        return Factored(
            left=None if self.left is None else self.left[rows], right=self.right[rows], m=self.m,
            groups=g, ids=None if self.ids is None else self.ids[start:stop],
        )

    def signature(self) -> tuple:
        """What the cost of a strategy depends on besides the batch, dtype and device."""
        return (type(self).__name__, self.length, self.m, self.n, self.groups)


Use = Factored | Tensor


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    # Half precision sums of squares over many terms lose too much.
    return torch.promote_types(dtype, torch.float32)


# ------------------------------------------------------------------- norms


def _per_example(values: Tensor, groups: int) -> Tensor:
    """Sum (B * groups, ...) values to (B,)."""
    return values.reshape(-1, groups, *values.shape[1:]).flatten(1).sum(1)


def row_sq_norms(t: Tensor) -> Tensor:
    """Squared norm of each example's slice, (B,), in at least float32.

    ``t`` is (B, *shape); ``shape`` may be empty (a 0-dim parameter such as a
    learnable temperature), where ``flatten(1)`` would fail.
    """
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1, dtype=compute_dtype(t)).square()


_sq = row_sq_norms


def _embedding_sq_norm(ids: Tensor, g: Tensor) -> Tensor:
    """sum_v ||sum_{t: id_t = v} g_t||^2 by segment sums: sort, then index_add (O(B T D))."""
    batch, length = ids.shape
    sorted_ids, order = ids.sort(dim=1)
    starts = torch.ones_like(sorted_ids, dtype=torch.long)
    starts[:, 1:] = (sorted_ids[:, 1:] != sorted_ids[:, :-1]).long()
    offsets = torch.arange(batch, device=ids.device).unsqueeze(1) * length
    segment = torch.empty_like(order).scatter_(1, order, starts.cumsum(1) - 1 + offsets)
    sums = g.new_zeros(batch * length, g.shape[-1])
    sums.index_add_(0, segment.reshape(-1), g.reshape(batch * length, -1))
    return _sq(sums.reshape(batch, -1))


def _gram_inner(l1: Tensor, l2: Tensor, r1: Tensor, r2: Tensor) -> tuple[Tensor, Tensor]:
    """(<L1 L2^T, R1 R2^T>, sum of the entries of L1 L2^T) per row of the batch."""
    left_gram = torch.bmm(l1, l2.transpose(1, 2))
    product = left_gram * torch.bmm(r1, r2.transpose(1, 2))
    return product.flatten(1).sum(1), left_gram.flatten(1).sum(1)


def gram_sq_norms(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """(<L L^T, R R^T>, ||sum_t L_t||^2 = sum of the entries of L L^T).

    Uses the symmetry: with positions split in halves 1 and 2 each is
    <11> + <22> + 2 <12>, three quarters of the multiply-adds of the full Gram
    matrices. For contiguous inputs blocks 11 and 22 come from one batched
    product over the (B, T) -> (2B, T/2) view, four products a layer instead
    of six (6% less time for a transformer's layers, timed alone; splitting further into
    quarters saves multiply-adds but loses more to the smaller matrices).
    The second value is a Linear layer's bias norm, for free.
    """
    batch, length = left.shape[0], left.shape[1]
    half = length // 2
    if half < 16:  # small matrices: one kernel call beats the saving
        return _gram_inner(left, left, right, right)
    l1, l2, r1, r2 = left[:, :half], left[:, half:], right[:, :half], right[:, half:]
    w12, b12 = _gram_inner(l1, l2, r1, r2)
    if length % 2 == 0 and left.is_contiguous() and right.is_contiguous():
        pairs_l, pairs_r = left.view(2 * batch, half, -1), right.view(2 * batch, half, -1)
        w_diagonal, b_diagonal = (t.view(batch, 2).sum(1) for t in _gram_inner(pairs_l, pairs_l, pairs_r, pairs_r))
    else:  # an odd length (block 22 one row longer) or a strided input
        (w11, b11), (w22, b22) = _gram_inner(l1, l1, r1, r1), _gram_inner(l2, l2, r2, r2)
        w_diagonal, b_diagonal = w11 + w22, b11 + b22
    return w_diagonal + 2 * w12, b_diagonal + 2 * b12


# Default bound on the per-example intermediates of one layer call held at a time
# (Gram matrices, unfolded inputs, materialised per-example gradients): 64 MiB.
BLOCK_BYTES = 64 << 20


def per_example_elements(use: "Factored", strategy: str) -> int:
    """Entries of the intermediates one example needs under ``strategy`` (all its groups).

    ghost: two T x T Gram matrices (and the unfolded input of a convolution);
    bmm: the m x n gradient (and the unfolded input); conv-backward: the m x n
    gradient.
    """
    t, m, n = use.length, use.m, use.n
    per_group = {"ghost": 2 * t * t + use.unfolded, "bmm": m * n + use.unfolded, "conv-backward": m * n}[strategy]
    return use.groups * per_group


def examples_per_block(use: "Factored", strategy: str, block_bytes: int) -> int:
    """Examples per block so that a block's intermediates take at most ``block_bytes`` (at least 1)."""
    size = torch.promote_types(use.tensor.dtype, torch.float32).itemsize
    return max(1, block_bytes // (per_example_elements(use, strategy) * size))


def _blocks(batch: int, step: int):
    return ((start, min(start + step, batch)) for start in range(0, batch, step))


def ghost_sq_norms(use: "Factored", block_bytes: int = BLOCK_BYTES) -> tuple[Tensor, Tensor]:
    """(||L_i^T R_i||^2, ||sum_t L_it||^2) per example by the Gram form, a block of examples at a time."""
    step = examples_per_block(use, "ghost", block_bytes)
    if step >= use.batch:
        w, b = gram_sq_norms(use.left, use.right)
        return _per_example(w, use.groups), _per_example(b, use.groups)
    parts = [ghost_sq_norms(use.select(start, stop), block_bytes) for start, stop in _blocks(use.batch, step)]
    return torch.cat([w for w, _ in parts]), torch.cat([b for _, b in parts])


def sq_norms_by(use: "Factored", strategy: str, block_bytes: int = BLOCK_BYTES) -> Tensor:
    """Per-example squared norms (B,) of a factored use by ``strategy``, a block of examples at a time."""
    if strategy == "ghost":
        return ghost_sq_norms(use, block_bytes)[0]
    step = examples_per_block(use, strategy, block_bytes)
    if step >= use.batch:
        return _per_example(_sq(use.materialise(strategy)), use.groups)
    return torch.cat([
        _per_example(_sq(use.select(start, stop).materialise(strategy)), use.groups)
        for start, stop in _blocks(use.batch, step)
    ])


# An example block of per-example gradients of at most this size stays in cache
# while it is summed and measured (2 MB measured fastest for 512 x 128 weights).
_BLOCK_BYTES = 2 << 20


def summed_direct(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """The weight gradient ``sum_i L_i^T R_i`` and each ``||L_i^T R_i||^2``, from the per-example gradients.

    ``left`` (B, T, m), ``right`` (B, T, n). Formed for a block of examples at
    a time, the per-example gradients cost the batch gradient's multiply-adds,
    so in place of autograd's weight gradient the norms cost only the
    memory traffic of the blocks. Differentiable in the gradient (for
    ``create_graph=True``); the norms are not.
    """
    batch, _, m = left.shape
    n = right.shape[2]
    step = max(1, _BLOCK_BYTES // (m * n * left.element_size()))
    dtype = compute_dtype(left, right)  # half precision sums across blocks in float32, rounded once
    sq = torch.empty(batch, dtype=dtype, device=left.device)
    total = None
    for start in range(0, batch, step):
        block = torch.bmm(left[start : start + step].transpose(1, 2), right[start : start + step])
        part = block.sum(0, dtype=dtype)
        total = part if total is None else total.add_(part)
        sq[start : start + step] = torch.linalg.vector_norm(block.detach().flatten(1), dim=1, dtype=dtype)
    return total.to(left.dtype), sq.square_()


def prefers_gram(f: Factored) -> bool:
    """Gram form when 2 T^2 <= m n (fastDP / private_vision's mixed ghost norm, Bu et al. 2022)."""
    return 2 * f.length * f.length <= f.m * f.n


_LABELS = {"ghost": "gram", "bmm": "direct", "conv-backward": "direct"}


def _rule_strategy(use: Factored) -> str:
    return "ghost" if prefers_gram(use) else use.strategies[-1]


def sq_norm(use: Use, choose=None, block_bytes: int = BLOCK_BYTES) -> tuple[Tensor, str]:
    """Per-example squared norms (B,) of one use, and the method's name ("gram" or "direct" for factored uses).

    ``choose(use) -> strategy`` picks the strategy of a factored use with more
    than one position (default: the Gram form when ``prefers_gram``).
    """
    if isinstance(use, Tensor):
        return _sq(use), "direct"
    if use.ids is not None:
        return _embedding_sq_norm(use.ids, use.right), "embedding"
    if use.length == 1:  # one position: ||g||^2 ||a||^2 (Goodfellow 2015)
        return _per_example(_sq(use.left) * _sq(use.right), use.groups), "linear-outer"
    strategy = (choose or _rule_strategy)(use)
    return sq_norms_by(use, strategy, block_bytes), _LABELS[strategy]


def _dense(use: Use) -> Tensor:
    """Materialise a use's per-example gradient as (B, numel)."""
    if isinstance(use, Tensor):
        return use.reshape(use.shape[0], -1)  # (B,) for a 0-dim parameter
    batch = use.batch
    if use.ids is not None:
        n = use.right.shape[-1]
        out = use.right.new_zeros(batch, use.m, n)
        out.scatter_add_(1, use.ids.unsqueeze(-1).expand(-1, -1, n), use.right)
        return out.flatten(1)
    return use.direct().reshape(batch, -1)


def _left_gram(u: Factored, v: Factored) -> Tensor:
    """L_u L_v^T (B*groups, T_u, T_v), without forming one-hot matrices."""
    if u.ids is not None and v.ids is not None:
        return (u.ids.unsqueeze(2) == v.ids.unsqueeze(1)).to(u.right.dtype)
    if u.ids is not None:  # [t, s] = L_v[s, id_t]
        index = u.ids.unsqueeze(1).expand(-1, v.left.shape[1], -1)
        return v.left.gather(2, index).transpose(1, 2)
    if v.ids is not None:
        return _left_gram(v, u).transpose(1, 2)
    return torch.bmm(u.left, v.left.transpose(1, 2))


def inner(u: Use, v: Use) -> Tensor:
    """Per-example <grad_u, grad_v> (B,), exact for every pair of representations."""
    if isinstance(u, Factored) and isinstance(v, Factored) and u.groups == v.groups:
        gram = _left_gram(u, v) * torch.bmm(u.right, v.right.transpose(1, 2))
        return _per_example(gram.flatten(1).sum(1), u.groups)
    return (_dense(u) * _dense(v)).sum(1)


def combined_sq_norm(uses: list[Use], measure=sq_norm, labels: list[str | None] | None = None) -> tuple[Tensor, str]:
    """||sum_u grad_u||^2 = sum_u ||grad_u||^2 + 2 sum_{u<v} <grad_u, grad_v>, per example.

    ``measure(use) -> (sq, name)`` gives each use's own squared norms;
    ``labels`` overrides the method names reported for dense uses.
    """
    total, names = None, []
    for u, label in zip(uses, labels or [None] * len(uses)):
        sq, name = measure(u)
        total = sq if total is None else total + sq
        names.append(label or name)
    for u, v in itertools.combinations(uses, 2):
        total = total + 2 * inner(u, v)
    return total, "+".join(names)
