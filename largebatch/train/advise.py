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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data import load_dataset
from ..models import MODELS, build_model
from .loop import accumulate_gradients, batch_indices, epoch_permutation
from .metrics import write_json
from .runner import prepare_run_dir

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
    run_dir: str | None = None

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.micro_batch < 1 or self.batch % self.micro_batch or self.batch // self.micro_batch < 2:
            raise ValueError(
                f"--batch {self.batch} must be a multiple of --micro-batch {self.micro_batch} with at least "
                "2 micro-batches (the noise scale needs two or more gradient samples)"
            )
        if self.steps < 1:
            raise ValueError(f"--steps must be a positive integer, got {self.steps}")


@dataclass
class Advice:
    config: AdviseConfig
    noise_scale: float  # model-level B_noise in examples (inf: the gradient is not resolved)
    layer_noise_scales: dict[str, float]
    trace_sigma: float
    grad_sq_norm: float
    batches: list[dict]


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


def _ratio(numerator: float, denominator: float) -> float:
    # |G|^2 <= 0: the mean gradient is not resolved from the noise; no batch is too large yet.
    return numerator / denominator if denominator > 0 else math.inf


def measure(config: AdviseConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Per-layer tr(Sigma) (per example) and |G|^2, each averaged over the steps."""
    from ..stats import GradientStatistics

    data = load_dataset(config.dataset, data_dir=config.data_dir, train_limit=config.train_limit)
    if len(data.train) < config.batch:
        raise ValueError(f"--batch {config.batch} is larger than the training set ({len(data.train)} images)")
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.num_classes, data.image_shape[0], data.image_shape[-1])
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    stats = GradientStatistics(model)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    trace = torch.zeros(len(names), dtype=torch.float64)
    grad_sq = torch.zeros(len(names), dtype=torch.float64)
    step, epoch = 0, 0
    while step < config.steps:
        order = epoch_permutation(len(data.train), config.seed, epoch)
        for indices in batch_indices(order, config.batch):
            optimizer.zero_grad(set_to_none=True)
            accumulate_gradients(model, data.train.images[indices], data.train.labels[indices], config.micro_batch)
            summary = stats.summary()
            trace += (summary.variance() * summary.examples_per_sample).double()
            grad_sq += summary.true_grad_sq_norm().double()
            optimizer.step()
            stats.reset()
            step += 1
            if step == config.steps:
                break
        epoch += 1
    stats.remove()
    return trace / step, grad_sq / step, names


def advise(config: AdviseConfig) -> Advice:
    config.validate()
    if config.run_dir is not None:
        prepare_run_dir(config.run_dir, 0)
    trace, grad_sq, names = measure(config)
    noise = _ratio(float(trace.sum()), float(grad_sq.sum()))
    layers = {name: _ratio(float(t), float(g)) for name, t, g in zip(names, trace, grad_sq)}
    top = max(4 * config.batch, 2 * noise if math.isfinite(noise) else 0, 4096)
    candidates = [2**k for k in range(5, int(math.log2(top)) + 2)]
    advice = Advice(config, noise, layers, float(trace.sum()), float(grad_sq.sum()),
                    [tradeoff(b, noise) for b in candidates])
    if config.run_dir is not None:
        write_json(Path(config.run_dir) / "advice.json", asdict(advice))
    return advice


def _examples(value: float) -> str:
    return "unresolved (noise dominates: larger batches still pay)" if math.isinf(value) else f"{value:,.0f}"


def format_advice(advice: Advice) -> str:
    c = advice.config
    lines = [
        f"Gradient noise scale (McCandlish et al. 2018) of {c.model} on {c.dataset}, measured over {c.steps} "
        f"steps at batch {c.batch} ({c.batch // c.micro_batch} micro-batches of {c.micro_batch}):",
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
        pays = max((r["batch"] for r in advice.batches if verdict(r["batch"], value) == PAYS), default=None)
        lines.append(f"  {name:<28} {_examples(value):>12}   {'below 32' if pays is None else pays}")
    if math.isfinite(advice.noise_scale):
        best = max((r["batch"] for r in advice.batches if r["verdict"] == PAYS), default=None)
        lines += ["", f"Batches up to about {best or 'none of the listed'} still pay; around "
                  f"{advice.noise_scale:,.0f} (the critical batch) returns diminish; beyond "
                  f"{2 * advice.noise_scale:,.0f} a larger batch buys little. The noise scale grows as "
                  "training proceeds: measure again later in training."]
    return "\n".join(lines)
