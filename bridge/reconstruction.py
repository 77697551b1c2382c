"""Capture of layer-input rows (`jaxq.rows`) for EasyQuant and AdaRound.

A forward hook on each layer samples up to `rows` random output positions per batch and
keeps the input rows that produce them (im2col at those positions). On the first batch it
checks that the rows reproduce the module's own output there: a layer whose `forward`
does more than its `LayerSpec` says (padding computed at run time, say) is reported by
name instead of being optimised against the wrong function.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import torch
from torch import nn

import jaxq
from jaxq.rows import output_positions, take_rows
from bridge.data import HookError
from bridge.tensors import to_jax

PARITY_TOLERANCE = 1e-3


class LayerGeometryError(HookError, ValueError):
    """A layer computes something its `LayerSpec` does not describe."""


_take_rows = jax.jit(take_rows, static_argnums=0)


def _output_rows(spec: jaxq.LayerSpec, y: torch.Tensor, index: np.ndarray) -> np.ndarray:
    y = y.detach().float()
    flat = y.reshape(-1, y.shape[-1]) if spec.kind == "linear" else y.movedim(1, -1).reshape(-1, y.shape[1])
    return flat[torch.from_numpy(index)].cpu().numpy()


def check_rows(name: str, spec: jaxq.LayerSpec, module: nn.Module, rows: np.ndarray, y_rows: np.ndarray) -> None:
    """Raise `LayerGeometryError` if `rows · Wᵀ + b` is not the module's output."""
    w = module.weight.detach().float().cpu().numpy()
    g = rows.shape[1]
    wg = w.reshape(g, w.shape[0] // g, -1)
    # BLAS for dense layers (10–15× faster); depthwise ones are faster in einsum's own loop
    pred = np.einsum("mgd,god->mgo", rows.astype(np.float64), wg, optimize=wg.shape[1] > 1).reshape(rows.shape[0], -1)
    if module.bias is not None:
        pred = pred + module.bias.detach().float().cpu().numpy()
    err = np.max(np.abs(pred - y_rows)) if rows.shape[0] else 0.0
    scale = max(float(np.max(np.abs(y_rows))) if rows.shape[0] else 0.0, 1e-6)
    if not err <= PARITY_TOLERANCE * scale:
        raise LayerGeometryError(
            f"layer {name!r} ({type(module).__name__.removeprefix('Parametrized')}) does not compute the convolution its LayerSpec describes "
            f"({spec}); max |Δ| {err:.3g} relative to output scale {scale:.3g}. Its forward probably pads or "
            "reshapes at run time; keep it in float (disable_names) to use easy_quant/adaround"
        )


class RowCapture:
    """Context manager: `rows[name]` `[m, g, d]` float32 input rows per layer.

    Two captures with the same `seed` over the same batches sample the same positions, so
    rows of the float and of the quantized model pair up. `check` compares the rows with
    the module's output on the first batch (hook the bare layer, quantization off).
    """

    def __init__(self, modules: dict[str, nn.Module], specs: dict[str, jaxq.LayerSpec], rows: int, seed: int,
                 check: bool = True):
        self.modules, self.specs, self.rows, self.check = modules, specs, rows, check
        self._rng = {n: np.random.default_rng([seed, i]) for i, n in enumerate(modules)}
        self._parts: dict[str, list[np.ndarray]] = {n: [] for n in modules}
        self._handles = []

    def _hook(self, name: str, module: nn.Module, inputs, output) -> None:
        spec = self.specs[name]
        x = inputs[0].detach().float()
        total = int(np.prod(output_positions(spec, tuple(x.shape))))
        k = min(total, self.rows)
        index = np.sort(self._rng[name].choice(total, size=k, replace=False)).astype(np.int32)
        if spec.kind == "linear":
            rows = x.reshape(-1, x.shape[-1])[torch.from_numpy(index)].cpu().numpy()[:, None, :]
        else:
            rows = np.asarray(_take_rows(spec, to_jax(x), index))
        if self.check and not self._parts[name]:
            check_rows(name, spec, module, rows, _output_rows(spec, output, index))
        self._parts[name].append(rows)

    def __enter__(self):
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(functools.partial(self._hook, name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def mean_rows(self) -> dict[str, np.ndarray]:
        """`E[row]` `[g, d]` per layer over every row sampled from every batch (float32)."""
        out = {}
        for name, parts in self._parts.items():
            parts = self._called(name, parts)
            total = sum(p.sum(axis=0, dtype=np.float64) for p in parts)
            out[name] = (total / sum(p.shape[0] for p in parts)).astype(np.float32)
        return out

    @staticmethod
    def _called(name: str, parts: list) -> list:
        if not parts:
            raise RuntimeError(f"layer {name!r} was never called on the calibration data; keep it in float")
        return parts

    def result(self) -> dict[str, np.ndarray]:
        """At most `rows` rows per layer, sampled uniformly from what every batch gave."""
        out = {}
        for name, parts in self._parts.items():
            parts = self._called(name, parts)
            sizes = np.array([p.shape[0] for p in parts])
            if sizes.sum() > self.rows:  # pick from the parts, without concatenating them all first
                keep = np.sort(self._rng[name].choice(sizes.sum(), size=self.rows, replace=False))
                ends = np.cumsum(sizes)
                part = np.searchsorted(ends, keep, side="right")
                local = keep - (ends - sizes)[part]
                out[name] = np.concatenate([parts[i][local[part == i]] for i in range(len(parts))])
            else:
                out[name] = np.concatenate(parts)
        return out
