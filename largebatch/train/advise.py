"""Batch-size advice from the gradient noise scale (McCandlish et al. 2018).

A short momentum-SGD run at batch ``B`` formed from ``n = B / m`` micro-batches
gives, each step, the per-layer statistics of :class:`largebatch.stats.
GradientStatistics`: the unbiased per-example covariance trace tr(Sigma) and
the true-gradient norm |G|^2. Numerator and denominator are averaged over the
steps separately (the paper's advice: their ratio is too noisy per step), then

    B_noise = tr(Sigma) / |G|^2      (model: sums over layers; per layer: each alone)

The paper's model of the trade-off, with S steps and E examples to a given
loss: S = S_min (1 + B_noise / B), E = E_min (1 + B / B_noise). Below about
B_noise / 2 a doubled batch still nearly halves the steps; beyond 2 B_noise
it buys little and costs nearly twice the examples.

Two ways in:

- :func:`advise` measures the caller's own model, loss and batches at its
  current parameters (no update is made; buffers such as BatchNorm's running
  statistics and ``p.grad`` are left as they were): what batch sizes pay at
  this point of training. ``advice.summary()`` (:func:`format_advice`) puts
  the result in words.
- :func:`advise_run` (``largebatch advise``) measures a built-in model either
  over a short momentum-SGD run from scratch, or, with ``checkpoint``, at the
  checkpoint of a ``largebatch train`` run, on that run's model and data.

The noise scale grows as the loss falls, so advice taken early in training
understates the batch that pays later.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import load_dataset
from ..models import build_model, check_model_name
from .loop import accumulate_gradients, batch_indices, epoch_permutation
from ..records import CONFIG, read_json, write_json
from .rundir import prepare_run_dir

PAYS, DIMINISHING, DOES_NOT_PAY = "pays (near-linear speed-up)", "diminishing returns", "does not pay"


@dataclass
class AdviseConfig:
    model: str = "mlp"
    batch: int = 1024
    micro_batch: int = 128
    steps: int = 30
    lr: float = 0.05
    seed: int = 0
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    train_limit: int | None = None
    val_size: int = 5000  # held out of the training images, as in training: advice is measured on the rest
    run_dir: str | None = None
    checkpoint: str | None = None  # a run directory or its checkpoint.pt: measure that model, no updates
    device: str | None = None
    threads: int | None = None

    def validate(self) -> None:
        from .config import check_device

        check_model_name(self.model)
        if self.micro_batch < 1 or self.batch % self.micro_batch or self.batch // self.micro_batch < 2:
            raise ValueError(
                f"--batch {self.batch} must be a multiple of --micro-batch {self.micro_batch} with at least "
                "2 micro-batches (the noise scale needs two or more gradient samples)"
            )
        if self.steps < 1:
            raise ValueError(f"--steps must be a positive integer, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive finite number, got {self.lr}")
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError(f"--train-limit must be a positive integer, got {self.train_limit}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be a positive integer, got {self.threads}")
        check_device(self.device)


@dataclass
class Advice:
    noise_scale: float  # model-level B_noise in examples (inf: the gradient is not resolved)
    layer_noise_scales: dict[str, float]
    trace_sigma: float  # per-example tr(Sigma), averaged over the measured batches
    grad_sq_norm: float  # |G|^2, averaged likewise
    batches: list[dict]  # the trade-off at powers of two
    # The largest power of two <= B_noise / 2: math.inf when every batch pays (B_noise unresolved), 0 when no
    # batch does (B_noise < 2), so that `batch <= largest_paying_batch` holds exactly for the batches that pay.
    largest_paying_batch: int | float
    batch: int  # examples per measured batch
    micro_batch: int  # examples per gradient sample
    measured_batches: int
    measured: str  # what was measured, in words
    settings: dict = field(default_factory=dict)
    paying: str = ""  # "all", "some" (up to largest_paying_batch) or "none": which batch sizes pay

    def __post_init__(self) -> None:
        if not self.paying:
            self.paying = paying(self.largest_paying_batch)

    def summary(self) -> str:
        """The advice in words: the noise scale, the trade-off table, each layer and the conclusion."""
        return format_advice(self)


def verdict(batch: float, noise_scale: float) -> str:
    if batch <= noise_scale / 2:
        return PAYS
    if batch <= 2 * noise_scale:
        return DIMINISHING
    return DOES_NOT_PAY


def tradeoff(batch: int, noise_scale: float) -> dict:
    """McCandlish et al.'s steps and examples to a given loss, relative to their minima."""
    ratio = noise_scale / batch
    return {
        "batch": batch,
        "steps_over_min": 1 + ratio,
        "examples_over_min": 1 + 1 / ratio if ratio > 0 else math.inf,
        "verdict": verdict(batch, noise_scale),
    }


