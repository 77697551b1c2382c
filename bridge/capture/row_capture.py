"""Capture of layer-input rows (`jaxq.rows`) for EasyQuant and AdaRound, and of their
exact mean for bias correction.

A forward hook on each layer samples up to `rows` random output positions per batch and
keeps the input rows that produce them (im2col at those positions); every batch's input
is also summed (`batch_sum`), and the sums become the mean row once, at the end
(`window_sum`). On the first batch it checks the layer's geometry against its own output
— sampled rows against the outputs at those positions, or with no rows kept the mean row
against the mean output (`check_sums`): a layer whose `forward` does more than its
`LayerSpec` says (padding computed at run time, say) is reported by name instead of being
optimised or corrected against the wrong function."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import jaxq
from jaxq.host import aligned_concatenate
from jaxq.rows import output_positions
from bridge.capture.data import HookError
from bridge.inplace.fakequant import quantizer_of
from bridge.capture.tensors import layer_input

PARITY_TOLERANCE = 1e-3


class LayerGeometryError(HookError, ValueError):
    """A layer computes something its `LayerSpec` does not describe."""


def _windows(spec: jaxq.LayerSpec, x: torch.Tensor, first_spatial: int) -> torch.Tensor:
    """View of the padded `x` with one window per output position: spatial dims become
    `[*out_spatial, *kernel]` (dilation applied)."""
    pad = [p for lo_hi in reversed(spec.padding) for p in lo_hi]
    xp = F.pad(x, pad) if any(pad) else x
    for i, (k, s, dil) in enumerate(zip(spec.kernel, spec.stride, spec.dilation)):
        xp = xp.unfold(first_spatial + i, dil * (k - 1) + 1, s)
    taps = tuple(slice(None, None, dil) for dil in spec.dilation)
    return xp[(..., *taps)]


def window_rows(spec: jaxq.LayerSpec, x: torch.Tensor, index: np.ndarray) -> np.ndarray:
    """Rows `[m, g, d]` of a conv input `x` `[N, C, *spatial]` at flat output positions
    `index` — `jaxq.rows.take_rows` as one torch gather on a window view (no per-shape
    compilation)."""
    coords = [
        torch.from_numpy(c.astype(np.int64)) for c in np.unravel_index(index, output_positions(spec, tuple(x.shape)))
    ]
    patches = _windows(spec, x, 2)[(coords[0], slice(None), *coords[1:])]  # [m, C, *kernel]
    return patches.reshape(index.shape[0], spec.groups, -1).cpu().numpy()


def batch_sum(spec: jaxq.LayerSpec, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`(Σ over the batch, number of rows)`: a linear layer's rows summed (`[d]`), a conv's
    input summed over its samples (`[C, *spatial]`), in float32 (as exact as the forward
    that made `x`; a float64 sum of the whole batch costs ~35× more); batches add up in
    float64. Sums of equal-shaped batches add up before `window_sum`, which is linear."""
    if spec.kind == "linear":
        flat = x.reshape(-1, x.shape[-1])
        return flat.sum(0), flat.shape[0]
    return x.sum(0), x.shape[0] * int(np.prod(output_positions(spec, tuple(x.shape))[1:]))


def window_sum(spec: jaxq.LayerSpec, total: torch.Tensor) -> np.ndarray:
    """`Σ rows [g, d]` from a `batch_sum` total: a conv's rows sum, per kernel tap, over that
    tap's strided window of the summed input, one spatial dimension at a time (float64)."""
    if spec.kind == "linear":
        return total[None].cpu().numpy()
    shape = (1, *total.shape)
    pad = [p for lo_hi in reversed(spec.padding) for p in lo_hi]
    total = F.pad(total, pad) if any(pad) else total
    out = output_positions(spec, shape)[1:]
    for i, (k, s, dil, n) in enumerate(zip(spec.kernel, spec.stride, spec.dilation, out)):
        dim = 1 + i  # this spatial dimension becomes its taps: [C, *taps so far, *spatial left]
        window = s * (n - 1) + 1
        every = (slice(None),) * dim + (slice(None, None, s),)
        total = torch.stack([total.narrow(dim, t * dil, window)[every].sum(dim) for t in range(k)], dim)
    return total.reshape(spec.groups, -1).cpu().numpy()


def row_sum(spec: jaxq.LayerSpec, x: torch.Tensor) -> tuple[np.ndarray, int]:
    """`(Σ rows [g, d] in float64, number of rows)` over every output position of `x`."""
    total, count = batch_sum(spec, x)
    return window_sum(spec, total.double()), count


