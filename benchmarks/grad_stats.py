"""Cost of gradient statistics on CPU, as ratios to plain forward+backward.

The script is a list of benchmark functions (``BENCHMARKS``), each returning
rows (dicts with at least ``benchmark``, ``model`` and ``median_ms``); the rows
of every function go to ``benchmarks/results/grad_stats.json``.

``per_example_norms``: one training step (zero grads, forward, loss, backward)
on three models,

* ``mlp``: 784-512-512-10, batch 256;
* ``cnn``: three 3x3 convolutions (3-32-64-64 channels, 32x32 maps, two
  max-pools) and a linear classifier, batch 128;
* ``transformer``: embedding, 2 pre-norm blocks (d=128, 4 heads, MLP 4d,
  attention written with nn.Linear), tied output head, T=64, batch 32;
* ``resnet20``: ``largebatch.models.ResNet20`` on 32x32 inputs, batch 128;
* ``lenet5-bn``: ``largebatch.models.LeNet5(batch_norm=True)``, 28x28, batch 128;

with these contenders, timed round-robin (each in turn runs two steps, the
second timed, so machine noise hits all alike and each is timed after a step
of its own), reported as medians and ratios to ``plain``:

* ``plain``: forward + backward;
* ``ghost``: the same with :class:`largebatch.stats.per_example.PerExampleNorms`
  attached (its accumulators read each step), default ``strategy="rule"``;
* with ``--strategies``: ``measure`` (``strategy="measure"``: each layer
  shape's strategies timed once, in the warm-up) and each strategy forced,
  ``force:ghost``, ``force:bmm``, ``force:conv-backward``
  (``largebatch.stats.strategy``), each as a ratio to ``plain`` of the same
  run; the row records the strategy each parameter got (``strategies``);
* ``func``: per-example gradients with ``torch.func`` (``vmap(grad)``) and
  their per-layer norms;
* ``opacus``: Opacus ``GradSampleModule`` in ghost-clipping mode (forward,
  loss, first backward that yields per-example norms, second backward), only
  if ``opacus`` imports with this torch (optional benchmark-only dependency,
  ``pip install opacus --no-deps``).

``layer_breakdown`` (``--only layer_breakdown``, or with ``--strategies``):
for each convolution and each Linear layer on sequences, one step's layer
input and output gradient are kept and each applicable strategy's norms
timed alone, against the layer's plain weight gradient (autograd's kernel
for it): the floor a strategy is measured against.

Usage::

    python benchmarks/grad_stats.py              # full run
    python benchmarks/grad_stats.py --quick      # few steps
    python benchmarks/grad_stats.py --strategies --models cnn,resnet20,lenet5-bn
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from largebatch.models import LeNet5, ResNet20
from largebatch.stats import _ghost, strategy as strategies
from largebatch.stats.layers.conv import conv_uses
from largebatch.stats.layers.linear import linear_uses
from largebatch.stats.per_example import PerExampleNorms

from _allocator import steady_malloc
from _environment import machine

RESULTS = Path(__file__).parent / "results" / "grad_stats.json"
# ghost/plain targets (issue 31); lenet5-bn has none of its own (its target is CLARS's, method_overhead.py)
TARGETS = {"mlp": 1.10, "cnn": 1.30, "resnet20": 1.35, "transformer": 1.20, "lenet5-bn": None}
FORCED = ("ghost", "bmm", "conv-backward")


# ------------------------------------------------------------------ models


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(64 * 16, 10),
    )


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 128, layers: int = 2, heads: int = 4, length: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(length, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        # materialised, not an expanded view: Opacus's embedding norm rule
        # views its index tensor (.view(-1, 1)) and fails on a stride-0 one
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
        return self.head(self.norm(self.blocks(self.embed(ids) + self.pos(positions))))


def classification_loss(out, y):
    return F.cross_entropy(out, y)


def lm_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def workloads():
    g = torch.Generator().manual_seed(0)
    return {
        "mlp": (mlp, torch.randn(256, 784, generator=g), torch.randint(0, 10, (256,), generator=g),
                classification_loss),
        "cnn": (cnn, torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g),
                classification_loss),
        "transformer": (TinyTransformer, torch.randint(0, 256, (32, 64), generator=g),
                        torch.randint(0, 256, (32, 64), generator=g), lm_loss),
        "resnet20": (lambda: ResNet20(in_channels=3), torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g),
                     classification_loss),
        "lenet5-bn": (lambda: LeNet5(batch_norm=True), torch.randn(128, 1, 28, 28, generator=g),
                      torch.randint(0, 10, (128,), generator=g), classification_loss),
    }


# ------------------------------------------------------------------ contenders


def plain_step(model, loss_fn):
    def step(x, y):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
    return step


def ghost_step(model, loss_fn, strategy: str = "rule"):
    norms = PerExampleNorms(model, strategy=strategy)

    def step(x, y):
        model.zero_grad(set_to_none=True)
        norms.reset()
        loss_fn(model(x), y).backward()
        norms.accumulators()
    return step, norms


def func_step(model, loss_fn):
    params = {n: p for n, p in model.named_parameters()}

    def example_loss(p, x_i, y_i):
        return loss_fn(functional_call(model, p, (x_i.unsqueeze(0),)), y_i.unsqueeze(0))

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def step(x, y):
        detached = {n: p.detach() for n, p in params.items()}
        grads = per_example(detached, x, y)
        torch.stack([g.flatten(1).norm(dim=1).sum() for g in grads.values()])
    return step


def untied(model: nn.Module) -> nn.Module:
    """Opacus ghost clipping refuses tied weights: give the head its own copy."""
    if isinstance(model, TinyTransformer):
        model.head.weight = nn.Parameter(model.embed.weight.detach().clone())
    return model


def opacus_step(model, loss_fn):
    """Opacus ghost clipping: returns (step, None) or (None, reason)."""
    try:
        import opacus  # noqa: F401 - the package itself must import, not only its submodules
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
    except Exception as error:  # noqa: BLE001 - any import failure means "not available"
        return None, f"opacus unavailable: {type(error).__name__}: {error}"
    try:
        wrapped = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, use_ghost_clipping=True)
        optimizer = DPOptimizerFastGradientClipping(
            torch.optim.SGD(wrapped.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=1.0,
            expected_batch_size=1,
        )
        criterion = DPLossFastGradientClipping(wrapped, optimizer, nn.CrossEntropyLoss(reduction="mean"))
    except Exception as error:  # noqa: BLE001
        return None, f"opacus failed to wrap: {type(error).__name__}: {error}"

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        out = wrapped(x)
        shape = None
        if out.dim() == 3:  # a sequence: its per-example loss is the mean over its positions, as in lm_loss
            shape = out.shape
            out, y = out.flatten(0, 1), y.flatten()
        criterion(out, y, shape=shape).backward()
    return step, None


# ------------------------------------------------------------------ benchmarks


def time_round_robin(steps: dict[str, Callable], x, y, repeats: int, warmup: int = 3) -> dict[str, float]:
    for step in steps.values():
        for _ in range(warmup):
            step(x, y)
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            # timed after a step of its own, as in training, not after another contender's
            step(x, y)
            start = time.perf_counter()
            step(x, y)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def per_example_norms(repeats: int, models: list[str], with_strategies: bool = False) -> list[dict]:
    rows = []
    for name in models:
        build, x, y, loss_fn = workloads()[name]
        torch.manual_seed(0)
        base = build()
        steps = {"plain": plain_step(copy.deepcopy(base), loss_fn)}
        steps["ghost"], norms = ghost_step(copy.deepcopy(base), loss_fn)
        engines = {"ghost": norms}
        if with_strategies:  # the same engine by measurement and with each strategy forced
            strategies.clear_measurements()
            for contender, mode in [("measure", "measure"), *((f"force:{f}", f) for f in FORCED)]:
                steps[contender], engines[contender] = ghost_step(copy.deepcopy(base), loss_fn, mode)
        coupled = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in base.modules())
        if not coupled:  # train-mode BatchNorm couples the examples: no torch.func per-example gradient
            steps["func"] = func_step(copy.deepcopy(base), loss_fn)
        opacus, note = opacus_step(untied(copy.deepcopy(base)), loss_fn)
        if opacus is not None:
            try:
                opacus(x, y)
                steps["opacus"] = opacus
            except Exception as error:  # noqa: BLE001 - report, do not abort the other rows
                note = f"opacus failed on this model: {type(error).__name__}: {error}"
        if name == "transformer" and "opacus" in steps:
            note = "opacus ghost clipping refuses tied weights: timed with an untied head"
        if coupled:
            note = "; ".join(filter(None, [note, "no torch.func contender: train-mode BatchNorm couples the examples"]))
        median = time_round_robin(steps, x, y, repeats)
        ratios = {f"{k}/plain": v / median["plain"] for k, v in median.items() if k != "plain"}
        if "opacus" in median:
            ratios["ghost/opacus"] = median["ghost"] / median["opacus"]
        rows.append({
            "benchmark": "per_example_norms",
            "model": name,
            "batch": x.shape[0],
            "parameters": sum(p.numel() for p in base.parameters()),
            "repeats": repeats,
            "median_ms": median,
            "ratios": ratios,
            "target_ghost/plain": TARGETS[name],
            "met": None if TARGETS[name] is None else ratios["ghost/plain"] <= TARGETS[name],
            "methods": norms.methods(),
            # contender -> factored parameter -> "strategy (why)": what each engine ran
            "strategies": {
                contender: {k: str(c) for k, c in engine.strategies().items() if c.strategy in FORCED}
                for contender, engine in engines.items()
            },
            # Linear calls whose weight gradient the per-example gradients supplied
            "tapped_calls": norms.tapped_calls,
            "note": note,
        })
    return rows


def layer_breakdown(repeats: int, models: list[str]) -> list[dict]:
    """Per factored layer: each strategy's norms timed alone against the layer's plain weight gradient."""
    rows = []
    for name in models:
        build, x, y, loss_fn = workloads()[name]
        torch.manual_seed(0)
        model = build()
        kept: dict[str, list] = {}

        def keep(label):
            def hook(module, args, output):
                entry = kept.setdefault(label, [module, args[0].detach(), None])
                output.register_hook(lambda g: entry.__setitem__(2, g.detach()))
            return hook

        handles = [
            m.register_forward_hook(keep(label)) for label, m in model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
        ]
        loss_fn(model(x), y).backward()
        for handle in handles:
            handle.remove()
        layers = {}
        for label, (module, a, g) in kept.items():
            if g is None:
                continue
            if isinstance(module, nn.Linear):
                use, _ = linear_uses(a, g, has_bias=False)
                if use.length == 1:
                    continue  # one position: the outer-product form, no choice
                plain = lambda u=use: u.left.flatten(0, 1).t().mm(u.right.flatten(0, 1))  # noqa: E731
            else:
                use, _ = conv_uses(module, a, g)
                plain = functools.partial(_conv_weight_grad, module, a, g)
            timed = {"plain_weight_grad": plain}
            timed.update({s: functools.partial(_ghost.sq_norms_by, use, s) for s in use.strategies})
            ms = {k: 1e3 * _median_seconds(f, repeats) for k, f in timed.items()}
            layers[label] = {
                "shape": {"T": use.length, "p": use.m, "d": use.n, "groups": use.groups},
                "median_ms": ms,
                "over_plain_weight_grad": {k: v / ms["plain_weight_grad"] for k, v in ms.items()},
                "rule": str(strategies.rule_choice(use)),
            }
        rows.append({"benchmark": "layer_breakdown", "model": name, "batch": x.shape[0], "layers": layers})
    return rows


def _conv_weight_grad(module, a, g):
    """Autograd's weight gradient of the convolution (the floor of any per-example form)."""
    out = module._conv_forward(a.requires_grad_(False), module.weight, None)
    return torch.autograd.grad(out, module.weight, g)[0]


