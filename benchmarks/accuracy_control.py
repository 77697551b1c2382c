"""Accuracy control on EfficientNet-Lite0 W4A8: the fewest layers back in float so that a
user's score (agreement with FP32 on held-out crops) drops at most 1 %. Ranking by
isolated sensitivity (`engine="jax"`), bisection on the count; the fallen-back layers are
then checked to really run in float.

    python benchmarks/accuracy_control.py
    python benchmarks/accuracy_control.py --unseen     # calibrate on five photos, score on the three others
"""

from __future__ import annotations

import time

import torch

import jaxq
from bridge import Calibrator
from bridge.evaluation import protocols
from bridge.inplace.fakequant import quantizer_of
from common import parse_args


def main(argv=None):
    def extra(ap):
        ap.add_argument("--unseen", action="store_true")
        ap.add_argument("--max-drop", type=float, default=0.01)

    args = parse_args(__doc__, ["efficientnet_lite0"], argv, extra)
    p = protocols.efficientnet_lite0_unseen(64) if args.unseen else protocols.efficientnet_lite0()
    cfg = jaxq.QuantConfig(w_bit=4, a_bit=8)
    t0 = time.perf_counter()
    cal = Calibrator(p.make_model(), cfg, p.calib_data, progress=False).run()
    before = p.evaluate(cal.model)
    t1 = time.perf_counter()
    report = cal.quantize_with_accuracy_control(
        lambda m: p.evaluate(m)["agreement"], max_drop=args.max_drop, engine="jax"
    )
    t2 = time.perf_counter()
    after = p.evaluate(cal.model)
    fallen = cal.fallen_back
    modules = dict(cal.model.named_modules())
    really_float = all(quantizer_of(modules[n]) is None or not quantizer_of(modules[n]).quant_enabled for n in fallen)
    print(report)
    print(
        "\n| protocol | W4A8 (bias correction default) | after control | layers in float | of | calibration s | control s | validate calls |"  # noqa: E501 (a table row)
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {p.name} | agreement {before['agreement']:.3f}, KL {before['kl']:.3f} | agreement {after['agreement']:.3f}, "  # noqa: E501 (a table row)
        f"KL {after['kl']:.3f} | {len(fallen)} | {len(report.order)} | {t1 - t0:.0f} | {t2 - t1:.0f} | {len(report.scores)} |"  # noqa: E501 (a table row)
    )
    print("fallen-back layers run in float:", really_float)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
