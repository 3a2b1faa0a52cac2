"""AdaScale with ProgressLR: a large batch on the base batch's schedule.

AdaScale multiplies the rate tuned at the base batch by its gain ratio
r_t in [1, n] (n = micro-batches per update here) and advances a
scale-invariant clock tau by r_t per update. ProgressLR evaluates the
base-batch schedule at tau, and training ends when tau reaches T1, the length
of the base-batch schedule (opt.done(T1)), or when the epoch budget runs out.

    python examples/adascale.py --batch 4096 --micro-batch 128 --epochs 5
    python examples/adascale.py --device cuda
"""

import argparse

import torch
import torch.nn.functional as F

import largebatch
from largebatch.data import load_dataset
from largebatch.models import LeNet5


@torch.no_grad()
def accuracy(model, images, labels, batch=4096):
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum() for x, y in zip(images.split(batch), labels.split(batch)))
    model.train()
    return correct.item() / len(labels)


class ExponentialDecay:
    """The base-batch schedule as a function of base-batch iterations: 1 -> 1% at T1."""

    def __init__(self, base_iterations):
        self.base_iterations = base_iterations

    def __call__(self, tau):
        return 0.01 ** (min(tau, self.base_iterations) / self.base_iterations)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=128, help="the base batch: images per forward/backward")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-limit", type=int, help="train on the first N images only (quick runs)")
    parser.add_argument("--test-limit", type=int, help="test on the first N images only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    data = load_dataset("fashion-mnist", seed=args.seed, train_limit=args.train_limit, test_limit=args.test_limit)
    images, labels = data.train.images.to(device), data.train.labels.to(device)
    steps_per_epoch = len(labels) // args.batch
    if steps_per_epoch == 0:
        parser.error(f"--batch {args.batch} is larger than the training set ({len(labels)} images)")
    model = LeNet5(batch_norm=True).to(device)

    stats = largebatch.GradientStatistics(model)  # n = micro-batches per update
    opt = largebatch.AdaScale(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, stats=stats)
    T1 = args.epochs * len(labels) // args.micro_batch  # iterations of the base-batch schedule
    sched = largebatch.ProgressLR(opt, ExponentialDecay(T1))

    step = 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(labels), device=device)
        for i in range(steps_per_epoch):
            micro_batches = order[i * args.batch : (i + 1) * args.batch].split(args.micro_batch)
            opt.zero_grad()  # also starts a new step of the statistics
            for batch in micro_batches:
                loss = F.cross_entropy(model(images[batch]), labels[batch])
                (loss / len(micro_batches)).backward()
            opt.step()  # gain r_t from stats.summary(), rate r_t * eta0(tau), tau += r_t
            sched.step()
            step += 1
            if opt.done(T1):
                break
        test = accuracy(model, data.test.images.to(device), data.test.labels.to(device))
        print(f"epoch {epoch + 1}: step {step}  loss {loss.item():.4f}  test accuracy {test:.2%}  "
              f"gain {opt.last_gain.item():.2f} of n = {len(micro_batches)}  tau {opt.progress.item():.0f} of T1 = {T1}")
        if opt.done(T1):
            break


if __name__ == "__main__":
    main()