def largest_paying(noise_scale: float) -> int | float:
    """The largest power-of-two batch up to B_noise / 2: math.inf when B_noise is infinite (every batch pays),
    0 when B_noise / 2 < 1 (no batch pays, not even 1)."""
    if math.isnan(noise_scale):
        raise ValueError("the noise scale is NaN: no batch size can be advised")
    if math.isinf(noise_scale):
        return math.inf
    if noise_scale / 2 < 1:
        return 0
    return 2 ** int(math.floor(math.log2(noise_scale / 2)))


def paying(largest: int | float) -> str:
    """"all", "some" or "none": which batch sizes pay, from :func:`largest_paying`'s value."""
    return "all" if math.isinf(largest) else "none" if largest == 0 else "some"


def _ratio(numerator: float, denominator: float) -> float:
    # |G|^2 <= 0: the mean gradient is not resolved from the noise; no batch is too large yet.
    return numerator / denominator if denominator > 0 else math.inf


class _Accumulator:
    """Per-layer tr(Sigma) (per example) and |G|^2 summed over steps, from GradientStatistics summaries."""

    def __init__(self, model: nn.Module):
        from ..stats import GradientStatistics

        self.stats = GradientStatistics(model)
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.trace = torch.zeros(len(self.names), dtype=torch.float64)
        self.grad_sq = torch.zeros(len(self.names), dtype=torch.float64)
        self.steps = 0

    def add(self) -> None:
        summary = self.stats.summary()
        self.trace += (summary.variance() * summary.examples_per_sample).double().cpu()
        self.grad_sq += summary.true_grad_sq_norm().double().cpu()
        self.stats.reset()
        self.steps += 1

    def close(self) -> None:
        self.stats.remove()

    def advice(self, batch: int, micro_batch: int, measured: str, settings: dict | None = None) -> Advice:
        if not self.steps:
            raise ValueError("no batch was measured (the batches were empty)")
        trace, grad_sq = self.trace / self.steps, self.grad_sq / self.steps
        if not (torch.isfinite(trace).all() and torch.isfinite(grad_sq).all()):
            # A NaN |G|^2 would otherwise read as "not resolved", i.e. "every batch pays".
            raise ValueError("the gradient statistics are not finite (a NaN or infinite loss or gradient): "
                             "no batch size can be advised")
        noise = _ratio(float(trace.sum()), float(grad_sq.sum()))
        layers = {name: _ratio(float(t), float(g)) for name, t, g in zip(self.names, trace, grad_sq)}
        pays = largest_paying(noise)
        low = 1 if pays == 0 else min(32, pays)  # math.inf: from 32, as for any large B_noise
        top = max(4 * batch, 2 * noise if math.isfinite(noise) else 0, 4096)
        candidates = [2**k for k in range(int(math.log2(low)), int(math.log2(top)) + 2)]
        return Advice(noise_scale=noise, layer_noise_scales=layers, trace_sigma=float(trace.sum()),
                      grad_sq_norm=float(grad_sq.sum()), batches=[tradeoff(b, noise) for b in candidates],
                      largest_paying_batch=pays, batch=batch, micro_batch=micro_batch, measured_batches=self.steps,
                      measured=measured, settings=settings or {})


