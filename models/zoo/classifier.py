"""A small CNN digit classifier for 8x8 inputs in [-1, 1]; its penultimate features define FD-digits.

`load_classifier()` returns the bundled, trained network (cached); `features(x)` gives the 128-d
penultimate-layer features and `predict(x)` the predicted labels, both for x float [N, 1, 8, 8] in [-1, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

FORMAT = "iia-zoo-v1"
BUNDLED_CLASSIFIER = Path(__file__).resolve().parent / "digits_classifier.pt"


class DigitClassifier(nn.Module):
    """conv32-conv32-pool-conv64-pool (8x8 -> 2x2) -> fc `feature_dim` (features) -> fc 10 (logits)."""

    def __init__(self, channels: int = 32, feature_dim: int = 128, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        self.conv0 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.fc = nn.Linear(2 * channels * 4, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv0(x.to(torch.float32)))
        h = F.max_pool2d(F.relu(self.conv1(h)), 2)  # 4x4
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # 2x2
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def read_checkpoint(path: str | Path) -> dict:
    """Load an `iia-zoo-v1` plain-dict checkpoint safely (weights_only=True) and check its format."""
    import pickle

    from ..base import weights_only_refusal

    try:
        ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ValueError(f"{path} is not a loadable {FORMAT} checkpoint ({weights_only_refusal(err)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not an {FORMAT} checkpoint")
    return ckpt


_CACHE: dict[str, DigitClassifier] = {}


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The trained classifier (eval mode, cached per path)."""
    path = Path(path) if path is not None else BUNDLED_CLASSIFIER
    key = str(path.resolve())
    if key not in _CACHE:
        ckpt = read_checkpoint(path)
        model = DigitClassifier(**ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        _CACHE[key] = model
    return _CACHE[key]


def _check(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise ValueError(f"expected digits of shape [N, 1, 8, 8], got {tuple(x.shape)}")
    return x.detach().to("cpu", torch.float32)


def features(x: torch.Tensor, model: DigitClassifier | None = None, batch_size: int = 1024) -> torch.Tensor:
    """Penultimate-layer features [N, 128] of digits x [N, 1, 8, 8] in [-1, 1]."""
    model = model or load_classifier()
    x = _check(x)
    with torch.no_grad():
        return torch.cat([model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)] or
                         [torch.zeros(0, model.fc.out_features)])


def predict(x: torch.Tensor, model: DigitClassifier | None = None, batch_size: int = 1024) -> torch.Tensor:
    """Predicted labels int64 [N] for digits x [N, 1, 8, 8] in [-1, 1]."""
    model = model or load_classifier()
    x = _check(x)
    with torch.no_grad():
        logits = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(logits).argmax(dim=1) if logits else torch.zeros(0, dtype=torch.int64)