def _median_seconds(f: Callable, repeats: int) -> float:
    f()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Each entry: (name, function(args) -> rows). Further statistics (e.g. DDP
# comm-hook overhead) append their own entry here.
BENCHMARKS: list[tuple[str, Callable[[argparse.Namespace], list[dict]]]] = [
    ("per_example_norms", lambda args: per_example_norms(args.repeats, args.models.split(","), args.strategies)),
    ("layer_breakdown", lambda args: layer_breakdown(args.repeats, args.models.split(","))),
]
DEFAULT_ONLY = "per_example_norms"  # layer_breakdown with --strategies or --only


def print_rows(rows: list[dict]) -> None:
    for row in rows:
        print(f"{row['benchmark']} / {row['model']}:")
        for layer, info in row.get("layers", {}).items():
            ratios = ", ".join(f"{k} {v:.2f}x" for k, v in info["over_plain_weight_grad"].items() if k != "plain_weight_grad")
            print(f"  {layer:24s} {info['median_ms']['plain_weight_grad']:8.2f} ms plain; {ratios}; {info['rule']}")
        for key, value in row.get("median_ms", {}).items():
            print(f"  {key:20s} {value:9.2f} ms")
        for key, value in row.get("ratios", {}).items():
            print(f"  {key:26s} {value:7.2f}x")
        if row.get("note"):
            print(f"  note: {row['note']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 timed steps per contender")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per contender")
    parser.add_argument("--models", default="mlp,cnn,transformer", help=f"of {','.join(workloads())}")
    parser.add_argument("--only", default=None, help="comma-separated benchmark names")
    parser.add_argument("--strategies", action="store_true",
                        help="also time strategy='measure' and each strategy forced, and the per-layer breakdown")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (machine is shared)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--glibc-default", action="store_true", help="keep glibc's malloc thresholds (see _allocator.py)")
    args = parser.parse_args()
    args.repeats = args.repeats or (5 if args.quick else 60)
    unknown = set(args.models.split(",")) - set(workloads())
    if unknown:
        parser.error(f"--models: unknown {', '.join(sorted(unknown))}; known: {', '.join(workloads())}")
    only = args.only or (DEFAULT_ONLY + (",layer_breakdown" if args.strategies else ""))
    torch.set_num_threads(args.threads)
    steady = not args.glibc_default and steady_malloc()

    load_before = os.getloadavg()  # the machine is shared: record how busy it was
    rows = []
    for name, bench in BENCHMARKS:
        if name not in only.split(","):
            continue
        new_rows = bench(args)
        print_rows(new_rows)
        rows.extend(new_rows)
    results = {
        **machine(),
        "malloc": "steady (glibc mmap/trim thresholds raised, _allocator.py)" if steady else "glibc default",
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