def advise(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batches: Iterable[tuple[Any, Any]],
    *,
    micro_batch: int,
    max_batches: int | None = None,
) -> Advice:
    """Which batch sizes pay for ``model`` at its current parameters (McCandlish et al. 2018).

    Args:
        model: the model, at the point of training to advise on (its mode is
            kept: train mode measures the gradients training uses).
        loss_fn: ``loss_fn(model(inputs), targets)``, the mean loss of a micro-batch.
        batches: ``(inputs, targets)`` pairs (tuples or lists), on the model's
            device; one pair of tensors alone is taken as one batch. ``inputs``
            is a tensor (``model(inputs)``), a tuple or list of tensors
            (``model(*inputs)``) or a dict of tensors (``model(**inputs)``);
            ``targets`` is a tensor or a tuple, list or dict of them. Every
            tensor is split along dim 0 into micro-batches of ``micro_batch``
            examples (other values are passed to each micro-batch as they
            are). A batch must be a multiple of ``micro_batch`` with at least
            two micro-batches, as ``largebatch advise`` requires. Use a few
            batches of at least 1,000 examples for a stable estimate; the
            estimate averages tr(Sigma) and |G|^2 over them before dividing.
        micro_batch: examples per gradient sample.
        max_batches: stop after this many batches.

    Returns an :class:`Advice`: ``largest_paying_batch`` is the largest
    power-of-two batch that still pays (``math.inf`` when every batch pays,
    0 when none does; ``paying`` says "all", "some" or "none"), and
    ``advice.summary()`` gives it all in words.

    No update is made: the parameters, ``p.grad`` and the buffers (BatchNorm
    running statistics) are as before the call.
    """
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise ValueError(f"micro_batch must be a positive integer, got {micro_batch!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    if isinstance(batches, torch.Tensor):
        raise ValueError("batches is one tensor: pass (inputs, targets) pairs, e.g. [(images, labels)]")
    if isinstance(batches, (tuple, list)) and len(batches) == 2 and all(
            isinstance(part, torch.Tensor) for part in batches):
        batches = [batches]  # one (inputs, targets) pair; a batch itself is never a tensor
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    grads = {p: p.grad for p in model.parameters()}
    accumulator = _Accumulator(model)
    sizes: list[int] = []
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            inputs, targets, size = _unpack(batch, i, micro_batch)
            sizes.append(size)
            for p in grads:
                p.grad = None
            for start in range(0, size, micro_batch):
                x, y = _rows(inputs, start, micro_batch), _rows(targets, start, micro_batch)
                # The batch's mean loss, in equal micro-batches: GradientStatistics' accumulation="mean".
                (loss_fn(_call(model, x), y) * (micro_batch / size)).backward()
            accumulator.add()
    finally:
        accumulator.close()
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        for p, g in grads.items():
            p.grad = g
    of = f" of {min(sizes)} to {max(sizes)} examples" if sizes and min(sizes) < max(sizes) else ""
    return accumulator.advice(max(sizes, default=0), micro_batch,
                              f"the model at its current parameters, over {accumulator.steps} batch(es){of}")


def _unpack(batch: Any, i: int, micro_batch: int) -> tuple[Any, Any, int]:
    """``(inputs, targets, examples)`` of batch ``i``, or a one-line ValueError saying what is wrong with it."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        what = (f"a {type(batch).__name__} with keys {', '.join(map(str, batch))}" if isinstance(batch, dict) else
                f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else
                f"a {type(batch).__name__}")
        raise ValueError(f"batch {i} is {what}: each batch must be an (inputs, targets) pair, inputs a tensor or "
                         "a tuple, list or dict of tensors")
    inputs, targets = batch
    sizes = {t.shape[0] for t in _tensors(inputs) + _tensors(targets) if t.dim() > 0}
    if not sizes:
        raise ValueError(f"batch {i} holds no tensor with a batch dimension")
    if len(sizes) > 1:
        raise ValueError(f"batch {i}: its tensors disagree on the number of examples "
                         f"({', '.join(map(str, sorted(sizes)))} along dim 0)")
    size = sizes.pop()
    if size % micro_batch or size // micro_batch < 2:
        # As `largebatch advise` refuses it: every gradient sample must have the same number of examples.
        raise ValueError(f"batch {i} has {size} examples: it must be a multiple of micro_batch {micro_batch} with "
                         "at least 2 micro-batches (the noise scale needs two or more equal gradient samples; "
                         "drop the remainder, e.g. DataLoader(..., drop_last=True))")
    return inputs, targets, size


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _rows(value: Any, start: int, count: int) -> Any:
    """``value`` with every tensor of it cut to the examples [start, start + count), its structure kept."""
    if isinstance(value, torch.Tensor):
        return value[start:start + count] if value.dim() > 0 else value
    if isinstance(value, dict):
        return {k: _rows(v, start, count) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, start, count) for v in value)
    return value


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def advise_run(config: AdviseConfig) -> Advice:
    """``largebatch advise``: a built-in model from scratch, or a run's checkpoint."""
    config.validate()
    from .runner import run_threads

    previous = torch.get_num_threads()
    torch.set_num_threads(run_threads(config.threads))
    try:
        if config.run_dir is not None:
            prepare_run_dir(config.run_dir, 0)
        advice = _from_checkpoint(config) if config.checkpoint else _from_scratch(config)
    finally:
        torch.set_num_threads(previous)
    if config.run_dir is not None:
        write_json(Path(config.run_dir) / "advice.json", asdict(advice))
    return advice


def _device(config: AdviseConfig) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _from_scratch(config: AdviseConfig) -> Advice:
    """Per-layer statistics over a short momentum-SGD run from initialisation, averaged over its steps."""
    data = load_dataset(config.dataset, data_dir=config.data_dir, train_limit=config.train_limit,
                        val_size=config.val_size)
    if len(data.train) < config.batch:
        raise ValueError(f"--batch {config.batch} is larger than the training set ({len(data.train)} images)")
    device = _device(config)
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.num_classes, data.image_shape[0], data.image_size).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    accumulator = _Accumulator(model)
    step, epoch = 0, 0
    try:
        while step < config.steps:
            order = epoch_permutation(len(data.train), config.seed, epoch)
            for indices in batch_indices(order, config.batch):
                optimizer.zero_grad(set_to_none=True)
                accumulate_gradients(model, data.train.images[indices].to(device),
                                     data.train.labels[indices].to(device), config.micro_batch)
                accumulator.add()
                optimizer.step()
                step += 1
                if step == config.steps:
                    break
            epoch += 1
    finally:
        accumulator.close()
    measured = (f"{config.model} on {config.dataset}, over the first {config.steps} steps of momentum SGD "
                f"(rate {config.lr:g}) from initialisation")
    return accumulator.advice(config.batch, config.micro_batch, measured, asdict(config))


