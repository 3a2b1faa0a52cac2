"""Run-directory files: metrics.jsonl, layers.jsonl, config.json, summary.json.

Only rank 0 writes. Each JSONL record carries the global step it belongs to,
so that a resumed run can drop what was logged after its checkpoint and the
files read as if the run had never stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..records import read_jsonl


def truncate_after(path: Path, step: int) -> None:
    """Keep only the records of steps <= ``step`` (what a checkpoint at ``step`` has seen)."""
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


class JsonlLog:
    """Append-only JSONL, flushed per record so a crash loses at most the current line."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self._file = open(path, "a") if enabled else None  # noqa: SIM115 - closed in close()

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoard:
    """Scalars to TensorBoard when the package is installed and asked for; otherwise nothing."""

    def __init__(self, run_dir: Path, enabled: bool):
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(run_dir / "tensorboard"))

    def scalars(self, record: dict, step: int) -> None:
        if self._writer is None:
            return
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                self._writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def tensorboard_installed() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


# -- per-layer introspection -----------------------------------------------------

def layer_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def layer_record(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, dict[str, float]]:
    """Per-layer values the optimiser exposes after its step, as {quantity: {layer: value}}.

    Read generically from the ``last_<quantity>`` attributes, in the two
    conventions of :mod:`largebatch.optim`: one 1-D tensor per parameter group
    over the group's parameters that had a gradient (LARS, LAMB), or one
    vector over ``last_params`` (CLARS, LENA, AdaScale); a 0-d value per group
    applies to all its parameters and a 0-d value alone is recorded as
    ``{"model": value}``. Also ``warmup_end`` when the optimiser offers
    ``warmup_ends()`` (LENA), and the effective rate (``last_effective_lr``,
    ``effective_lrs()`` or the group's rate). One host transfer per quantity.
    """
    stepped = [[p for p in group["params"] if p.grad is not None] for group in optimizer.param_groups]
    flat = list(getattr(optimizer, "last_params", None) or [])
    out: dict[str, dict[str, float]] = {}
    for attr in sorted(dir(optimizer)):
        if not attr.startswith("last_") or attr in ("last_params", "last_epoch"):
            continue
        values = _layer_values(getattr(optimizer, attr, None), stepped, flat, names)
        if values:
            out[attr[len("last_"):]] = values
    if "effective_lr" not in out:
        rates = optimizer.effective_lrs() if callable(getattr(optimizer, "effective_lrs", None)) else [
            torch.tensor(float(group["lr"])) for group in optimizer.param_groups
        ]
        out["effective_lr"] = _layer_values(rates, stepped, flat, names)
    if callable(getattr(optimizer, "warmup_ends", None)):
        every = [p for group in optimizer.param_groups for p in group["params"]]
        out["warmup_end"] = _named(every, optimizer.warmup_ends(), names)
    return out


def _named(params: list, tensor: torch.Tensor, names: dict[int, str]) -> dict[str, float]:
    values = tensor.detach().double().cpu().reshape(-1).tolist()
    return {names.get(id(p), f"param{i}"): v for i, (p, v) in enumerate(zip(params, values))}


def _layer_values(value, stepped: list[list], flat: list, names: dict[int, str]) -> dict[str, float]:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return {"model": float(value)}
        if value.dim() == 1 and flat and value.numel() == len(flat):
            return _named(flat, value, names)
        return {}
    if isinstance(value, (list, tuple)) and len(value) == len(stepped) and any(
        isinstance(v, torch.Tensor) for v in value
    ):
        out: dict[str, float] = {}
        for params, tensor in zip(stepped, value):
            if not isinstance(tensor, torch.Tensor) or not params:
                continue
            if tensor.numel() == 1:
                tensor = tensor.reshape(1).expand(len(params))
            if tensor.numel() == len(params):
                out.update(_named(params, tensor, names))
        return out
    return {}
