"""CLARS on a small transformer, no warm-up.

CLARS is LARS with each layer's gradient measured by the mean of the
per-example gradient norms instead of the norm of the batch gradient. The
engine computes those norms from each layer's input and output gradient
("ghost norms", no per-example gradients are formed). Each Fashion-MNIST image
is read as a sequence of 16 patches of 7x7 pixels.

    python examples/clars_transformer.py --batch 4096 --micro-batch 512 --epochs 5
    python examples/clars_transformer.py --device cuda
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import largebatch
from largebatch.data import load_dataset


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PatchTransformer(nn.Module):
    def __init__(self, dim=64, depth=2, heads=4, patch=7, image=28, classes=10):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch * patch, dim)
        self.position = nn.Embedding((image // patch) ** 2, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images):  # (B, 1, 28, 28) -> (B, 16, 49) patches
        p = self.patch
        x = images.unfold(2, p, p).unfold(3, p, p).reshape(images.shape[0], -1, p * p)
        positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        x = self.blocks(self.embed(x) + self.position(positions))
        return self.head(self.norm(x).mean(dim=1))


@torch.no_grad()
def accuracy(model, images, labels, batch=2048):
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum() for x, y in zip(images.split(batch), labels.split(batch)))
    model.train()
    return correct.item() / len(labels)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=512, help="images per forward/backward")
    parser.add_argument("--lr", type=float, default=10.0, help="base rate at batch 128, scaled linearly")
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
    model = PatchTransformer().to(device)

    stats = largebatch.GradientStatistics(model, per_example=True)
    # no_adapt=(): without a warm-up every tensor takes its trust ratio, biases and norm weights too
    groups = largebatch.param_groups(model, weight_decay=5e-4, no_adapt=())
    opt = largebatch.CLARS(groups, lr=largebatch.linear_scaling(args.lr, 128, args.batch), stats=stats)
    total_steps = steps_per_epoch * args.epochs
    decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.01 ** (1 / total_steps))

    for epoch in range(args.epochs):
        order = torch.randperm(len(labels), device=device)
        for step in range(steps_per_epoch):
            micro_batches = order[step * args.batch : (step + 1) * args.batch].split(args.micro_batch)
            opt.zero_grad()  # also starts a new step of the statistics
            for batch in micro_batches:
                loss = F.cross_entropy(model(images[batch]), labels[batch])
                (loss / len(micro_batches)).backward()
            opt.step()  # trust ratios from the mean per-example layer norms
            decay.step()
        ratios = opt.trust_ratios_by_name()
        test = accuracy(model, data.test.images.to(device), data.test.labels.to(device))
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}  test accuracy {test:.2%}  "
              f"trust ratio of head.weight {ratios['head.weight'].item():.3g}")


if __name__ == "__main__":
    main()
