"""Random-weight models shaped like the ones new users brought (issue #21), built from
`torch.nn`, each with calibration batches of its real input shape.

    pitch_cnn    CREPE-like pitch estimator: 1024-sample frames, six conv blocks whose
                 BatchNorm follows the ReLU (nothing may fuse), one linear head
    pnet/rnet/onet  MTCNN's face detectors: PReLU convs, a probability and a box head
    efficientnet_260  EfficientNet-Lite2 at 260 px (random weights)
    vgg_unet     CRAFT-like text detector: VGG16-BN backbone, U-Net upsampling to two maps

`MODELS[name]() -> (model, calib_batches)`; seeds are fixed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _seed() -> None:
    torch.manual_seed(0)


def pitch_cnn():
    _seed()

    class Pitch(nn.Module):
        def __init__(self):
            super().__init__()
            widths = [1, 128, 16, 16, 16, 32, 64]
            kernels, strides = [512, 64, 64, 64, 64, 64], [4, 1, 1, 1, 1, 1]
            self.blocks = nn.ModuleList(
                nn.Sequential(
                    nn.Conv2d(
                        widths[i],
                        widths[i + 1],
                        (kernels[i], 1),
                        (strides[i], 1),
                        padding=(254, 0) if i == 0 else "same",
                    ),
                    nn.ReLU(),
                    nn.BatchNorm2d(widths[i + 1]),
                    nn.MaxPool2d((2, 1)),
                )
                for i in range(6)
            )
            self.head = nn.Linear(64 * 4, 360)

        def forward(self, audio):
            x = audio[:, None, :, None]
            for b in self.blocks:
                x = b(x)
            return torch.sigmoid(self.head(x.flatten(1)))

    model = Pitch().eval()
    for m in model.modules():  # trained-looking BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(0, 0.5)
            m.running_var.uniform_(0.5, 2)
    return model, [torch.randn(16, 1024) * 0.3 for _ in range(4)]


def _mtcnn(convs, head_in: int, heads: dict[str, int], size: int, flatten: bool):
    _seed()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            layers, c = [], 3
            for out, k, pool in convs:
                layers += [nn.Conv2d(c, out, k), nn.PReLU(out)] + (
                    [nn.MaxPool2d(*pool, ceil_mode=True)] if pool else []
                )
                c = out
            self.body = nn.Sequential(*layers)
            self.fc = nn.Sequential(nn.Linear(head_in, 128 if head_in < 1000 else 256), nn.PReLU()) if flatten else None
            width = (128 if head_in < 1000 else 256) if flatten else c
            make = (lambda o: nn.Linear(width, o)) if flatten else (lambda o: nn.Conv2d(width, o, 1))
            self.heads = nn.ModuleDict({n: make(o) for n, o in heads.items()})

        def forward(self, x):
            h = self.body(x)
            if self.fc is not None:
                h = self.fc(h.flatten(1))
            out = {n: head(h) for n, head in self.heads.items()}
            out["prob"] = F.softmax(out["prob"], dim=1)
            return out["prob"], out["box"]

    return Net().eval(), [torch.rand(16, 3, size, size) * 2 - 1 for _ in range(4)]


def pnet():
    return _mtcnn([(10, 3, (2, 2)), (16, 3, None), (32, 3, None)], 0, {"prob": 2, "box": 4}, 48, flatten=False)


def rnet():
    return _mtcnn(
        [(28, 3, (3, 2)), (48, 3, (3, 2)), (64, 2, None)], 64 * 3 * 3, {"prob": 2, "box": 4}, 24, flatten=True
    )


def onet():
    return _mtcnn(
        [(32, 3, (3, 2)), (64, 3, (3, 2)), (64, 3, (2, 2)), (128, 2, None)],
        128 * 3 * 3,
        {"prob": 2, "box": 4, "landmarks": 10},
        48,
        flatten=True,
    )


def efficientnet_260():
    from efficientnet_lite_pytorch import EfficientNet

    _seed()
    model = EfficientNet.from_name("efficientnet-lite2").eval()
    return model, [torch.randn(4, 3, 260, 260) for _ in range(4)]


def vgg_unet():
    _seed()

    def vgg_block(c_in, c_out, n):
        layers = []
        for i in range(n):
            layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        return nn.Sequential(*layers)

    def up(c_in, c_mid, c_out):
        return nn.Sequential(
            nn.Conv2d(c_in, c_mid, 1),
            nn.BatchNorm2d(c_mid),
            nn.ReLU(),
            nn.Conv2d(c_mid, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )

    class Craft(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList(
                [
                    vgg_block(3, 64, 2),
                    vgg_block(64, 128, 2),
                    vgg_block(128, 256, 3),
                    vgg_block(256, 512, 3),
                    vgg_block(512, 512, 3),
                ]
            )
            self.up = nn.ModuleList([up(1024, 512, 256), up(512, 256, 128), up(256, 128, 64), up(128, 64, 32)])
            self.head = nn.Sequential(
                nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 1), nn.ReLU(), nn.Conv2d(16, 2, 1)
            )

        def forward(self, x):
            feats = []
            for i, s in enumerate(self.stages):
                x = s(x if i == 0 else F.max_pool2d(x, 2))
                feats.append(x)
            y = feats[-1]
            for u, skip in zip(self.up, reversed(feats[:-1])):
                y = F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=False)
                y = u(torch.cat([y, skip], 1))
            return self.head(y)

    model = Craft().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2)
    return model, [torch.randn(2, 3, 192, 192) for _ in range(4)]


MODELS = {
    "pitch_cnn": pitch_cnn,
    "pnet": pnet,
    "rnet": rnet,
    "onet": onet,
    "efficientnet_260": efficientnet_260,
    "vgg_unet": vgg_unet,
}


def _float_seconds(model, data) -> float:
    import time

    with torch.no_grad():
        t0 = time.perf_counter()
        for b in data:
            model(b)
        return time.perf_counter() - t0


def main(argv=None) -> None:
    """Warm calibration over the float forward on each architecture (W8A8 histogram, every
    layer): each warm `run()` paired with a float forward just before it, median of 5."""
    import statistics
    import time
    import warnings

    import jaxq
    from bridge import Calibrator
    from common import parse_args

    warnings.simplefilter("ignore")
    args = parse_args(main.__doc__, list(MODELS), argv)
    print(f"{'model':<18} {'params':>9} {'fp s':>6} {'warm s':>7} {'warm/fp':>7} {'cold s':>7} {'compiles':>9}")
    for name in args.models:
        model, data = MODELS[name]()
        cfg = jaxq.QuantConfig(quant_mode=1, act_method=2, quantize_first_last=True)
        cal = Calibrator(model, cfg, data, progress=False)
        with jaxq.compile_count() as c:
            t0 = time.perf_counter()
            cal.run()
            cold = time.perf_counter() - t0
        floors, times = [], []
        for _ in range(5):
            cal.disable_quant()
            floors.append(_float_seconds(cal.model, data))
            t0 = time.perf_counter()
            cal.run()
            times.append(time.perf_counter() - t0)
        ratio = statistics.median(t / f for t, f in zip(times, floors))
        print(
            f"{name:<18} {sum(p.numel() for p in model.parameters()):>9} {statistics.median(floors):>6.2f} "
            f"{statistics.median(times):>7.2f} {ratio:>7.2f} {cold:>7.2f} {c.count:>9}",
            flush=True,
        )


if __name__ == "__main__":
    main()
