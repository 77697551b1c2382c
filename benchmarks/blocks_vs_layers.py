"""Block reconstruction against layer-wise reconstruction, W4A8: metric, time and peak memory.

    python benchmarks/blocks_vs_layers.py
    python benchmarks/blocks_vs_layers.py --models digits digits_resnet --subsets 1 2 3
    python benchmarks/blocks_vs_layers.py --models efficientnet_lite0_unseen --algos adaround qdrop --subsets 1
    python benchmarks/blocks_vs_layers.py --models minilm --algos adaround+qdrop --config '{"recon_holdout": 0.25}'
    python benchmarks/blocks_vs_layers.py --models efficientnet_lite0_unseen --algos qdrop --block-steps 10 \
        --config '{"memory_budget": 65536}'   # peak memory without the block programs' budget

W4A8 histogram, bias correction on (the default), `quantize_first_last="8bit"` (the
papers' convention: first and last layer's weights and the last layer's input at 8 bits).
Algorithms: round to nearest, AdaRound (1000 steps per layer), GPTQ, QDrop and BRECQ (300 steps per
block), and AdaRound then QDrop from AdaRound's codes, each with their defaults otherwise.
Every (model, algorithm, subset) runs in a fresh process with the compilation cache off;
`peak MiB` is the largest resident memory sampled every 20 ms over the whole process
(model, data and evaluation included), `run s` the `Calibrator(...).run()` seconds.
Rows: mean ± std over the calibration subsets, then each subset's values.

Models, each calibrated on data it is not evaluated on:

- `digits`: the shipped digits CNN (`bridge.models.digits`); 256 training digits chosen by
  the subset's seed, top-1, and agreement and KL with the float model on the 450 test digits.
- `digits_resnet`: a small residual CNN trained here on the same digits (seed 0, 30 epochs,
  a few seconds); same protocol. Its blocks are the residual units (max pooling between them).
- `digits_mobilenet`: a MobileNetV2-style CNN trained here the same way (inverted residual
  blocks with depthwise convolutions), the check on an architecture nothing was tuned on.
- `minilm`: all-MiniLM-L6-v2; 64 passages (`--calib-size`; subset 1: the protocol's first 64, then the
  passages after the evaluation set in order; others drawn by
  seed from the passages after the evaluation set), mean / min cosine on 256 other passages.
- `efficientnet_lite0_unseen`: 64 crops (`--calib-size`) of the five calibration photos (crop seed = subset),
  agreement / KL with the float model on 128 crops of the three other photos; `gap`: the
  agreement on 128 new crops of the five calibration photos minus that on the unseen ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

ALGOS = {
    "rtn": {},
    "adaround": {"adaround": [True, 1000]},
    "gptq": {"gptq": True},
    "qdrop": {"qdrop": [True, 300]},
    "brecq": {"brecq": [True, 300]},
    "adaround+qdrop": {"adaround": [True, 1000], "qdrop": [True, 300]},
    "adaround+pd_quant": {"adaround": [True, 1000], "pd_quant": [True, 200]},
}
BLOCK_KEYS = ("brecq", "qdrop")  # the keep_acc entries `--block-steps` sets
SIZED = ("minilm", "efficientnet_lite0_unseen")  # the models `--calib-size` applies to
METRICS = {
    "digits": ("top1", "agreement", "kl"),
    "digits_resnet": ("top1", "agreement", "kl"),
    "digits_mobilenet": ("top1", "agreement", "kl"),
    "minilm": ("mean_cos", "min_cos"),
    "efficientnet_lite0_unseen": ("agreement", "kl", "gap"),
}


def _residual_digits_net():
    import torch
    from torch import nn

    class Residual(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    class DigitsResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
            self.blocks = nn.Sequential(Residual(24), nn.MaxPool2d(2), Residual(24), nn.MaxPool2d(2), Residual(24))
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(24 * 2 * 2, 10))

        def forward(self, x):
            return self.head(self.blocks(self.stem(x)))

    return DigitsResNet()


def _mobilenet_digits_net():
    """MobileNetV2-style: a 3×3 stem, four inverted residual blocks (1×1 expansion ×4, 3×3
    depthwise, 1×1 projection; ReLU6, BatchNorm; two of stride 2), a linear head."""
    import torch
    from torch import nn

    def conv_bn(cin, cout, k, stride=1, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return layers + [nn.ReLU6()] if act else layers

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            hidden = 4 * cin
            self.residual = stride == 1 and cin == cout
            self.body = nn.Sequential(
                *conv_bn(cin, hidden, 1),
                *conv_bn(hidden, hidden, 3, stride, groups=hidden),
                *conv_bn(hidden, cout, 1, act=False),
            )

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    class DigitsMobileNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(*conv_bn(1, 16, 3))
            self.blocks = nn.Sequential(
                InvertedResidual(16, 16, 1),
                InvertedResidual(16, 24, 2),
                InvertedResidual(24, 24, 1),
                InvertedResidual(24, 32, 2),
            )
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

        def forward(self, x):
            return self.head(self.blocks(self.stem(x)))

    torch.manual_seed(0)
    return DigitsMobileNet()


def train_digits_net(build, epochs: int = 30):
    import torch
    import torch.nn.functional as F

    from bridge.models.digits import digits_split

    torch.manual_seed(0)
    xtr, ytr, _, _ = digits_split()
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    return model.eval()


def _digits_case(make, subset: int):
    import numpy as np
    import torch

    from bridge.evaluation.metrics import agreement_and_kl
    from bridge.models.digits import accuracy, digits_split

    xtr, _, xte, yte = digits_split()
    chosen = torch.from_numpy(np.random.default_rng(subset).permutation(len(xtr))[:256])
    calib = [xtr[chosen[i : i + 32]] for i in range(0, 256, 32)]
    float_model = make()
    with torch.no_grad():
        fp = float_model(xte)

    def evaluate(model):
        with torch.no_grad():
            agree, kl = agreement_and_kl(fp, model(xte))
        return {"top1": accuracy(model, xte, yte), "agreement": agree, "kl": kl}

    return make, calib, evaluate


def _case(name: str, subset: int, size: int = 64):
    """`(make_model, calibration batches, evaluate)` of model `name` for calibration subset `subset`
    (`size`: calibration passages or crops; the digits nets take their 256 digits)."""
    from bridge.evaluation import metrics, zoo

    if name == "digits":
        from bridge.models.digits import load_digits_cnn

        return _digits_case(load_digits_cnn, subset)
    if name in ("digits_resnet", "digits_mobilenet"):
        build = _residual_digits_net if name == "digits_resnet" else _mobilenet_digits_net
        state = {k: v.clone() for k, v in train_digits_net(build).state_dict().items()}

        def make():
            m = build()
            m.load_state_dict(state)
            return m.eval()

        return _digits_case(make, subset)
    if name == "minilm":
        import numpy as np

        tokenizer, _ = zoo.minilm()
        passages = zoo.text_passages()
        pool = passages[320:]
        if subset == 1:  # the protocol's first 64, then the pool's first passages
            chosen = passages[: min(size, 64)] + pool[: max(size - 64, 0)]
        else:
            chosen = [pool[i] for i in np.random.default_rng(subset).choice(len(pool), size, replace=False)]
        calib = zoo.text_batches(tokenizer, chosen, batch_size=1)
        evaluation = zoo.text_batches(tokenizer, passages[64:320], batch_size=16)
        fp = metrics.sentence_embeddings(zoo.minilm()[1], evaluation)

        def evaluate(model):
            mean, low = metrics.cosine_stats(fp, metrics.sentence_embeddings(model, evaluation))
            return {"mean_cos": mean, "min_cos": low}

        return (lambda: zoo.minilm()[1]), calib, evaluate
    if name == "efficientnet_lite0_unseen":
        crops = zoo.image_crops(size, seed=subset, which=zoo.CALIBRATION_PHOTOS)
        evaluation = zoo.image_crops(128, seed=2, which=zoo.UNSEEN_PHOTOS)
        seen = zoo.image_crops(128, seed=1003, which=zoo.CALIBRATION_PHOTOS)  # new crops, fitted photos
        fp, fp_seen = (metrics.logits(zoo.efficientnet_lite0(), x) for x in (evaluation, seen))

        def evaluate(model):
            agree, kl = metrics.agreement_and_kl(fp, metrics.logits(model, evaluation))
            agree_seen, _ = metrics.agreement_and_kl(fp_seen, metrics.logits(model, seen))
            return {"agreement": agree, "kl": kl, "gap": agree_seen - agree}

        return zoo.efficientnet_lite0, [crops[i : i + 8] for i in range(0, len(crops), 8)], evaluate
    raise ValueError(f"model {name!r}: expected one of {sorted(METRICS)}")


def child(spec: dict) -> dict:
    """One run in this (fresh) process: the metric, run seconds, peak resident MiB."""
    import time

    import torch

    from common import PeakMemory

    torch.set_num_threads(spec["threads"])
    memory = PeakMemory()
    import jaxq
    from bridge import Calibrator, jit_cache

    jit_cache.disable()
    make, calib, evaluate = _case(spec["model"], spec["subset"], spec["calib_size"])
    cfg = jaxq.QuantConfig(
        w_bit=spec["w_bit"],
        a_bit=spec["a_bit"],
        quant_mode=1,
        act_method=2,
        quantize_first_last="8bit",
        keep_acc={k: [True, spec["block_steps"]] if k in BLOCK_KEYS else v for k, v in ALGOS[spec["algo"]].items()},
        **spec["extra"],
    )
    t = time.perf_counter()
    cal = Calibrator(make(), cfg, calib, progress=False).run()
    seconds = time.perf_counter() - t
    result = evaluate(cal.model)
    blocks = cal.reports.get("blocks", [])
    peak = memory.stop()
    return {
        **result,
        "seconds": seconds,
        "peak_mib": peak,
        "blocks_kept": f"{sum(b.kept for b in blocks)}/{len(blocks)}" if blocks else "",
    }


def main(argv=None):
    from common import mean_std  # here: the parent process imports no torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(METRICS), choices=sorted(METRICS))
    ap.add_argument("--algos", nargs="*", default=list(ALGOS), choices=sorted(ALGOS))
    ap.add_argument("--subsets", type=int, nargs="*", default=[1, 2, 3], help="seeds of the calibration data")
    ap.add_argument("--w-bit", type=int, default=4)
    ap.add_argument("--a-bit", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block-steps", type=int, default=300, help="QDrop's and BRECQ's steps per block")
    ap.add_argument(
        "--calib-size", type=int, default=64, help="calibration passages (minilm) or crops (efficientnet_lite0_unseen)"
    )
    ap.add_argument("--config", default="{}", help="more QuantConfig fields as JSON, e.g. '{\"recon_holdout\": 0.25}'")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    unsized = [m for m in args.models if m not in SIZED]
    if args.calib_size != 64 and unsized:
        ap.error(f"--calib-size={args.calib_size} applies to {list(SIZED)} only; {unsized} calibrate on 256 digits")
    for name in args.models:
        keys = METRICS[name]
        extra = json.loads(args.config)
        setting = f"W{args.w_bit}A{args.a_bit}, first/last 8 bit, bias correction, {extra}; subsets {args.subsets}"
        setting += f", {args.calib_size} calibration samples"
        print(f"\n{name} {setting}", flush=True)
        header = "".join(f"{k:>20}" for k in keys) + f"{'run s':>8}{'peak MiB':>10}{'blocks kept':>13}"
        print(f"{'algorithm':<15}{header}")
        for algo in args.algos:
            runs = []
            for subset in args.subsets:
                spec = {"model": name, "algo": algo, "subset": subset, "threads": args.threads}
                spec.update(w_bit=args.w_bit, a_bit=args.a_bit, extra=extra, block_steps=args.block_steps)
                spec.update(calib_size=args.calib_size)
                out = subprocess.run(
                    [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True
                )
                if out.returncode:
                    raise RuntimeError(f"{name} {algo} subset {subset} failed:\n{out.stderr[-3000:]}")
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(
                f"{algo:<15}"
                + "".join(f"{mean_std([r[k] for r in runs], 4):>20}" for k in keys)
                + f"{statistics.mean(r['seconds'] for r in runs):>8.0f}{max(r['peak_mib'] for r in runs):>10.0f}"
                + f"{' '.join(r['blocks_kept'] for r in runs):>13}",
                flush=True,
            )
            if len(runs) > 1:  # each subset's values, for pooling with later runs
                for subset, r in zip(args.subsets, runs):
                    print(f"{'  subset ' + str(subset):<15}" + "".join(f"{r[k]:>20.4f}" for k in keys), flush=True)


if __name__ == "__main__":
    main()
