"""Preparing a model for calibration: calibration data, Conv+BN fusion, quantizers in place.

Every change goes through the `ModelEdit` log, so the caller can undo all of it.
Disabled layers are never inspected beyond their names.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Iterable

from torch import nn

import jaxq
from bridge.capture.data import (
    CalibrationDataError,
    as_batch,
    check_input_shape,
    reiterable,
    to_device,
    virtual_batch,
)
from bridge.inplace.fakequant import LayerQuantizer
from bridge.inplace.functional import FunctionalTaps
from bridge.inplace.fuse import fuse_pairs
from bridge.inplace.rotation import rotate_inputs
from bridge.inplace.probe import PROBE_SAMPLES, probe_batch, probe_structure  # noqa: F401 (re-exported)
from bridge.inplace.modules import (
    check_layer_bits,
    first_and_last,
    layer_spec,
    quantizable_layers,
    resolve_disabled,
    unsupported_layers,
    weight_name,
)
from bridge.capture.genie import distill_genie_batches
from bridge.capture.synthetic import distill_bn_batches
from bridge.inplace.transaction import ModelEdit
from jaxq.config import FIRST_LAST_8BIT


class EmptyModelError(ValueError):
    """The model has no quantizable layer."""


class UnquantizedLayersWarning(UserWarning):
    """Layers with weights that jaxq leaves in float."""


class DataFreeRangeWarning(UserWarning):
    """Data-free mode's uniform [0, 1) virtual input may not match the model's real inputs."""


@dataclasses.dataclass
class Prepared:
    layers: dict[str, nn.Module]  # every quantizable layer (quantized or not)
    disabled: set[str]
    unsupported: dict[str, str]
    specs: dict[str, jaxq.LayerSpec]  # of the quantized layers
    cfg: jaxq.QuantConfig  # with `quantize_first_last="8bit"` resolved into layer names
    why_float: dict[str, str] = dataclasses.field(default_factory=dict)  # disabled layer → why


def calibration_data(model: nn.Module, cfg: jaxq.QuantConfig, calib_data, device, progress: bool) -> Iterable:
    """The batches to calibrate on: `calib_data`, or data-free virtual batches."""
    if calib_data is not None:
        data = reiterable(calib_data)
        try:
            empty = len(data) == 0
        except TypeError:
            empty = False
        if empty:
            raise CalibrationDataError("calib_data is empty; give at least one batch")
        return data
    if cfg.quant_mode == 1:
        raise CalibrationDataError("QuantConfig.quant_mode=1 (label-free) needs real calib_data: a list of batches")
    if cfg.input_shape is None:
        raise CalibrationDataError(
            "data-free mode (quant_mode=0) without calib_data needs QuantConfig.input_shape, "
            "e.g. input_shape=[1, 3, 224, 224]"
        )
    model.eval().to(device)
    check_input_shape(model, cfg.input_shape, device)
    if cfg.virtual_data == "bn_stats":
        return distill_bn_batches(model, cfg.input_shape, cfg.virtual_steps, cfg.virtual_lr, cfg.seed, progress)
    if cfg.virtual_data == "genie":
        return distill_genie_batches(model, cfg.input_shape, cfg.virtual_steps, cfg.seed, progress)
    warnings.warn(
        "data-free mode feeds torch.rand(input_shape): uniform values in [0, 1). If the model's real inputs are "
        "scaled otherwise (normalised images, audio in [-1, 1]), the activation ranges will be poor: give a few "
        "real batches as calib_data, or QuantConfig(virtual_data='bn_stats') (or 'genie') for BatchNorm models",
        DataFreeRangeWarning,
        stacklevel=4,
    )
    return virtual_batch(cfg.input_shape, cfg.seed)


def first_batch(data: Iterable, device):
    try:
        raw = next(iter(data))
    except StopIteration:
        raise CalibrationDataError("calib_data yielded no batch; give at least one batch") from None
    b = as_batch(raw, 0)
    return b._replace(args=to_device(b.args, device), kwargs=to_device(b.kwargs, device))


def _quantizable(model: nn.Module) -> dict[str, nn.Module]:
    layers = quantizable_layers(model)
    if not layers:
        raise EmptyModelError(
            f"{type(model).__name__} has no quantizable layer (nn.Linear, nn.Conv1d, nn.Conv2d, "
            "nn.MultiheadAttention); nothing to calibrate"
        )
    if "" in layers:
        raise EmptyModelError("the model is itself a single layer; wrap it, e.g. nn.Sequential(model)")
    return layers


def _needs_ends(cfg: jaxq.QuantConfig) -> bool:
    """Whether the first and last layers matter: kept float by default, or at 8 bits."""
    return cfg.quantize_first_last == FIRST_LAST_8BIT or (not cfg.disable_names and not cfg.quantize_first_last)


def _layers(model: nn.Module, cfg: jaxq.QuantConfig, layers: dict, ends) -> tuple[set, dict, jaxq.QuantConfig, dict]:
    eight_bit = cfg.quantize_first_last == FIRST_LAST_8BIT
    disabled = resolve_disabled(list(layers), cfg.disable_names, cfg.quantize_first_last, ends)
    check_layer_bits(list(layers), cfg.layer_bits, "layer_bits")
    check_layer_bits(list(layers), cfg.layer_act_bits, "layer_act_bits")
    if eight_bit:
        cfg = cfg.with_8bit_layers([n for n in first_and_last(list(layers), ends) if n not in disabled])
    if len(disabled) == len(layers):
        raise EmptyModelError(
            f"every quantizable layer of {type(model).__name__} would stay float ({sorted(disabled)[:4]}): "
            "by default the first and last layer are kept float; use QuantConfig(quantize_first_last=True) "
            "or name fewer layers in disable_names"
        )
    return disabled, unsupported_layers(model), cfg, _why_float(disabled, cfg, ends)


def _why_float(disabled: set[str], cfg: jaxq.QuantConfig, ends) -> dict[str, str]:
    if cfg.disable_names:
        return {n: "in disable_names" for n in disabled}
    if ends is None:
        return {n: "first or last layer in module order" for n in disabled}
    return {n: ends.why(n) for n in disabled}


def prepare(
    model: nn.Module,
    cfg: jaxq.QuantConfig,
    data: Iterable,
    device,
    fuse_module_call_back: Callable | None,
    edit: ModelEdit,
) -> Prepared:
    """Fuse and attach quantizers to every enabled layer, in place, logged in `edit`. One
    probe forward (`bridge.inplace.probe`) reads the model's structure, and one more after
    `fuse_module_call_back` changed it."""
    model.eval().to(device)
    layers = _quantizable(model)
    found = probe_structure(model, layers, first_batch(data, device), _needs_ends(cfg))
    disabled, unsupported, resolved, why_float = _layers(model, cfg, layers, found.ends)
    if unsupported:
        warnings.warn(
            "jaxq leaves these layers in float: " + "; ".join(f"{n} ({why})" for n, why in unsupported.items()),
            UnquantizedLayersWarning,
            stacklevel=3,
        )
    if fuse_module_call_back is not None:
        fused = fuse_module_call_back(model)
        if fused is not None and fused is not model:
            raise TypeError(
                "fuse_module_call_back must fuse the model in place and return it (or None), got "
                f"{type(fused).__name__}"
            )
        layers = _quantizable(model)
        found = probe_structure(model, layers, found.batch, _needs_ends(cfg))
        disabled, unsupported, resolved, why_float = _layers(model, cfg, layers, found.ends)
    else:
        edit.folds.extend(fuse_pairs(model, found.pairs, found.output, found.batch))
    enabled = {n: m for n, m in layers.items() if n not in disabled}
    functional = found.functional & set(enabled)
    specs = {n: layer_spec(n, m) for n, m in enabled.items()}
    if cfg.rotate_inputs:
        rotate_inputs({n: m for n, m in enabled.items() if n not in functional}, cfg.seed, edit)
    attach_quantizers(model, enabled, functional, resolved, edit)
    return Prepared(layers, disabled, unsupported, specs, resolved, why_float)


def weight_group(name: str, module: nn.Module, cfg: jaxq.QuantConfig) -> int | None:
    """The layer's input columns per weight scale: `cfg.w_group_size` for a 2-D weight
    (Linear, attention projections), None (per channel) for convolutions and without groups."""
    g = cfg.w_group_size
    weight = getattr(module, weight_name(module))
    if g is None or weight.dim() != 2:
        return None
    if weight.shape[1] % g:
        raise ValueError(
            f"QuantConfig.w_group_size={g} does not divide the {weight.shape[1]} input columns of layer "
            f"{name!r}; choose a group size that divides every quantized Linear layer's input width, or keep "
            "this layer float (disable_names)"
        )
    return g


def attach_quantizers(
    model: nn.Module, layers: dict[str, nn.Module], functional: set[str], cfg: jaxq.QuantConfig, edit: ModelEdit
) -> None:
    """A `LayerQuantizer` on each of `layers` (tapped at the functional call for the names
    in `functional`), and the taps installed on `model` if any needs them; logged in `edit`."""
    groups = {name: weight_group(name, module, cfg) for name, module in layers.items()}  # checked before any change
    for name, module in layers.items():
        act_scheme = cfg.act_scheme_for(name) if cfg.act_quant else None
        quantizer = LayerQuantizer(
            module,
            name,
            cfg.weight_scheme_for(name),
            act_scheme,
            weight_name(module),
            name in functional,
            weight_group=groups[name],
        )
        edit.attach(quantizer)
        if cfg.bias_correction and name not in functional:
            quantizer.carry_bias_correction()
    tapped = [q for q in edit.quantizers.values() if q.functional]
    if tapped:
        edit.taps = FunctionalTaps(tapped).install(model)
