"""The ``largebatch`` command line.

  largebatch train   one run (also under torchrun: data-parallel over the ranks)
  largebatch sweep   every (method, batch, seed), resumable, then the report
  largebatch tune    pick a method family's base rate at the base batch on the validation split
  largebatch report  report.md and PNG plots of a run or sweep directory
  largebatch study   the papers' study from one specification: tune, sweep, ablate, results page
  largebatch advise  gradient noise scale: which batch sizes still pay
  largebatch methods the methods this installation offers
  largebatch demo    base batch vs large batch with linear scaling vs LARS
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

# Kept in step with largebatch.train.config (not imported: `largebatch --help` stays free of torch).
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_CHECKPOINT_EVERY = 100


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (exit code 2, as argparse's own)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"largebatch: error: {message} (see {self.prog} --help)\n")


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _family_rates(text: str) -> dict[str, float] | float:
    """``0.05`` (every family) or ``sgd=0.05,lars=0.02`` (per method family)."""
    try:
        if "=" not in text:
            return float(text)
        pairs = (item.split("=", 1) for item in text.split(",") if item.strip())
        return {family.strip(): float(rate) for family, rate in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate or family=rate,..., got {text!r}") from None


def _config_from(args: argparse.Namespace, **overrides):
    from .train.config import TrainConfig

    fields = dict(
        model=args.model, micro_batch=args.micro_batch, epochs=args.epochs, base_batch=args.base_batch,
        dataset=args.dataset, data_dir=args.data_dir, train_limit=args.train_limit, test_limit=args.test_limit,
        val_size=args.val_size, warmup_fraction=args.warmup_fraction, warmup=args.warmup,
        decay_to=None if args.decay == "none" else args.decay_to, eval_every=args.eval_every,
        layer_every=args.layer_every, progress=not args.no_progress, device=args.device,
        precision=args.precision, threads=args.threads, statistics=args.statistics, clock_cap=args.clock_cap,
        augment=args.augment,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def _dataset_name(args: argparse.Namespace) -> str:
    # A --data-dir without --dataset means "these idx files".
    if args.dataset is None:
        return "idx" if args.data_dir else "fashion-mnist"
    return args.dataset


# -- commands ---------------------------------------------------------------------

def _train(args: argparse.Namespace) -> int:
    from .train.runner import train

    config = _config_from(
        args, method=args.method, batch=args.batch, lr=args.lr, seed=args.seed, run_dir=args.run_dir,
        dataset=_dataset_name(args), checkpoint_every=args.checkpoint_every, max_steps=args.max_steps,
        resume=args.resume, overwrite=args.overwrite, tensorboard=args.tensorboard,
    )
    summary = train(config, asked_to_resume=args.resume)
    if summary is None or not _is_main_process():
        return 0  # stopped by --max-steps: the runner said where
    if summary.get("diverged_at_step") is not None:
        return 1  # the runner said at which step
    print(f"{config.method} batch {config.batch}: test accuracy {100 * summary['final_test_accuracy']:.2f}% "
          f"after {summary['steps']} steps ({summary['train_seconds']:.1f} s training); run in {config.run_dir}")
    return 0


def _sweep_spec(args: argparse.Namespace, methods: list[str], tune_grid: list[float]):
    from .train.sweep import SweepSpec

    rates = args.lr
    template = _config_from(args, dataset=_dataset_name(args), lr=rates if isinstance(rates, float) else None)
    return SweepSpec(
        methods=methods, batches=getattr(args, "batches", [args.base_batch]), seeds=args.seeds,
        run_dir=args.run_dir, template=template, lrs=rates if isinstance(rates, dict) else {},
        tune_grid=tune_grid,
    )


def _sweep(args: argparse.Namespace) -> int:
    from .report import write_report
    from .train.sweep import run_sweep

    root = run_sweep(_sweep_spec(args, args.methods, args.tune or []))
    report = write_report(root)
    print(report.read_text().split("## Plots")[0].split("## Results", 1)[-1].strip())
    print(f"report: {report}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from .train.sweep import tune_families

    spec = _sweep_spec(args, [args.method], args.grid)
    spec.validate()
    tuned = tune_families(spec, with_baseline=False)
    for family, entry in tuned.items():
        print(f"{family}: base rate {entry['lr']:g} ({entry['how']})")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    print(f"report: {write_report(args.run_dir, out=args.out)}")
    return 0


def _study(args: argparse.Namespace) -> int:
    from .study import StudySpec, collect, estimate, run_study

    spec = StudySpec.load(args.spec, args.preset, run_dir=args.run_dir, artifacts=args.artifacts, out=args.out,
                          progress=True if args.progress else None, device=args.device, precision=args.precision,
                          threads=args.threads)
    if args.report_only:
        from .report.study import write_study_report

        print(f"results page: {write_study_report(Path(spec.artifacts) / 'summaries.json', spec.out)}")
        return 0
    if args.collect_only:
        print(f"summaries: {collect(spec)}")
        return 0
    estimate(spec)
    if args.estimate_only:
        return 0
    from .report.study import write_study_report

    print(f"results page: {run_study(spec, commit=args.commit, write_page=lambda s: write_study_report(s, spec.out))}")
    return 0


def _advise(args: argparse.Namespace) -> int:
    from .train.advise import AdviseConfig, advise_run, format_advice

    config = AdviseConfig(
        model=args.model, batch=args.batch, micro_batch=args.micro_batch, steps=args.steps, lr=args.lr,
        seed=args.seed, dataset=_dataset_name(args), data_dir=args.data_dir, train_limit=args.train_limit,
        val_size=args.val_size, run_dir=args.run_dir, checkpoint=args.checkpoint, device=args.device, threads=args.threads,
    )
    print(format_advice(advise_run(config)))
    return 0


def _methods(args: argparse.Namespace) -> int:
    from .train.methods import methods

    for method in methods().values():
        print(f"{method.name:10} {method.summary} (family {method.family}, warm-up {method.warmup}, "
              f"default base rate {method.default_base_lr:g})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(
        epochs=args.epochs,
        large_batch=args.batch,
        base_lr=args.lr,
        lars_lr=args.lars_lr,
        seed=args.seed,
        data_dir=args.data_dir,
    )
    return 0


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


# -- arguments --------------------------------------------------------------------

def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    from .data import DATASETS

    p.add_argument("--dataset", default=None,
                   help=f"one of {', '.join(DATASETS)} (default fashion-mnist), or package.module:callable, your own "
                   "(returns the train and test sets; docs/guide.md, 'Your own model and data')")
    p.add_argument("--data-dir", default=None,
                   help="directory of MNIST-format idx files; for cifar10/cifar100 the cifar-10-batches-py or "
                   "cifar-100-python folder (or its parent); for npz the directory of train.npz and test.npz")
    p.add_argument("--train-limit", type=int, default=None, help="use only this many training images")
    p.add_argument("--test-limit", type=int, default=None, help="use only this many test images")
    p.add_argument("--val-size", type=int, default=5000, help="validation images held out of training")


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    from .models import MODELS

    p.add_argument("--model", default="mlp", help=_model_help(MODELS))
    p.add_argument("--augment", choices=("none", "crop-flip"), default="none",
                   help="crop-flip: a random crop of the image padded by 4 pixels and a random horizontal flip, "
                   "on the training device, drawn per epoch from the seed (default none)")
    p.add_argument("--micro-batch", type=int, default=128, help="examples per forward/backward (per rank)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--base-batch", type=int, default=128, help="the batch the base rate was tuned at")
    p.add_argument("--warmup", choices=("default", "none", "fixed", "state-aware"), default="default",
                   help="warm-up mode for any method (default: the method's own; see `largebatch methods`)")
    p.add_argument("--warmup-fraction", type=float, default=0.055, help="warm-up length as a fraction of the epochs")
    p.add_argument("--statistics", choices=("micro_batch", "example"), default="micro_batch",
                   help="where LENA and AdaScale measure the gradient noise: micro_batch (default, the papers': "
                   "n = ranks x micro-batches samples, so micro-batches of --base-batch) or example (per-example "
                   "norms, n = batch / base batch with any --micro-batch, e.g. one micro-batch per step)")
    p.add_argument("--clock-cap", type=float, default=3.0,
                   help="adascale ends when its clock tau reaches T1 (the base-batch iterations of --epochs), "
                   "at most this many times --epochs (default 3)")
    p.add_argument("--decay", choices=("exp", "none"), default="exp", help="decay schedule after warm-up")
    p.add_argument("--decay-to", type=float, default=0.01, help="exponential decay to this fraction of the peak")
    p.add_argument("--eval-every", type=int, default=0, help="also check test accuracy every k steps")
    p.add_argument("--layer-every", type=int, default=None,
                   help="per-layer statistics every k steps (default 10, less in runs of under 2,000 steps so that "
                   "each run has at least 200 records: every step under 400)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_machine_arguments(p)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32; bf16: bfloat16 autocast; fp16: float16 autocast with a GradScaler")
    _add_data_arguments(p)


def _model_help(models: tuple[str, ...]) -> str:
    return (f"one of {', '.join(models)}, or package.module:callable, your own: imported from the working "
            "directory or the Python path and called with num_classes, in_channels and image_size")


def _add_machine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="cpu, cuda (under torchrun: each rank's local GPU) or cuda:N (default: a GPU if there is one)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: the cores available, shared by a machine's ranks)")


def build_parser() -> argparse.ArgumentParser:
    from .models import MODELS

    parser = _Parser(prog="largebatch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train one run (data-parallel under torchrun)")
    train.add_argument("--method", required=True, help="see `largebatch methods`")
    train.add_argument("--batch", type=int, required=True, help="global batch (all ranks, all micro-batches)")
    train.add_argument("--lr", type=float, default=None, help="base rate at --base-batch (default: the method's)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--run-dir", required=True)
    train.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY,
                       help=f"checkpoint every k steps (default {DEFAULT_CHECKPOINT_EVERY}; 0: only at the end); "
                       "also at the current step on Ctrl-C (SIGINT) or SIGTERM")
    train.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resumable)")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --run-dir")
    train.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars")
    _add_run_arguments(train)
    train.set_defaults(func=_train)

    sweep = sub.add_parser("sweep", help="run every (method, batch, seed) and report")
    sweep.add_argument("--methods", type=_name_list, required=True, help="comma-separated, e.g. sgd,lsw,lars")
    sweep.add_argument("--batches", type=_int_list, required=True, help="comma-separated, e.g. 128,1024,8192")
    sweep.add_argument("--seeds", type=_int_list, default=[0], help="comma-separated (default 0)")
    sweep.add_argument("--run-dir", required=True)
    sweep.add_argument("--lr", type=_family_rates, default=None,
                       help="base rate(s) at the base batch: one number, or family=rate,... (e.g. sgd=0.05,lars=0.1)")
    sweep.add_argument("--tune", type=_float_list, default=None,
                       help="choose each family's base rate from this grid on the validation split first")
    _add_run_arguments(sweep)
    sweep.set_defaults(func=_sweep)

    tune = sub.add_parser("tune", help="pick a base rate at the base batch on the validation split")
    tune.add_argument("--method", required=True)
    tune.add_argument("--grid", type=_float_list, required=True, help="comma-separated base rates")
    tune.add_argument("--seeds", type=_int_list, default=[0])
    tune.add_argument("--run-dir", required=True)
    tune.add_argument("--lr", type=_family_rates, default=None, help=argparse.SUPPRESS)
    _add_run_arguments(tune)
    tune.set_defaults(func=_tune)

    report = sub.add_parser("report", help="report.md and PNG plots of a run or sweep directory")
    report.add_argument("run_dir")
    report.add_argument("--out", default=None,
                        help="write report.md and the PNGs into this directory (default: the run directory)")
    report.set_defaults(func=_report)

    study = sub.add_parser("study", help="the papers' study: tune, sweep, warm-up ablation, results page",
                           description="Run a study specification (docs/study.md): base-rate tuning at the base "
                           "batch, the main sweep, the warm-up ablation at the two largest batches, then "
                           "summaries.json and the results page. Finished runs are skipped.")
    which = study.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", help="a built-in specification: paper-v2 (the study v2) or paper-small (the first)")
    which.add_argument("--spec", help="a TOML specification file")
    study.add_argument("--run-dir", default=None, help="where the runs go (default: the specification's)")
    study.add_argument("--artifacts", default=None, help="where summaries.json and the PNGs go")
    study.add_argument("--out", default=None, help="the results page (default: the specification's)")
    study.add_argument("--estimate-only", action="store_true", help="print the wall-time estimate and stop")
    study.add_argument("--report-only", action="store_true", help="rewrite the page from summaries.json only")
    study.add_argument("--collect-only", action="store_true", help="rewrite summaries.json from the run directories")
    study.add_argument("--commit", action="store_true",
                       help="git-commit the summaries as runs finish (the specification's commit_every_minutes) and "
                       "after each phase")
    study.add_argument("--progress", action="store_true", help="a progress bar per run")
    _add_machine_arguments(study)
    study.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="fp32, bf16 or fp16 (default: the specification's, else fp32)")
    study.set_defaults(func=_study)

    advise = sub.add_parser("advise", help="measure the gradient noise scale and say which batch sizes pay")
    advise.add_argument("--model", default="mlp", help=_model_help(MODELS))
    advise.add_argument("--batch", type=int, default=1024, help="batch of the measurement")
    advise.add_argument("--micro-batch", type=int, default=128, help="examples per gradient sample")
    advise.add_argument("--steps", type=int, default=30, help="training steps to measure over")
    advise.add_argument("--lr", type=float, default=0.05, help="momentum-SGD rate during the measurement")
    advise.add_argument("--seed", type=int, default=0)
    advise.add_argument("--checkpoint", default=None,
                        help="a run directory or its checkpoint.pt: measure that model at that point of its "
                        "training (model and data from the run; --steps batches, no updates)")
    advise.add_argument("--run-dir", default=None, help="also write advice.json here")
    _add_machine_arguments(advise)
    _add_data_arguments(advise)
    advise.set_defaults(func=_advise)

    methods = sub.add_parser("methods", help="list the methods this installation offers")
    methods.set_defaults(func=_methods)

    demo = sub.add_parser(
        "demo",
        help="base batch vs a large batch with linear scaling vs LARS on Fashion-MNIST",
        description="Train the MLP on Fashion-MNIST at batch 128, then at a large batch with "
        "linear scaling and with LARS, and print the test accuracies.",
    )
    demo.add_argument("--epochs", type=int, default=10)
    demo.add_argument("--batch", type=int, default=8192, help="the large batch (default 8192)")
    demo.add_argument("--lr", type=float, default=0.05, help="base rate at batch 128")
    demo.add_argument("--lars-lr", type=float, default=None, help="LARS global rate (default: linearly scaled)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--data-dir", default=None, help="directory of MNIST-format idx files")
    demo.set_defaults(func=_demo)
    return parser


def _one_line(error: BaseException) -> str:
    from .data import DatasetNotFoundError

    lines = str(error).strip().splitlines() or [type(error).__name__]
    if isinstance(error, DatasetNotFoundError):
        # The full how-to is in the exception for library users; the command line keeps to one line.
        return " ".join(part for part in (lines[0], error.hint) if part)
    return " ".join(line.strip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C before a command handles it itself (importing torch, reading the data): one line, no traceback.
        print("largebatch: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def _main(argv: list[str] | None) -> int:
    # Denormal floats are flushed per thread, and torch's CPU worker threads take the
    # setting of the thread that starts them: set it before any parallel op starts them
    # (train() sets it again for the calling thread; see runner.train).
    import torch

    flushed = torch.set_flush_denormal(True)
    code = 1
    made = None
    try:
        args = build_parser().parse_args(argv)
        made = _new_directory(getattr(args, "run_dir", None))
        code = _run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:
        # `largebatch advise | head`: the reader has gone; the rest of the output is not wanted.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 0
        return code
    finally:
        if code != 0 and made is not None:
            _remove_if_empty(made)
        if flushed:  # a caller in the same process (a test, a notebook) gets its floats back as they were
            torch.set_flush_denormal(False)


def _run(args: argparse.Namespace) -> int:
    from .data import DatasetNotFoundError, IdxFormatError
    from .train.runner import Interrupted

    try:
        return args.func(args)
    except (DatasetNotFoundError, IdxFormatError, ValueError) as e:
        print(f"largebatch: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        # sweep, tune and study skip finished runs and resume the others by themselves: they take no --resume
        again = "continue with --resume" if args.command == "train" else "run the same command again to continue"
        print(f"largebatch: {e.stopped}; {again}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("largebatch: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def _new_directory(path: str | None) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (None: it all exists)."""
    if not path:
        return None
    path = Path(path).absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def _remove_if_empty(top: Path) -> None:
    """Remove ``top`` if it holds nothing but empty directories (what a failed command made)."""
    if not top.is_dir():
        return
    for directory, subdirs, files in os.walk(top, topdown=False):
        if files:
            return
        try:
            os.rmdir(directory)
        except OSError:
            return


if __name__ == "__main__":
    sys.exit(main())