def _from_checkpoint(config: AdviseConfig) -> Advice:
    """The run's model at its checkpoint, on the run's training data, over ``steps`` batches; no updates."""
    from . import checkpoint as ckpt
    from .parts import make_model
    from .runner import load_data
    from .config import TrainConfig

    path = Path(config.checkpoint)
    if path.is_dir():
        path = ckpt.checkpoint_path(path)
    if not path.exists():
        raise ValueError(f"--checkpoint {config.checkpoint}: no {path.name} there")
    if not (path.parent / CONFIG).exists():
        raise ValueError(f"--checkpoint {config.checkpoint}: no {CONFIG} beside it (not a largebatch run)")
    run = read_json(path.parent / CONFIG)["config"]
    payload = ckpt.load(path)
    known = {f for f in TrainConfig.__dataclass_fields__}
    train_config = TrainConfig(**{k: v for k, v in run.items() if k in known})
    data = load_data(train_config)
    if len(data.train) < config.batch:
        raise ValueError(f"--batch {config.batch} is larger than the run's training set ({len(data.train)} images)")
    device = _device(config)
    model = make_model(train_config, data, device)
    model.load_state_dict(payload["model"])
    model.train()
    step = payload["position"]["step"]
    order = epoch_permutation(len(data.train), config.seed, 0)
    batches = ((data.train.images[i].to(device), data.train.labels[i].to(device))
               for i in batch_indices(order, config.batch))
    advice = advise(model, nn.functional.cross_entropy, batches, micro_batch=config.micro_batch,
                    max_batches=config.steps)
    advice.measured = (f"{train_config.model} on {train_config.dataset} at step {step} of the run in {path.parent} "
                       f"({train_config.method}, batch {train_config.batch}), over {advice.measured_batches} "
                       "batch(es), no updates")
    advice.settings = {**asdict(config), "run": run, "step": step}
    return advice


def _examples(value: float) -> str:
    return "unresolved (noise dominates: larger batches still pay)" if math.isinf(value) else f"{value:,.0f}"


def conclusion(noise_scale: float) -> str:
    """What the noise scale says about batch sizes, in one or two sentences; never "up to about none"."""
    if math.isinf(noise_scale):
        return ("The mean gradient is not resolved from the noise (|G|^2 estimated <= 0): every batch in the "
                "table still pays at this point of training; measure over more steps for a bound.")
    if math.isnan(noise_scale):
        return "The noise scale could not be estimated (no finite statistics)."
    pays = largest_paying(noise_scale)
    critical = (f"around {noise_scale:,.0f} (the critical batch) returns diminish; beyond {2 * noise_scale:,.0f} "
                "a larger batch buys little.")
    if pays == 0:
        return (f"At this point of training no batch larger than 1 pays (B_noise = {noise_scale:.2g} examples): "
                + critical)
    return f"At this point of training, batches up to about {pays:,} still pay; {critical}"


def format_advice(advice: Advice) -> str:
    lines = [
        f"Gradient noise scale (McCandlish et al. 2018) of {advice.measured}, at batch {advice.batch} "
        f"({advice.batch // max(1, advice.micro_batch)} micro-batches of {advice.micro_batch}):",
        f"  model: B_noise = tr(Sigma)/|G|^2 = {_examples(advice.noise_scale)} examples",
        "",
        f"  {'batch':>7}  {'steps / S_min':>13}  {'examples / E_min':>16}  verdict",
    ]
    for row in advice.batches:
        lines.append(f"  {row['batch']:>7}  {row['steps_over_min']:>13.2f}  {row['examples_over_min']:>16.2f}  "
                     f"{row['verdict']}")
    lines += ["", "  per layer (a layer is one parameter tensor): B_noise, and the largest power-of-two batch "
              "that still pays"]
    for name, value in advice.layer_noise_scales.items():
        pays = largest_paying(value)
        text = "any" if math.isinf(pays) else "none" if pays == 0 else f"{pays:,}"
        lines.append(f"  {name:<28} {_examples(value):>12}   {text}")
    lines += ["", conclusion(advice.noise_scale) + " The noise scale grows as training proceeds: measure again "
              "later in training (largebatch advise --checkpoint RUN_DIR)."]
    return "\n".join(lines)
