"""``nn.Embedding``: dE_i = one_hot(ids_i)^T G_i, measured by segment sums over equal ids (``_ghost``).

``padding_idx`` rows get no gradient; ``scale_grad_by_freq=True`` is refused:
it scales by counts over the whole batch, so no per-example gradient exists.
"""

from __future__ import annotations

from torch import Tensor, nn

from .. import _ghost
from .base import Call, Rule

__all__ = ["EmbeddingRule", "embedding_uses"]


class EmbeddingRule(Rule):
    def refuses(self, module: nn.Module) -> bool:
        return module.scale_grad_by_freq

    def label(self, name: str) -> str | None:
        return "embedding"

    def uses(self, call: Call, x: Tensor, g: Tensor, tracked: dict[str, int]):
        return {"weight": (embedding_uses(call.module, x, g), None)}


def embedding_uses(module: nn.Embedding, ids: Tensor, g: Tensor) -> _ghost.Factored:
    """Embedding: dE_i = one_hot(ids_i)^T G_i; rows at ``padding_idx`` get no gradient."""
    batch = ids.shape[0]
    ids = ids.reshape(batch, -1)
    g = g.reshape(batch, ids.shape[1], -1).to(_ghost.compute_dtype(g))
    if module.padding_idx is not None:
        g = g.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)
    return _ghost.Factored(left=None, right=g, m=module.num_embeddings, ids=ids)
