"""Train the bundled digit classifier (the feature extractor of FD-digits) on scikit-learn's digits.

    OMP_NUM_THREADS=1 python -m iia.models.zoo.train_classifier [--out models/zoo/digits_classifier.pt]

Seeded and reproducible on CPU. Trains on the stratified 80% split of `data.train_test_indices()` and
reports accuracy on the held-out 20% (which it never trains on); the checkpoint is a plain dict
(format "iia-zoo-v1") loadable with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from iia.cli import cli_parser

from .classifier import BUNDLED_CLASSIFIER, FORMAT, DigitClassifier
from .data import SPLIT_SEED, load_digits_tensors, random_shift, train_test_indices


def accuracy(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main(argv: list[str] | None = None) -> dict:
    parser = cli_parser("python -m iia.models.zoo.train_classifier", __doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=BUNDLED_CLASSIFIER)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits_tensors()
    train_idx, test_idx = train_test_indices(SPLIT_SEED)
    x_train, y_train = images[train_idx], labels[train_idx]
    x_test, y_test = images[test_idx], labels[test_idx]

    config = dict(channels=32, feature_dim=128, num_classes=10, dropout=0.3)
    model = DigitClassifier(**config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = (len(x_train) + args.batch - 1) // args.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    start = time.time()
    bar = tqdm(range(args.epochs), desc="classifier", unit="epoch")
    for _ in bar:
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(order), args.batch):
            idx = order[i : i + args.batch]
            xb = random_shift(x_train[idx], gen, max_shift=1, vertical=True, prob=0.5)
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
        bar.set_postfix(loss=f"{total / len(x_train):.4f}")
    elapsed = time.time() - start
    train_acc = accuracy(model, x_train, y_train)
    test_acc = accuracy(model, x_test, y_test)
    print(f"train accuracy {train_acc:.4f}  held-out test accuracy {test_acc:.4f}  ({elapsed:.1f} s)")
    ckpt = {
        "format": FORMAT,
        "config": config,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "train": {
            "seed": args.seed,
            "split_seed": SPLIT_SEED,
            "epochs": args.epochs,
            "batch": args.batch,
            "lr": args.lr,
            "n_train": len(x_train),
            "n_test": len(x_test),
            "train_accuracy": train_acc,
            "test_accuracy": test_acc,
            "time_s": round(elapsed, 1),
            "torch": str(torch.__version__),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, args.out)
    print(f"saved {args.out}")
    return ckpt["train"]


if __name__ == "__main__":
    main()