def _output_rows(spec: jaxq.LayerSpec, y: torch.Tensor, index: np.ndarray) -> np.ndarray:
    y = y.detach()
    if spec.kind == "linear":
        return y.reshape(-1, y.shape[-1])[torch.from_numpy(index)].float().cpu().numpy()
    coords = [torch.from_numpy(c.astype(np.int64)) for c in np.unravel_index(index, (y.shape[0], *y.shape[2:]))]
    return y[(coords[0], slice(None), *coords[1:])].float().cpu().numpy()  # [m, C]: no copy of the whole output


def _tolerance(module: nn.Module) -> float:
    # the module computes in its own dtype: bfloat16 rounds at 2^-8, far above float32's 1e-3 check
    return max(PARITY_TOLERANCE, 4 * torch.finfo(module.weight.dtype).eps)


def _geometry_error(name: str, spec: jaxq.LayerSpec, module: nn.Module, detail: str) -> LayerGeometryError:
    return LayerGeometryError(
        f"layer {name!r} ({type(module).__name__.removeprefix('Parametrized')}) does not compute the "
        f"convolution its LayerSpec describes ({spec}); {detail}. Its forward probably pads or "
        "reshapes at run time; keep it in float (disable_names) to use easy_quant, adaround or bias_correction"
    )


