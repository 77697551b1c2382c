"""SmoothQuant in the bridge (`QuantConfig.smooth_quant`; math: `jaxq.smoothing`).

One pass over the calibration data with the float model finds, for every Linear layer
and ungrouped 1×1 convolution whose input is quantized, its input's per-channel minimum and maximum and which layers
read the same tensor (one group: attention's q, k, v projections); with a grid of `α`
it also keeps a sample of input rows. Each group's factors `s` are then set on its
quantizers (`LayerQuantizer.set_smoothing`), before the activation statistics are taken,
so every later step sees `x / s` and `W·diag(s)`.

The factors stay in the quantizer instead of being folded into the operation before
the group (a LayerNorm's `γ, β`, or a previous Linear): in a post-LN transformer such as
BERT or MiniLM the LayerNorm's output also feeds the residual branch, so folding would
change the model. They are exported (`smooth_scale`) as a per-channel multiply before the
input quantizer, which a deployment folds wherever its graph allows.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bridge.capture.activations import listen
from bridge.capture.context import Context
from bridge.capture.tensors import to_jax
from bridge.inplace.fakequant import pointwise
from jaxq.smoothing import ChannelRange, search_alpha, smoothing_factors, weight_column_absmax

SEARCH_ROWS = 512  # input rows per group for the α search


def smoothable(quantizers: dict) -> dict:
    """The layers SmoothQuant applies to: Linear layers and ungrouped 1×1 convolutions
    (`pointwise`), quantized input, tapped by a hook."""
    return {
        n: q
        for n, q in quantizers.items()
        if q.act_scheme is not None
        and not q.functional
        and pointwise(tuple(q.original_weight.shape), getattr(q.module, "groups", 1))
    }


def channel_rows(x: torch.Tensor, weight_ndim: int) -> torch.Tensor:
    """`x` as rows of its input channels `[positions, in]`: a Linear's input as it is, a
    convolution's `[N, in, *spatial]` with the channel axis moved last."""
    if weight_ndim > 2:
        x = x.movedim(x.dim() - (weight_ndim - 1), -1)
    return x.reshape(-1, x.shape[-1])


class ChannelStats:
    """Listeners gathering per-channel input ranges, shared inputs and sampled rows."""

    def __init__(self, layers: dict, rows_per_batch: int, seed: int):
        self.layers, self.rows_per_batch = layers, rows_per_batch
        self.lo: dict[str, torch.Tensor] = {}
        self.hi: dict[str, torch.Tensor] = {}
        self.rows: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
        self.parent = {n: n for n in layers}  # union-find over layers reading one tensor
        self._batch_inputs: dict[int, tuple[torch.Tensor, str]] = {}
        self._generator = torch.Generator().manual_seed(seed)
        self._removers: list = []

    def _find(self, name: str) -> str:
        while self.parent[name] != name:
            name = self.parent[name]
        return name

    def _listener(self, name: str):
        def observe(x) -> None:
            if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
                return
            seen = self._batch_inputs.get(id(x))
            shared = seen is not None and seen[0] is x
            if shared:
                self.parent[self._find(name)] = self._find(seen[1])
            else:
                self._batch_inputs[id(x)] = (x, name)
            flat = channel_rows(x.detach(), self.layers[name].weight_ndim).float()
            lo, hi = flat.amin(0).cpu(), flat.amax(0).cpu()
            self.lo[name] = lo if name not in self.lo else torch.minimum(self.lo[name], lo)
            self.hi[name] = hi if name not in self.hi else torch.maximum(self.hi[name], hi)
            if self.rows_per_batch and not shared:
                take = torch.randperm(flat.shape[0], generator=self._generator)[: self.rows_per_batch]
                self.rows[name].append(flat[take.to(flat.device)].cpu())

        return observe

    def after_batch(self) -> None:
        self._batch_inputs.clear()  # no tensor outlives its batch

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name in self.layers:
            if name in self.lo:
                out.setdefault(self._find(name), []).append(name)
        return out

    def __enter__(self):
        self._removers = [listen(q, self._listener(n)) for n, q in self.layers.items()]
        return self

    def __exit__(self, *exc):
        for remove in self._removers:
            remove()
        self._removers.clear()
        self._batch_inputs.clear()
        return False


def smooth(ctx: Context) -> dict[str, dict]:
    """Set the SmoothQuant factors of every smoothable layer of `ctx`; return a report per
    group (leader → layers, chosen `α` (None: no smoothing won the search), errors)."""
    alphas = ctx.cfg.smooth_quant
    layers = smoothable(ctx.quantizers)
    for q in layers.values():
        q.set_smoothing(None)  # the statistics are of the unsmoothed input (a second run() too)
    if not layers:
        return {}
    search = len(alphas) > 1
    batches = ctx.num_batches() or 1
    stats = ChannelStats(
        layers, math.ceil(min(SEARCH_ROWS, ctx.cfg.recon_rows) / batches) if search else 0, ctx.cfg.seed
    )
    ctx.forward_all(stats, "jaxq smooth_quant", after_batch=stats.after_batch)
    report = {}
    for leader, names in stats.groups().items():
        lo = torch.stack([stats.lo[n] for n in names]).amin(0)
        hi = torch.stack([stats.hi[n] for n in names]).amax(0)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise FloatingPointError(
                f"layer {leader!r}: its input in calib_data contains NaN or Inf; check the data or the preceding layers"
            )
        weight = torch.cat([_matrix(layers[n].original_weight) for n in names])
        channel_range = ChannelRange(to_jax(lo), to_jax(hi))
        if search:
            rows = torch.cat(stats.rows[leader])[: min(SEARCH_ROWS, ctx.cfg.recon_rows)]
            s, errors = search_alpha(
                to_jax(rows),
                channel_range,
                to_jax(weight),
                np.asarray(alphas, np.float32),
                layers[leader].weight_scheme,
                layers[leader].act_scheme,
            )
            errors = np.asarray(errors)
            best = int(np.argmin(errors))
            alpha = None if best == 0 else alphas[best - 1]
        else:
            a_max = np.maximum(np.abs(np.asarray(lo)), np.abs(np.asarray(hi)))
            s = smoothing_factors(a_max, weight_column_absmax(to_jax(weight)), alphas[0])
            alpha, errors = alphas[0], None
        factors = torch.from_numpy(np.array(s, np.float32))
        for n in names:
            layers[n].set_smoothing(None if alpha is None else factors)
        report[leader] = {
            "layers": names,
            "alpha": alpha,
            "errors": None if errors is None else dict(zip(("none", *alphas), errors.tolist())),
        }
    return report


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    """A Linear's or 1×1 convolution's weight as `[out, in]` float32 on the CPU."""
    return weight.detach().float().cpu().reshape(weight.shape[0], weight.shape[1])
