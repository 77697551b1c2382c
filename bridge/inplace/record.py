"""The parameter record: one `LayerRecord` per quantized layer, the single source.

`run`, `load_param`, `load_quantized`, `fall_back`, `get_quant_params` and every export
read or write records; `apply_records` is the only code that writes the modules'
buffers. Numerics: `jaxq.numerics` (`x̂ = (q − o)·s`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import torch

from jaxq import QParams, QScheme, quantize
from jaxq.groupwise import columns, group_params
from bridge.inplace.fakequant import pointwise

# msModelSlim's five dicts (`get_quant_params`), then jaxq's bias corrections and SmoothQuant factors
PARAM_KEYS = (
    "input_scale",
    "input_offset",
    "weight_scale",
    "weight_offset",
    "quant_weight",
    "bias_correction",
    "smooth_scale",
)
LEGACY_KEYS = PARAM_KEYS[:5]  # msModelSlim's `.npy` dicts
INTEGER_KEYS = ("quant_weight", "weight_offset", "input_offset")  # the rest are float


def integer_dtype(bits: int, signed: bool = True) -> np.dtype:
    """The smallest integer container holding every `bits`-bit code of the grid."""
    if signed:
        return np.dtype(np.int8 if bits <= 8 else np.int16 if bits <= 16 else np.int32)
    return np.dtype(np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32)


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """One quantized layer: weight `QParams` and codes, activation `QParams` (None:
    weight-only), bias correction `δ` (None: none), SmoothQuant factors `s` (None: none;
    then the codes and scales are those of `W·diag(s)` and the input quantizer's of
    `x / s`), and whether the codes are custom (chosen by SQuant/AdaRound rather than
    rounding the float weight to nearest)."""

    weight_scale: np.ndarray  # float32 [out], or [out, in/g] with weight groups
    weight_offset: np.ndarray  # int32, as weight_scale
    codes: np.ndarray  # int32, the weight's shape
    custom_codes: bool
    input_scale: np.ndarray | None = None  # float32 []
    input_offset: np.ndarray | None = None  # int32 []
    bias_correction: np.ndarray | None = None  # float32 [out]
    smoothing: np.ndarray | None = None  # float32 [in]

    def check(
        self,
        name: str,
        weight_shape: tuple,
        scheme: QScheme,
        act_scheme: QScheme | None,
        source: str,
        group: int | None = None,
    ) -> None:
        """Raise `ValueError` naming `source` and the layer if shapes, ranges or values are
        wrong (`group`: the layer's input columns per weight scale, None per channel)."""
        where = f"{source}: layer {name!r}"
        out = weight_shape[0]
        qshape = (out,) if group is None else (out, weight_shape[1] // group)
        _expect(
            self.weight_scale.shape == qshape,
            f"{where}: weight_scale has shape {self.weight_scale.shape}, expected {qshape}"
            + ("" if group is None else f" (groups of {group} input columns)"),
        )
        _expect(
            self.weight_offset.shape == qshape,
            f"{where}: weight_offset has shape {self.weight_offset.shape}, expected {qshape}",
        )
        _expect(
            tuple(self.codes.shape) == tuple(weight_shape),
            f"{where}: quant_weight has shape {self.codes.shape}, expected {tuple(weight_shape)}",
        )
        _expect(
            bool(np.all(np.isfinite(self.weight_scale)) and np.all(self.weight_scale > 0)),
            f"{where}: weight_scale has non-finite or non-positive values",
        )
        _expect(
            bool(np.all((self.codes >= scheme.qmin) & (self.codes <= scheme.qmax))),
            f"{where}: quant_weight has codes outside [{scheme.qmin}, {scheme.qmax}] of its {scheme.bits}-bit grid",
        )
        if act_scheme is None:
            _expect(self.input_scale is None, f"{where}: has input_scale but the config quantizes no activations")
        else:
            _expect(
                self.input_scale is not None and self.input_offset is not None,
                f"{where}: input_scale/input_offset missing but the config quantizes activations",
            )
            s = float(np.asarray(self.input_scale).reshape(()))
            _expect(np.isfinite(s) and s > 0, f"{where}: input_scale {s} is not a finite positive number")
        if self.smoothing is not None:
            smoothable = pointwise(tuple(weight_shape))
            inner = weight_shape[1] if smoothable else None
            _expect(
                smoothable and act_scheme is not None,
                f"{where}: smooth_scale needs a Linear or 1×1 convolution weight with a quantized input",
            )
            _expect(
                self.smoothing.shape == (inner,)
                and bool(np.all(np.isfinite(self.smoothing)) and np.all(self.smoothing > 0)),
                f"{where}: smooth_scale must be {inner} finite positive values, got shape {self.smoothing.shape}",
            )
        if self.bias_correction is not None:
            _expect(
                self.bias_correction.shape == (out,) and bool(np.all(np.isfinite(self.bias_correction))),
                f"{where}: bias_correction must be {out} finite values",
            )


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def is_nearest(float_weight: np.ndarray, scale, offset, scheme: QScheme, codes: np.ndarray) -> bool:
    """Whether `codes` round `float_weight` to nearest on `(scale, offset)`: one per
    output channel `[out]`, or per group of columns `[out, in/g]` (`jaxq.groupwise`)."""
    qp = QParams(jnp.asarray(scale), jnp.asarray(offset), scheme)
    if np.ndim(scale) == 2:
        qp = columns(qp, np.shape(float_weight)[1])
    return bool(np.array_equal(np.asarray(quantize(float_weight, qp)), codes.astype(np.int32)))


def weight_params(quantizer, qp: QParams) -> tuple[np.ndarray, np.ndarray]:
    """`(weight_scale float32, weight_offset int32)` of a record from the pipeline's weight
    `QParams`: per channel as they are; per group of columns (`quantizer.weight_group`) from
    their elementwise form (`jaxq.groupwise.from_group_rows`) back to `[out, in/g]`."""
    scale, offset = np.asarray(qp.scale, np.float32), np.asarray(qp.offset, np.int32)
    if quantizer.weight_group is not None:
        scale, offset = (np.ascontiguousarray(v) for v in group_params(scale, offset, quantizer.weight_group))
    return scale, offset


def apply_records(quantizers: dict, records: dict[str, LayerRecord]) -> None:
    """Write each record into its layer's buffers, codes and bias correction."""
    for name, rec in records.items():
        q = quantizers[name]
        q.set_smoothing(None if rec.smoothing is None else torch.from_numpy(np.array(rec.smoothing, np.float32)))
        q.set_qparams(
            torch.from_numpy(np.array(rec.weight_scale, np.float32)),
            torch.from_numpy(np.array(rec.weight_offset, np.int32)),
            None if rec.input_scale is None else torch.from_numpy(np.array(rec.input_scale, np.float32)),
            None if rec.input_offset is None else torch.from_numpy(np.array(rec.input_offset, np.int32)),
        )
        q.set_weight_codes(torch.from_numpy(np.array(rec.codes, np.int32)) if rec.custom_codes else None)
        q.set_bias_correction(
            None if rec.bias_correction is None else torch.from_numpy(np.array(rec.bias_correction, np.float32))
        )
        q.recorded_weight = weight_stamp(q)


def smoothing_of(q) -> np.ndarray | None:
    """The SmoothQuant factors `s` the quantizer `q` holds now (float32 `[in]`), None without."""
    return None if q.smoothing is None else q.smoothing.detach().cpu().numpy().astype(np.float32)


def weight_stamp(q) -> tuple:
    """Identity and version of `q`'s float weight: changes when the weight is trained,
    loaded (`load_state_dict`) or replaced."""
    w = q.original_weight
    return (id(w), w.data_ptr(), w._version, None if q.smoothing is None else q.smoothing.data_ptr())


def refresh_records(quantizers: dict, records: dict[str, LayerRecord]) -> dict[str, LayerRecord]:
    """The records of the model as it is now: a layer whose float weight changed since its
    record was written (fine-tuning through the fake quantizer, `load_state_dict`) gets the
    codes of its current weight on the calibrated scales — exactly what its fake-quant
    weight computes. Custom codes (SQuant, AdaRound, blocks) are what the layer simulates
    whatever its float weight, so they stay. Returns `records` itself when nothing changed."""
    changed = {}
    for name, rec in records.items():
        q = quantizers.get(name)
        if q is None or rec.custom_codes or q.recorded_weight == weight_stamp(q):
            continue
        w = q.float_weight.detach().float().cpu().numpy()
        qp = QParams(jnp.asarray(rec.weight_scale), jnp.asarray(rec.weight_offset), q.weight_scheme)
        codes = np.asarray(quantize(w, qp)).astype(np.int32)
        q.recorded_weight = weight_stamp(q)
        if not np.array_equal(codes, rec.codes):
            changed[name] = dataclasses.replace(rec, codes=codes)
    return {**records, **changed} if changed else records


def params_view(records: dict[str, LayerRecord], w_bit: int, w_signed: bool) -> dict[str, dict[str, np.ndarray]]:
    """`{key: {layer: array}}` for `PARAM_KEYS`; codes in the container that holds them."""
    qdtype = integer_dtype(w_bit, w_signed)
    out = {k: {} for k in PARAM_KEYS}
    for name, rec in records.items():
        out["weight_scale"][name] = np.asarray(rec.weight_scale, np.float32)
        out["weight_offset"][name] = np.asarray(rec.weight_offset, np.int32)
        out["quant_weight"][name] = np.asarray(rec.codes).astype(qdtype)
        if rec.input_scale is not None:
            out["input_scale"][name] = np.asarray(rec.input_scale, np.float32)
            out["input_offset"][name] = np.asarray(rec.input_offset, np.int32)
        if rec.bias_correction is not None:
            out["bias_correction"][name] = np.asarray(rec.bias_correction, np.float32)
        if rec.smoothing is not None:
            out["smooth_scale"][name] = np.asarray(rec.smoothing, np.float32)
    return out


def record_from_tensors(name: str, tensors: dict[str, np.ndarray], custom: bool) -> LayerRecord:
    """The record of `name` from exported tensors `<name>.<key>` (KeyError if one is missing)."""
    get = tensors.get
    return LayerRecord(
        weight_scale=np.asarray(tensors[f"{name}.weight_scale"], np.float32).reshape(-1),
        weight_offset=np.asarray(tensors[f"{name}.weight_offset"]).astype(np.int32).reshape(-1),
        codes=np.asarray(tensors[f"{name}.quant_weight"]).astype(np.int32),
        custom_codes=custom,
        input_scale=None
        if get(f"{name}.input_scale") is None
        else np.asarray(tensors[f"{name}.input_scale"], np.float32),
        input_offset=None
        if get(f"{name}.input_offset") is None
        else np.asarray(tensors[f"{name}.input_offset"]).astype(np.int32),
        bias_correction=None
        if get(f"{name}.bias_correction") is None
        else np.asarray(tensors[f"{name}.bias_correction"], np.float32),
        smoothing=None
        if get(f"{name}.smooth_scale") is None
        else np.asarray(tensors[f"{name}.smooth_scale"], np.float32),
    )
