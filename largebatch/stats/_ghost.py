"""Per-example gradient formulas for one use of a layer ("ghost norms").

A *use* is one call of a layer seen in one backward pass. It yields, for each of
the layer's parameters, the per-example gradient in one of two representations:

* :class:`Factored` -- the per-example gradient of a weight matrix is
  ``L_i^T R_i`` (``L_i``: T x m, ``R_i``: T x n), never materialised. Linear
  layers (``L = dLoss/dOutput``, ``R = input``), convolutions per group
  (``L = G^T``, ``R = unfold(x)^T``) and embeddings (``L = one_hot(ids)``,
  ``R = dLoss/dOutput``) have this form.
* a dense tensor ``(B, *param.shape)`` -- biases, norm affine parameters and the
  torch.func fallback, where the per-example gradient is small or unavoidable.

Squared norms of factored gradients use, per layer, the cheaper of

* the Gram ("ghost") form ``||L^T R||^2 = <L L^T, R R^T>``, O(T^2 (m + n)),
  Goodfellow 2015 (arXiv 1510.01799) for T = 1, Li et al. 2021
  (arXiv 2110.05679) for sequences, and
* the direct form ``||L^T R||^2`` with ``L^T R`` formed per example, O(T m n)
  (for convolutions by the convolution's own weight-gradient kernel with the
  examples as extra groups, not by unfold + bmm),

choosing Gram when ``2 T^2 <= m n`` ("mixed ghost norm", Bu et al. 2022,
arXiv 2210.00038). For Linear layers on sequences the direct form can also
replace autograd's weight gradient (``summed_direct``: the per-example
gradients are summed into it), which makes it cheaper than Gram far more
often (``prefers_summed_direct``). Uses of one parameter are combined
exactly through the inner products
``<L_u^T R_u, L_v^T R_v> = <L_u L_v^T, R_u R_v^T>``.

Everything stays on the tensors' device; nothing here synchronises with the host.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Factored",
    "Use",
    "linear_uses",
    "linear_sq_norms",
    "summed_direct",
    "prefers_summed_direct",
    "conv_uses",
    "embedding_uses",
    "norm_affine_uses",
    "batch_norm_uses",
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

    def direct(self) -> Tensor:
        """Per-example gradients (B * groups, m, n)."""
        return torch.bmm(self.left.transpose(1, 2), self.right)


class ConvFactored(Factored):
    """A convolution's use: ``right`` (the unfolded input) is built only if needed.

    The direct form runs the convolution's own weight-gradient kernel once with
    the examples as extra groups, which is much faster than unfold + bmm.
    """

    def __init__(self, module: nn.modules.conv._ConvNd, x: Tensor, g: Tensor, padding: tuple[int, ...]):
        self.module, self.x, self.g, self.padding = module, x, g, padding  # g: (B, C_out, *S')
        self.groups = module.groups
        self.m = g.shape[1] // self.groups
        self.ids = None
        self._right = None

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def length(self) -> int:
        return math.prod(self.g.shape[2:])

    @property
    def n(self) -> int:
        return math.prod(self.module.weight.shape[1:])

    @property
    def left(self) -> Tensor:
        return self.g.reshape(self.batch * self.groups, self.m, -1).transpose(1, 2)

    @property
    def right(self) -> Tensor:
        if self._right is None:
            module = self.module
            cols = unfold_nd(self.x, module.kernel_size, module.dilation, self.padding, module.stride)
            self._right = cols.reshape(self.batch * self.groups, self.n, -1).transpose(1, 2)
        return self._right

    def direct(self) -> Tensor:
        batch, module = self.batch, self.module
        nd = self.x.dim() - 2
        weight_shape = (batch * self.g.shape[1], *module.weight.shape[1:])
        grads = torch.ops.aten.convolution_backward(
            self.g.reshape(1, -1, *self.g.shape[2:]),
            self.x.reshape(1, -1, *self.x.shape[2:]),
            self.g.new_empty(()).expand(weight_shape),  # only its shape is read
            None, module.stride, self.padding, module.dilation, False, (0,) * nd,
            batch * self.groups, (False, True, False),
        )[1]
        return grads.reshape(batch * self.groups, self.m, self.n)


Use = Factored | Tensor


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    # Half precision sums of squares over many terms lose too much.
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------- layer uses


def linear_uses(a: Tensor, g: Tensor, has_bias: bool) -> tuple[Factored, Tensor | None]:
    """Linear ``y = a W^T + b`` with input (B, ..., n): dW_i = G_i^T A_i, db_i = sum_t g_it."""
    dtype = _compute_dtype(a, g)
    batch = a.shape[0]
    a = a.reshape(batch, -1, a.shape[-1]).to(dtype)
    g = g.reshape(batch, -1, g.shape[-1]).to(dtype)
    bias = g.sum(1) if has_bias else None
    return Factored(left=g, right=a, m=g.shape[-1]), bias


def _conv_padding(module: nn.modules.conv._ConvNd, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """Apply non-zero padding modes and string paddings ahead of the unfold."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return x, tuple(module.padding)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    return x, (0,) * (x.dim() - 2)


