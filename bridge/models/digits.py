"""The embedded default model: a small CNN trained on sklearn's real 8×8 digits.

Data: `sklearn.datasets.load_digits()` (1,797 real handwritten digits), pixels / 16,
stratified 75/25 split with `random_state=0`. The weights (`digits_cnn.safetensors`)
were produced by `python -m bridge.models.digits` (fixed seed) and ship in the package.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch
from torch import nn

WEIGHTS = "digits_cnn.safetensors"


class DigitsCNN(nn.Module):
    """3 conv + BN + ReLU blocks, then 2 linear layers (~40 k parameters)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 2 * 2, 48), nn.ReLU(), nn.Linear(48, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(x_train, y_train, x_test, y_test)`; x: float32 [N, 1, 8, 8] in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.25, stratify=d.target, random_state=0)
    return torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte)


def load_digits_cnn() -> DigitsCNN:
    """The pretrained digits CNN in eval mode."""
    from safetensors.torch import load

    model = DigitsCNN()
    blob = resources.files(__package__).joinpath(WEIGHTS).read_bytes()
    model.load_state_dict(load(blob))
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` on `(x, y)`."""
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / len(x)


def train(seed: int = 0, epochs: int = 40) -> DigitsCNN:
    """Train from scratch (Adam, cross-entropy, light shift augmentation)."""
    torch.manual_seed(seed)
    xtr, ytr, _, _ = digits_split()
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


if __name__ == "__main__":  # regenerate the shipped weights
    from pathlib import Path

    from safetensors.torch import save_file

    m = train()
    _, _, xte, yte = digits_split()
    print(f"test accuracy: {accuracy(m, xte, yte):.4f}")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(Path(__file__).with_name(WEIGHTS)))
