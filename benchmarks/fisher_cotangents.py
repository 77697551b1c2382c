"""The Fisher ranking's cotangents: the categorical KL draw `onehot(y) − p` against the
Gaussian one (`jaxq.sensitivity.kl_cotangent`), one or two per batch.

    python benchmarks/fisher_cotangents.py                                  # EfficientNet-Lite0 W6A8
    python benchmarks/fisher_cotangents.py --models minilm --fallback-seeds 6

Defaults with `w_bit` (`--w-bit`, 6), then per variant and seed (`--seeds`): Spearman
correlation of the ranking with `"isolated"` (the exact distance it estimates), how many of
isolated's top 5 it shares, and the ranking's seconds (median). `--fallback-seeds N`: the
held-out metric after falling back each variant's top 5, seeds 0 … N − 1. Outputs that are
not logits use the Gaussian cosine cotangent in both variants (only the draws differ).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from scipy.stats import spearmanr

import jaxq.sensitivity as js
from bridge import Calibrator
from bridge.capture.data import run_model
from bridge.capture.tensors import to_jax
from bridge.evaluation import protocols
from bridge.inplace.fakequant import probing, quantization
from bridge.inplace.functional import one_attention_path
from bridge.studies import sensitivity as sens
from common import parse_args
from jaxq import QuantConfig

VARIANTS = (("categorical", 2), ("gaussian", 1), ("categorical", 1), ("gaussian", 2))


@jax.jit
def categorical_cotangent(key, logits):
    """The previous KL cotangent: `onehot(y) − p`, `y ~ p`."""
    y = jax.random.categorical(key, logits.astype(jnp.float32), axis=-1)
    return jax.nn.one_hot(y, logits.shape[-1], dtype=jnp.float32) - jax.nn.softmax(logits, axis=-1)


def _cotangents(key, out, draws, logits, kind):
    if kind == "gaussian" or not logits:
        return np.array(js.output_cotangents(key, out, draws, logits))
    return np.stack([np.array(categorical_cotangent(k, out)) for k in jax.random.split(key, draws)])


def fisher(model, layers, batches, kind, draws, seed):
    """`bridge.studies.sensitivity.fisher_sensitivity` with the cotangent `kind`."""
    key, total, rows = jax.random.key(seed), np.zeros(len(layers)), 0
    for i, batch in enumerate(batches):
        eps = torch.zeros(len(layers), sens.batch_rows(batch), requires_grad=True)
        with probing(layers, eps), torch.enable_grad():
            z = sens.primary_output(run_model(model, batch, i))
            key, sub = jax.random.split(key)
            cs = _cotangents(sub, to_jax(z.detach().float().contiguous()), draws, z.dim() == 2, kind)
            rows += z.shape[0]
            for k, c in enumerate(cs):
                (t,) = torch.autograd.grad(z, eps, torch.from_numpy(c), retain_graph=k + 1 < draws)
                total += 0.5 * np.square(t.double().numpy()).sum(axis=1) / draws
    return total / rows


def main(argv=None) -> None:
    args = parse_args(
        __doc__,
        ["efficientnet_lite0"],
        argv,
        lambda ap: (
            ap.add_argument("--w-bit", type=int, default=6),
            ap.add_argument("--seeds", type=int, default=6),
            ap.add_argument("--fallback-seeds", type=int, default=0),
        ),
    )
    for name in args.models:
        p = protocols.PROTOCOLS[name]()
        model = p.make_model()
        cal = Calibrator(model, QuantConfig(w_bit=args.w_bit), p.calib_data, progress=False).run()
        layers, batches, names = cal._quantizers(), cal.calibration_batches(), list(cal._quantizers())
        with one_attention_path():
            table = sens.sensitivity_table(model, layers, cal.specs, cal.all_layers, batches, ("isolated",))
        isolated = np.array([r["isolated"] for r in table.rows if r["quantized"]])
        top = set(np.argsort(-isolated)[:5])
        print(f"{name} W{args.w_bit}A8: variant, Spearman with isolated (mean ± std), top-5 shared, ranking s")
        for kind, draws in VARIANTS:
            rho, shared, seconds = [], [], []
            for seed in range(args.seeds):
                with one_attention_path(), quantization(layers, True):
                    t = time.perf_counter()
                    v = fisher(model, layers, batches, kind, draws, seed)
                    seconds.append(time.perf_counter() - t)
                rho.append(spearmanr(v, isolated)[0])
                shared.append(len(top & set(np.argsort(-v)[:5])))
            print(
                f"  {kind:<11} ×{draws}  {np.mean(rho):.3f} ± {np.std(rho):.3f}  "
                f"{np.mean(shared):.1f} {shared}  {statistics.median(seconds):.2f} s",
                flush=True,
            )
        for kind, draws in VARIANTS[:2] if args.fallback_seeds else ():
            metrics = []
            for seed in range(args.fallback_seeds):
                with one_attention_path(), quantization(layers, True):
                    v = fisher(model, layers, batches, kind, draws, seed)
                off = {names[j] for j in np.argsort(-v)[:5]}
                with quantization(layers, lambda n, off=off: n not in off):
                    metrics.append(p.evaluate(model))
            mean = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
            print(f"  fallback of the top 5, {kind} ×{draws}: mean {mean}; per seed {metrics}", flush=True)
        cal.restore()


if __name__ == "__main__":
    main()