def check_rows(
    name: str,
    spec: jaxq.LayerSpec,
    module: nn.Module,
    rows: np.ndarray,
    y_rows: np.ndarray,
    weight: torch.Tensor | None = None,
) -> None:
    """Raise `LayerGeometryError` if `rows · Wᵀ + b` is not the module's output (`weight`:
    W when it is not `module.weight`, e.g. `W·diag(s)` for rows of a smoothed input)."""
    w = (module.weight if weight is None else weight).detach().float().cpu().numpy()
    g = rows.shape[1]
    wg = w.reshape(g, w.shape[0] // g, -1)
    # BLAS for dense layers (10–15× faster); depthwise ones are faster in einsum's own loop
    pred = np.einsum("mgd,god->mgo", rows.astype(np.float64), wg, optimize=wg.shape[1] > 1).reshape(rows.shape[0], -1)
    if module.bias is not None:
        pred = pred + module.bias.detach().float().cpu().numpy()
    err = np.max(np.abs(pred - y_rows)) if rows.shape[0] else 0.0
    scale = max(float(np.max(np.abs(y_rows))) if rows.shape[0] else 0.0, 1e-6)
    if not err <= _tolerance(module) * scale:
        raise _geometry_error(name, spec, module, f"max |Δ| {err:.3g} relative to output scale {scale:.3g}")


def check_sums(
    name: str,
    spec: jaxq.LayerSpec,
    module: nn.Module,
    total: np.ndarray,
    count: int,
    y: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> None:
    """Raise `LayerGeometryError` unless the rows' mean, through the layer, is the mean of
    its output: `E[row]·Wᵀ + b = E[y]` over every output position of one batch (`total`,
    `count`: `row_sum`), to the parity tolerance of `E|y|`. This is exactly what bias
    correction's `δ = (W − Ŵ)·E[row]` relies on; a shifted or resized window changes the
    number of positions or the border terms of the sum. One reduction of `y`, no gather."""
    y = y.detach().float()
    positions = y.numel() // y.shape[-1 if spec.kind == "linear" else 1]
    if positions != count:
        raise _geometry_error(name, spec, module, f"its output has {positions} positions, the spec {count}")
    dims = tuple(range(y.dim() - 1)) if spec.kind == "linear" else (0, *range(2, y.dim()))
    y_mean = y.sum(dims).double().cpu().numpy() / count
    w = (module.weight if weight is None else weight).detach().double().cpu().numpy()
    g = total.shape[0]
    pred = np.einsum("gd,god->go", total / count, w.reshape(g, w.shape[0] // g, -1)).reshape(-1)
    if module.bias is not None:
        pred = pred + module.bias.detach().double().cpu().numpy()
    err = float(np.max(np.abs(pred - y_mean)))
    scale = max(float(torch.linalg.vector_norm(y, 1)) / max(y.numel(), 1), 1e-6)  # E|y| without a copy of y
    if not err <= _tolerance(module) * scale:
        raise _geometry_error(
            name, spec, module, f"its mean output differs from E[row]·Wᵀ + b by {err:.3g}, relative to E|y| {scale:.3g}"
        )


class RowCapture:
    """Context manager: per layer the exact mean input row over every output position of
    every batch (`mean_rows`) and, with `keep_rows`, a sample of input rows (`result`).

    Rows (`rows`: one count, or one per layer): with `batches` known, `⌈rows / batches⌉` random
    positions per batch (stratified: each batch is equally represented and no more is
    gathered than is kept), else `rows` per batch; `result` keeps at most `rows` of them.
    Two captures with the same `seed` over the same batches sample the same positions, so rows of the float and of the
    quantized model pair up. `check` compares sampled rows with the module's output on the
    first batch (hook the bare layer, quantization off).
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        specs: dict[str, jaxq.LayerSpec],
        rows: int | dict[str, int],
        seed: int,
        check: bool = True,
        keep_rows: bool = True,
        batches: int | None = None,
        index: dict[str, int] | None = None,
    ):
        self.modules, self.specs, self.check, self.keep_rows = modules, specs, check, keep_rows
        self.rows = rows if isinstance(rows, dict) else dict.fromkeys(modules, rows)
        self._per_batch = {n: r if not batches else math.ceil(r / batches) for n, r in self.rows.items()}
        index = index or {n: i for i, n in enumerate(modules)}  # a layer's stream: its place in the model
        self._rng = {n: np.random.default_rng([seed, index[n]]) for n in modules}
        self._parts: dict[str, list[np.ndarray]] = {n: [] for n in modules}
        self._sums: dict[str, dict] = {n: {} for n in modules}  # input shape → [Σ batch_sum, rows]
        self._handles = []

    def _hook(self, name: str, module: nn.Module, inputs, kwargs, output) -> None:
        spec = self.specs[name]
        x = layer_input(inputs, kwargs).detach().float()
        quantizer = quantizer_of(module)
        smoothed = quantizer is not None and quantizer.smoothing is not None and not quantizer.quant_enabled
        if smoothed:  # rows of what the quantizer reads, x / s, to pair with W·diag(s) (quantized: fq(x / s) already)
            x = quantizer.smoothed_input(x)
        first = not self._sums[name]
        total, count = batch_sum(spec, x)
        acc = self._sums[name].get(tuple(total.shape))
        if acc is None:
            acc = self._sums[name][tuple(total.shape)] = [total.new_zeros(total.shape, dtype=torch.float64), 0]
        acc[0].add_(total.double())  # in place: no fresh accumulator per batch (a mixed-dtype add_ is slower)
        acc[1] += count
        if self.check and first and not self.keep_rows:
            weight = quantizer.float_weight if smoothed else None
            check_sums(name, spec, module, window_sum(spec, total.double()), count, output, weight)
        if not self.keep_rows:
            return
        total = int(np.prod(output_positions(spec, tuple(x.shape))))
        k = min(total, self._per_batch[name])
        index = np.sort(self._rng[name].choice(total, size=k, replace=False)).astype(np.int32)
        if spec.kind == "linear":
            rows = x.reshape(-1, x.shape[-1])[torch.from_numpy(index)].cpu().numpy()[:, None, :]
        else:
            rows = window_rows(spec, x, index)
        if self.check and first:
            check_rows(
                name,
                spec,
                module,
                rows,
                _output_rows(spec, output, index),
                quantizer.float_weight if smoothed else None,
            )
        if self.keep_rows:
            self._parts[name].append(rows)

    def __enter__(self):
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(functools.partial(self._hook, name), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def mean_rows(self) -> dict[str, np.ndarray]:
        """`E[row]` `[g, d]` per layer over every output position of every batch (float32)."""
        out = {}
        for name, sums in self._sums.items():
            sums = self._called(name, list(sums.values()))
            total = sum(window_sum(self.specs[name], t) for t, _ in sums)
            out[name] = (total / sum(n for _, n in sums)).astype(np.float32)
        return out

    @staticmethod
    def _called(name: str, parts: list) -> list:
        if not parts:
            raise RuntimeError(f"layer {name!r} was never called on the calibration data; keep it in float")
        return parts

    def result(self) -> dict[str, np.ndarray]:
        """At most `rows` rows per layer, sampled uniformly from what every batch gave
        (once: each layer's per-batch parts are let go as its rows are assembled)."""
        if not self.keep_rows:
            raise RuntimeError("RowCapture(keep_rows=False) keeps only the mean rows")
        if any(parts is None for parts in self._parts.values()):
            raise RuntimeError("RowCapture.result() gives its rows once")
        out = {}
        for name in list(self._parts):
            parts = self._called(name, self._parts[name])
            self._parts[name] = None
            sizes = np.array([p.shape[0] for p in parts])
            if sizes.sum() > self.rows[name]:  # pick from the parts, without concatenating them all first
                keep = np.sort(self._rng[name].choice(sizes.sum(), size=self.rows[name], replace=False))
                ends = np.cumsum(sizes)
                part = np.searchsorted(ends, keep, side="right")
                local = keep - (ends - sizes)[part]
                out[name] = aligned_concatenate([parts[i][local[part == i]] for i in range(len(parts))])
            else:
                out[name] = aligned_concatenate(parts)
        return out
