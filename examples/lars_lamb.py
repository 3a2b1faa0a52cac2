"""LARS or LAMB in a plain training loop on Fashion-MNIST.

Biases and normalisation weights are excluded from weight decay; every tensor
takes the layer-wise trust ratio (largebatch.param_groups' defaults). The rate tuned at batch 128
is scaled to the large batch (linear for LARS, square root for LAMB), warmed
up gradually over the first 5.5% of the epochs and decayed exponentially.

    python examples/lars_lamb.py --optimizer lars --batch 8192 --epochs 5
    python examples/lars_lamb.py --optimizer lamb --device cuda
"""

import argparse

import torch
import torch.nn.functional as F

import largebatch
from largebatch.data import load_dataset
from largebatch.models import MLP


@torch.no_grad()
def accuracy(model, images, labels, batch=4096):
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum() for x, y in zip(images.split(batch), labels.split(batch)))
    model.train()
    return correct.item() / len(labels)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=("lars", "lamb"), default="lars")
    parser.add_argument("--batch", type=int, default=8192)
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
    model = MLP().to(device)

    # Base rates tuned at batch 128 (largebatch/train/methods.py), scaled to the batch.
    groups = largebatch.param_groups(model, weight_decay=5e-4)
    if args.optimizer == "lars":
        base_lr = 3.0  # LARS's rate multiplies its trust ratio, 1e-3 * ||w|| / ||g||
        opt = largebatch.LARS(groups, lr=largebatch.linear_scaling(base_lr, 128, args.batch), momentum=0.9)
    else:
        base_lr = 0.01
        opt = largebatch.LAMB(groups, lr=largebatch.sqrt_scaling(base_lr, 128, args.batch))
    total_steps = steps_per_epoch * args.epochs
    decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.01 ** (1 / total_steps))
    sched = largebatch.warmup_then(
        opt, decay, warmup_epochs=0.055 * args.epochs, steps_per_epoch=steps_per_epoch, start_lr=base_lr
    )

    for epoch in range(args.epochs):
        order = torch.randperm(len(labels), device=device)
        for step in range(steps_per_epoch):
            batch = order[step * args.batch : (step + 1) * args.batch]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        ratios = opt.trust_ratios_by_name()  # the last step's per-layer trust ratios (1 where not adapted)
        test = accuracy(model, data.test.images.to(device), data.test.labels.to(device))
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}  test accuracy {test:.2%}  "
              f"trust ratio of 1.weight {ratios['1.weight'].item():.3g}")


if __name__ == "__main__":
    main()