def unfold_nd(x: Tensor, kernel: tuple, dilation: tuple, padding: tuple, stride: tuple) -> Tensor:
    """im2col for 1-, 2- and 3-d inputs: (B, C, *S) -> (B, C * prod(kernel), L).

    The column order (channel-major, then kernel position) matches
    ``weight.reshape(C_out, -1)``.
    """
    nd = x.dim() - 2
    if nd == 2:
        return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    if nd == 1:
        return F.unfold(
            x.unsqueeze(2), (1, kernel[0]), dilation=(1, dilation[0]),
            padding=(0, padding[0]), stride=(1, stride[0]),
        )
    # F.unfold is 2-d only: gather one strided slice per kernel offset.
    pad = [p for p in reversed(padding) for _ in range(2)]
    x = F.pad(x, pad)
    sizes = [
        (x.shape[2 + d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in range(nd)
    ]
    slices = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = [slice(None), slice(None)]
        for d in range(nd):
            start = offset[d] * dilation[d]
            index.append(slice(start, start + (sizes[d] - 1) * stride[d] + 1, stride[d]))
        slices.append(x[tuple(index)])
    cols = torch.stack(slices, dim=2)  # (B, C, K, *sizes)
    return cols.reshape(x.shape[0], -1, cols[0, 0, 0].numel())


def conv_uses(module: nn.modules.conv._ConvNd, x: Tensor, g: Tensor) -> tuple[ConvFactored, Tensor | None]:
    """Convolution per group j: dW_ij = G_ij U_ij^T with U = unfold(x) (Li et al. 2021, App. F).

    Groups are kept apart (folded into the batch dimension), so grouped and
    depthwise convolutions use only the blocks of the weight they touch.
    """
    dtype = _compute_dtype(x, g)
    x, padding = _conv_padding(module, x.to(dtype))
    g = g.to(dtype)
    bias = g.flatten(2).sum(2) if module.bias is not None else None
    return ConvFactored(module, x, g, padding), bias


def embedding_uses(module: nn.Embedding, ids: Tensor, g: Tensor) -> Factored:
    """Embedding: dE_i = one_hot(ids_i)^T G_i; rows at ``padding_idx`` get no gradient."""
    batch = ids.shape[0]
    ids = ids.reshape(batch, -1)
    g = g.reshape(batch, ids.shape[1], -1).to(_compute_dtype(g))
    if module.padding_idx is not None:
        g = g.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)
    return Factored(left=None, right=g, m=module.num_embeddings, ids=ids)


def norm_affine_uses(
    module: nn.Module, x: Tensor, g: Tensor, moments: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """LayerNorm, RMSNorm, GroupNorm: per-example gradients formed from the normalised input.

    ``moments``: a LayerNorm's (mean, rstd) from its forward, broadcastable to
    ``x``; without them the normalisation is recomputed.
    """
    weight = getattr(module, "weight", None) is not None
    bias = getattr(module, "bias", None) is not None
    batch = x.shape[0]
    dtype = _compute_dtype(x, g)
    x, g = x.to(dtype), g.to(dtype)
    if isinstance(module, nn.GroupNorm):
        xhat = F.group_norm(x, module.num_groups, None, None, module.eps)
        reduce = list(range(2, x.dim()))
        gx = g * xhat
        return (
            (gx.sum(reduce) if reduce else gx) if weight else None,
            (g.sum(reduce) if reduce else g) if bias else None,
        )
    shape = tuple(module.normalized_shape)
    if isinstance(module, nn.LayerNorm):
        if moments is not None:
            mean, rstd = moments
            xhat = (x - mean.to(dtype)) * rstd.to(dtype)
        else:
            xhat = F.layer_norm(x, shape, None, None, module.eps)
    else:
        xhat = F.rms_norm(x, shape, None, module.eps)
    flat = (batch, -1, *shape)
    return (
        (g * xhat).reshape(flat).sum(1) if weight else None,
        g.reshape(flat).sum(1) if bias else None,
    )


def batch_norm_uses(
    module: nn.modules.batchnorm._NormBase, x: Tensor, g: Tensor, stats: tuple[Tensor, Tensor] | None
) -> tuple[Tensor | None, Tensor | None]:
    """BatchNorm: example i's contribution ``sum_s g_is * xhat_is`` to the batch gradient.

    ``stats`` holds (running_mean, running_var) captured at forward time in
    eval mode, where the result is the exact per-example gradient; ``None``
    means batch statistics (train mode), where examples are coupled and the
    contributions are an approximation (they sum to the exact batch gradient).
    """
    dtype = _compute_dtype(x, g)
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


# ------------------------------------------------------------------- norms


def _per_example(values: Tensor, groups: int) -> Tensor:
    """Sum (B * groups, ...) values to (B,)."""
    return values.reshape(-1, groups, *values.shape[1:]).flatten(1).sum(1)


def row_sq_norms(t: Tensor) -> Tensor:
    """Squared norm of each example's slice, (B,), in at least float32.

    ``t`` is (B, *shape); ``shape`` may be empty (a 0-dim parameter such as a
    learnable temperature), where ``flatten(1)`` would fail.
    """
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1, dtype=_compute_dtype(t)).square()


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


def _gram_sq_norms(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
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


def linear_sq_norms(a: Tensor, g: Tensor, method: str, bias: bool) -> dict[str, tuple[Tensor, str]]:
    """Squared norms (B,) and method names for a Linear layer's weight and bias in one pass."""
    weight, _ = linear_uses(a, g, has_bias=False)
    left = weight.left
    if weight.length == 1:  # ||dW_i||^2 = ||a_i||^2 ||g_i||^2 (Goodfellow 2015)
        g_sq = _sq(left)
        out = {"weight": (g_sq * _sq(weight.right), "linear-outer"), "bias": (g_sq, "direct")}
    elif method == "gram" or (method == "auto" and prefers_gram(weight)):
        w_sq, b_sq = _gram_sq_norms(left, weight.right)
        out = {"weight": (w_sq, "gram"), "bias": (b_sq, "direct")}
    else:
        out = {"weight": (_sq(weight.direct()), "direct")}
        if bias:
            out["bias"] = (_sq(left.sum(1)), "direct")
    return out


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
    dtype = _compute_dtype(left, right)  # half precision sums across blocks in float32, rounded once
    sq = torch.empty(batch, dtype=dtype, device=left.device)
    total = None
    for start in range(0, batch, step):
        block = torch.bmm(left[start : start + step].transpose(1, 2), right[start : start + step])
        part = block.sum(0, dtype=dtype)
        total = part if total is None else total.add_(part)
        sq[start : start + step] = torch.linalg.vector_norm(block.detach().flatten(1), dim=1, dtype=dtype)
    return total.to(left.dtype), sq.square_()


def prefers_summed_direct(length: int, m: int, n: int, element_size: int) -> bool:
    """Per-example gradients in place of the weight gradient, rather than the Gram form?

    Measured on a 2-core x86 CPU (batch 32, float32): beyond the weight
    gradient the per-example blocks cost about 0.5 ns an entry while an
    example's m x n gradient fits in 512 KB (much more beyond: out of cache);
    the Gram form costs about 0.02 ns per multiply-add of ``T^2 (m + n)``.
    """
    return m * n * element_size <= 512 << 10 and 24 * m * n <= length * length * (m + n)


def prefers_gram(f: Factored) -> bool:
    """Gram form when 2 T^2 <= m n (Bu et al. 2022, mixed ghost norm)."""
    return 2 * f.length * f.length <= f.m * f.n


def sq_norm(use: Use, method: str = "auto") -> tuple[Tensor, str]:
    """Per-example squared norms (B,) of one use, and the method's name."""
    if isinstance(use, Tensor):
        return _sq(use), "direct"
    if use.ids is not None:
        return _embedding_sq_norm(use.ids, use.right), "embedding"
    if use.length == 1:  # one position: ||g||^2 ||a||^2 (Goodfellow 2015)
        return _per_example(_sq(use.left) * _sq(use.right), use.groups), "linear-outer"
    if method == "gram" or (method == "auto" and prefers_gram(use)):
        return _per_example(_gram_sq_norms(use.left, use.right)[0], use.groups), "gram"
    return _per_example(_sq(use.direct()), use.groups), "direct"


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


def combined_sq_norm(
    uses: list[Use], method: str = "auto", labels: list[str | None] | None = None
) -> tuple[Tensor, str]:
    """||sum_u grad_u||^2 = sum_u ||grad_u||^2 + 2 sum_{u<v} <grad_u, grad_v>, per example.

    ``labels`` overrides the method names reported for dense uses.
    """
    total, names = None, []
    for u, label in zip(uses, labels or [None] * len(uses)):
        sq, name = sq_norm(u, method)
        total = sq if total is None else total + sq
        names.append(label or name)
    for u, v in itertools.combinations(uses, 2):
        total = total + 2 * inner(u, v)
    return total, "+".join(names)
