"""A small EDM-style U-Net for 8x8 images, written for iia's bundled digits model.

Architecture (all our own code):

* noise conditioning: sinusoidal positional embedding of c_noise = ln(sigma)/4, then a two-layer MLP;
  the class label (int64) goes through an `nn.Embedding` whose output is added to the noise embedding;
* residual blocks: GroupNorm -> SiLU -> 3x3 conv -> (scale, shift) from the embedding -> GroupNorm -> SiLU
  -> dropout -> 3x3 conv, plus a 1x1 skip when the width changes;
* resolutions 8x8 -> 4x4 -> 2x2 (strided conv down, nearest + conv up), skip connections by concatenation;
* multi-head self-attention at exactly one resolution (4x4 by default), in the encoder and decoder;
* EDM preconditioning with sigma_data = 0.5:
  D(x; s) = c_skip x + c_out F(c_in x, c_noise, labels).

The forward pass has no Python control flow on tensor values, so `torch.onnx.export(..., dynamo=True)`
exports it with a dynamic batch axis.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class SinusoidalEmbedding(nn.Module):
    """Maps a [B] float tensor to [B, dim] cos/sin features with geometrically spaced frequencies in (0, 1]."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError("embedding dim must be even")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.reshape(-1, 1).to(torch.float32) * self.freqs.reshape(1, -1)
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm0 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * out_ch)
        self.norm1 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        h = self.norm1(h) * (1 + scale) + shift
        h = self.conv1(self.dropout(F.silu(h)))
        return (h + self.skip(x)) * (1 / math.sqrt(2))


class SelfAttention(nn.Module):
    def __init__(self, channels: int, head_dim: int = 32):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.head_dim = channels // self.heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, self.head_dim, h * w)
        q, k, v = qkv.unbind(1)  # each [B, heads, head_dim, N]
        logits = torch.matmul(q.transpose(-1, -2), k) * (1 / math.sqrt(self.head_dim))  # [B, heads, N, N]
        attn = torch.softmax(logits, dim=-1)
        out = torch.matmul(v, attn.transpose(-1, -2))  # [B, heads, head_dim, N]
        return (x + self.proj(out.reshape(b, c, h, w))) * (1 / math.sqrt(2))


class Block(nn.Module):
    """A residual block optionally followed by self-attention."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, attention: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout)
        self.attn = SelfAttention(out_ch) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, emb))


class UNet(nn.Module):
    """EDM-preconditioned U-Net: `forward(x [B,C,H,W], sigma [B], class_labels int64 [B]) -> x0 estimate`."""

    def __init__(
        self,
        img_channels: int = 1,
        img_resolution: int = 8,
        model_channels: int = 32,
        channel_mult: tuple[int, ...] | list[int] = (1, 2, 2),
        num_blocks: int = 1,
        attn_resolution: int = 4,
        label_dim: int = 10,
        emb_dim: int = 128,
        dropout: float = 0.1,
        sigma_data: float = 0.5,
    ):
        super().__init__()
        self.img_channels = int(img_channels)
        self.img_resolution = int(img_resolution)
        self.label_dim = int(label_dim)
        self.sigma_data = float(sigma_data)
        channel_mult = tuple(int(m) for m in channel_mult)

        self.pos_emb = SinusoidalEmbedding(model_channels)
        self.map0 = nn.Linear(model_channels, emb_dim)
        self.map1 = nn.Linear(emb_dim, emb_dim)
        self.class_emb = nn.Embedding(label_dim, emb_dim) if label_dim > 0 else None

        self.conv_in = nn.Conv2d(img_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()  # ("block" | "downsample", module) in order
        self.down_kinds: list[str] = []
        skip_channels = [model_channels]
        ch = model_channels
        res = img_resolution
        for level, mult in enumerate(channel_mult):
            if level > 0:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                self.down_kinds.append("downsample")
                res //= 2
                skip_channels.append(ch)
            for _ in range(num_blocks):
                out = model_channels * mult
                self.down.append(Block(ch, out, emb_dim, dropout, res == attn_resolution))
                self.down_kinds.append("block")
                ch = out
                skip_channels.append(ch)

        self.mid0 = Block(ch, ch, emb_dim, dropout, False)
        self.mid1 = Block(ch, ch, emb_dim, dropout, False)

        self.up = nn.ModuleList()
        self.up_kinds: list[str] = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_blocks + 1):
                out = model_channels * mult
                self.up.append(Block(ch + skip_channels.pop(), out, emb_dim, dropout, res == attn_resolution))
                self.up_kinds.append("block")
                ch = out
            if level > 0:
                self.up.append(nn.Conv2d(ch, ch, 3, padding=1))
                self.up_kinds.append("upsample")
                res *= 2
        assert not skip_channels

        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, img_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def raw(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """The unpreconditioned network F."""
        emb = self.map1(F.silu(self.map0(self.pos_emb(c_noise))))
        if self.class_emb is not None:
            emb = emb + self.class_emb(class_labels.reshape(-1).to(torch.int64))
        emb = F.silu(emb)

        h = self.conv_in(x)
        skips = [h]
        for kind, module in zip(self.down_kinds, self.down):
            h = module(h) if kind == "downsample" else module(h, emb)
            skips.append(h)
        h = self.mid1(self.mid0(h, emb), emb)
        for kind, module in zip(self.up_kinds, self.up):
            if kind == "upsample":
                h = module(F.interpolate(h, scale_factor=2.0, mode="nearest"))
            else:
                h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        denom = sigma**2 + sd**2
        c_skip = sd**2 / denom
        c_out = sigma * sd / torch.sqrt(denom)
        c_in = 1 / torch.sqrt(denom)
        c_noise = torch.log(sigma).reshape(-1) / 4
        return c_skip * x + c_out * self.raw(c_in * x, c_noise, class_labels)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
