"""Train the bundled EDM digits denoiser (models/zoo/digits_edm.pt) on scikit-learn's 8x8 digits.

    OMP_NUM_THREADS=1 python -m iia.models.zoo.train_digits [--steps N] [--out PATH]

EDM training (Karras et al. 2022): ln(sigma) ~ N(P_mean=-1.2, P_std=1.2), loss weight
(sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 on the preconditioned denoiser, sigma_data = 0.5; Adam
with a linear warm-up and cosine decay; an exponential moving average (EMA) of the weights, which is what
gets saved. Augmentation: random horizontal shifts by one pixel (never flips: digits are not mirror
symmetric). Seeded and reproducible on CPU with one thread (the default). The checkpoint is a plain dict
(format "iia-zoo-v1": config, EMA state_dict, training record) loadable with `weights_only=True`.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from iia.cli import cli_parser

from . import BUNDLED_DIGITS
from .classifier import FORMAT
from .data import load_digits_tensors, random_shift
from .unet import UNet, count_params

DEFAULT_CONFIG = dict(
    img_channels=1,
    img_resolution=8,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolution=4,
    label_dim=10,
    emb_dim=64,
    dropout=0.1,
    sigma_data=0.5,
)


def edm_loss(net: UNet, x0: torch.Tensor, labels: torch.Tensor, gen: torch.Generator,
             p_mean: float = -1.2, p_std: float = 1.2) -> torch.Tensor:
    sd = net.sigma_data
    sigma = torch.exp(torch.randn(x0.shape[0], generator=gen) * p_std + p_mean)
    noise = torch.randn(x0.shape, generator=gen) * sigma.reshape(-1, 1, 1, 1)
    weight = ((sigma**2 + sd**2) / (sigma * sd) ** 2).reshape(-1, 1, 1, 1)
    denoised = net(x0 + noise, sigma, labels)
    return (weight * (denoised - x0) ** 2).mean()


def lr_at(step: int, total: int, peak: float, warmup: int, final_fraction: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, step: int, halflife_steps: float, rampup: float) -> None:
    """EMA with a half-life in optimizer steps, ramped up early on (half-life <= rampup * step)."""
    halflife = min(halflife_steps, rampup * (step + 1))
    beta = 0.5 ** (1.0 / max(halflife, 1e-8))
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - beta)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli_parser("python -m iia.models.zoo.train_digits", __doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=BUNDLED_DIGITS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=7000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema-halflife", type=float, default=500.0, help="EMA half-life in steps")
    parser.add_argument("--ema-rampup", type=float, default=0.1)
    parser.add_argument("--shift-prob", type=float, default=0.5, help="probability of a +-1 pixel horizontal shift")
    parser.add_argument("--model-channels", type=int, default=DEFAULT_CONFIG["model_channels"])
    parser.add_argument("--channel-mult", type=str, default=",".join(map(str, DEFAULT_CONFIG["channel_mult"])))
    parser.add_argument("--emb-dim", type=int, default=DEFAULT_CONFIG["emb_dim"])
    parser.add_argument("--num-blocks", type=int, default=DEFAULT_CONFIG["num_blocks"])
    parser.add_argument("--dropout", type=float, default=DEFAULT_CONFIG["dropout"])
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def train(args: argparse.Namespace, net: torch.nn.Module, ema: torch.nn.Module, gen: torch.Generator) -> float:
    """Run `args.steps` optimizer steps of EDM's loss on the digits; returns the smoothed final loss."""
    images, labels = load_digits_tensors()
    print(f"UNet {count_params(net):,} parameters; {len(images)} digits; {args.steps} steps of batch {args.batch}")
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.99), eps=1e-8)
    running = None
    order = torch.randperm(len(images), generator=gen)
    cursor = 0
    bar = tqdm(range(args.steps), desc="digits-edm", unit="step", mininterval=2.0)
    net.train()
    for step in bar:
        if cursor + args.batch > len(order):
            order, cursor = torch.randperm(len(images), generator=gen), 0
        idx = order[cursor : cursor + args.batch]
        cursor += args.batch
        x0 = random_shift(images[idx], gen, max_shift=1, vertical=False, prob=args.shift_prob)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = edm_loss(net, x0, labels[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema_update(ema, net, step, args.ema_halflife, args.ema_rampup)
        value = loss.item()
        running = value if running is None else 0.99 * running + 0.01 * value
        if step % 50 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{running:.4f}")
    return running


def train_record(args: argparse.Namespace, params: int, elapsed: float, final_loss: float) -> dict:
    """The checkpoint's `train` entry: how it was made."""
    return {
        "seed": args.seed,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "warmup": args.warmup,
        "ema_halflife_steps": args.ema_halflife,
        "ema_rampup": args.ema_rampup,
        "shift_prob": args.shift_prob,
        "p_mean": -1.2,
        "p_std": 1.2,
        "dataset": "sklearn.datasets.load_digits (all 1797, scaled to [-1, 1])",
        "params": params,
        "time_s": round(elapsed, 1),
        "threads": args.threads,
        "final_loss": round(float(final_loss), 5),
        "torch": str(torch.__version__),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    config = dict(DEFAULT_CONFIG)
    config.update(
        model_channels=args.model_channels,
        channel_mult=[int(m) for m in args.channel_mult.split(",")],
        emb_dim=args.emb_dim,
        num_blocks=args.num_blocks,
        dropout=args.dropout,
    )
    net = UNet(**config)
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    start = time.time()
    running = train(args, net, ema, gen)
    elapsed = time.time() - start
    print(f"done in {elapsed:.0f} s; smoothed final loss {running:.4f}")
    ckpt = {
        "format": FORMAT,
        "config": config,
        "state_dict": {k: v.detach().clone().contiguous() for k, v in ema.state_dict().items()},
        "train": train_record(args, count_params(net), elapsed, running),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, args.out)
    print(f"saved {args.out}")
    return ckpt["train"]


if __name__ == "__main__":
    main()
