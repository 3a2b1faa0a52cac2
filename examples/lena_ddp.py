"""LENA under torchrun: DDP, gradient accumulation and bf16 autocast.

Each update averages the gradients of n = workers x micro-batches samples of
--micro-batch images. LENA reads its per-layer statistics (A_k, B_k) from
largebatch.GradientStatistics attached to the DDP module: every worker
accumulates its micro-batches under no_sync() and the last one synchronises.

    torchrun --standalone --nproc-per-node 2 examples/lena_ddp.py --batch 8192 --micro-batch 128
    torchrun --nproc-per-node 4 examples/lena_ddp.py --device cuda      # NCCL, one GPU per rank
    python examples/lena_ddp.py --batch 1024                             # one process works too
"""

import argparse
import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import largebatch
from largebatch.data import load_dataset
from largebatch.models import MLP
from largebatch.train.distributed import retire_collectives


@torch.no_grad()
def accuracy(model, images, labels, batch=4096):
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum() for x, y in zip(images.split(batch), labels.split(batch)))
    model.train()
    return correct.item() / len(labels)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8192, help="global batch of one update")
    parser.add_argument("--micro-batch", type=int, default=128, help="images per forward/backward (the base batch)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in float32")
    parser.add_argument("--train-limit", type=int, help="train on the first N images only (quick runs)")
    parser.add_argument("--test-limit", type=int, help="test on the first N images only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # set by torchrun
    device = torch.device(args.device)
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if args.batch % (world * args.micro_batch):
        parser.error(f"--batch must be a multiple of workers x --micro-batch = {world * args.micro_batch}")
    per_worker = args.batch // world

    torch.manual_seed(args.seed)  # the same weights and the same data order on every rank
    data = load_dataset("fashion-mnist", seed=args.seed, train_limit=args.train_limit, test_limit=args.test_limit)
    images, labels = data.train.images.to(device), data.train.labels.to(device)
    steps_per_epoch = len(labels) // args.batch
    if steps_per_epoch == 0:
        parser.error(f"--batch {args.batch} is larger than the training set ({len(labels)} images)")
    model = MLP().to(device)
    ddp = DDP(model) if distributed else model

    stats = largebatch.GradientStatistics(ddp)  # the DDP module: n = workers x micro-batches
    total_steps = steps_per_epoch * args.epochs
    opt = largebatch.LENA(
        largebatch.param_groups(model, weight_decay=5e-4, no_adapt=()),  # no decay on biases; every tensor its gain
        lr=0.1,  # the rate tuned at the base batch; LENA scales it per layer by its gain
        stats=stats,
        base_iterations=total_steps * args.batch // args.micro_batch,  # T1: iterations at the base batch
    )
    decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.01 ** (1 / total_steps))

    for epoch in range(args.epochs):
        order = torch.randperm(len(labels), device=device)
        for step in range(steps_per_epoch):
            mine = order[step * args.batch : (step + 1) * args.batch][rank * per_worker : (rank + 1) * per_worker]
            micro_batches = mine.split(args.micro_batch)
            opt.zero_grad()  # also starts a new step of the statistics
            for i, batch in enumerate(micro_batches):
                last = i == len(micro_batches) - 1
                with ddp.no_sync() if distributed and not last else contextlib.nullcontext():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                        loss = F.cross_entropy(ddp(images[batch]), labels[batch])
                    (loss / len(micro_batches)).backward()
            opt.step()  # reads n, A_k, B_k from stats.summary()
            decay.step()
        if rank == 0:
            gains = opt.by_name("gain")
            warming = int((opt.warmup_ends() < 0).sum())
            test = accuracy(model, data.test.images.to(device), data.test.labels.to(device))
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}  test accuracy {test:.2%}  "
                  f"gain of 1.weight {gains['1.weight'].item():.2f} (n = {len(micro_batches) * world})  "
                  f"layers still warming up {warming} of {len(opt.warmup_ends())}")

    if distributed:
        retire_collectives()  # a 50 ms pause: gloo's threads release finished collectives before exit
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
