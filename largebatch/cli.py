"""The ``largebatch`` command line."""

from __future__ import annotations

import argparse
import sys

from .data import DatasetNotFoundError, IdxFormatError


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="largebatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DatasetNotFoundError, IdxFormatError, ValueError) as e:
        print(f"largebatch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("largebatch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
