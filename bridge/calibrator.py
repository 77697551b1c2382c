"""`Calibrator`: msModelSlim's calibration facade over the pure-JAX core.

    cal = Calibrator(model, cfg, calib_data)   # fuses Conv+BN, wraps layers (in place)
    cal.run()                                  # capture → observers → QParams → buffers
    cal.get_quant_params(); cal.export_param(path)

`model` is quantized in place (its quantizable layers become `QuantWrapper`s holding
the originals); `fp_model` is a float copy taken before anything was changed.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable, Iterable

import jax
import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

import jaxq
from bridge.capture import ActivationCapture, check_finite, histogram_observer_for, observer_for
from bridge.data import (
    CalibrationDataError,
    as_batch,
    check_input_shape,
    iter_batches,
    reiterable,
    run_model,
    to_device,
    virtual_batch,
)
from bridge.devices import resolve_device
from bridge.export import ExportError, integer_dtype, write_params
from bridge.fakequant import QuantWrapper, custom_codes, set_module, wrappers
from bridge.fuse import fuse_conv_bn
from bridge.modules import layer_spec, quantizable_layers, resolve_disabled
from bridge.sensitivity import (
    FallbackCurve,
    SensitivityTable,
    amp_batches,
    float_outputs,
    isolated_sensitivity,
    layer_output_errors,
    model_distance,
)
from bridge.synthetic import distill_bn_batches

from bridge.tensors import to_jax, to_torch

# one fused program per weight shape; eager `jaxq.quantize` compiles each of its five ops per shape
_quantize = jax.jit(jaxq.quantize)

SENSITIVITY_METRICS = ("mse", "relative_mse", "cosine", "isolated")
# msModelSlim's five dicts (`get_quant_params`), then jaxq's bias corrections
PARAM_KEYS = ("input_scale", "input_offset", "weight_scale", "weight_offset", "quant_weight", "bias_correction")


class EmptyModelError(ValueError):
    """The model has no quantizable layer."""


class Calibrator:
    """Post-training quantization of a torch model driven by a `jaxq.QuantConfig`.

    Args:
      model: the float `nn.Module`; it is fused and quantized in place.
      cfg: a `jaxq.QuantConfig`.
      calib_data: a list (or re-iterable, e.g. DataLoader) of batches; a batch is a
        tensor, a tuple/list of positional inputs or a dict of keyword inputs. Required
        for `quant_mode=1`; optional in data-free mode (`quant_mode=0`), where
        `cfg.input_shape` otherwise gives one `torch.rand` virtual sample.
      fuse_module_call_back: `f(model) -> model | None` that fuses modules itself;
        when given, it replaces the automatic Conv+BN fusion.
      progress: show progress bars.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: jaxq.QuantConfig,
        calib_data: Iterable | None = None,
        fuse_module_call_back: Callable | None = None,
        *,
        progress: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(cfg, jaxq.QuantConfig):
            raise TypeError(f"cfg must be a jaxq.QuantConfig, got {type(cfg).__name__}")
        if fuse_module_call_back is not None and not callable(fuse_module_call_back):
            raise TypeError("fuse_module_call_back must be callable: f(model) -> model or None")
        self.cfg = cfg
        self.progress = progress
        self.device = resolve_device(cfg.device)
        layers = quantizable_layers(model)
        if not layers:
            raise EmptyModelError(
                f"{type(model).__name__} has no quantizable layer (nn.Linear, nn.Conv1d, nn.Conv2d); nothing to calibrate"
            )
        if "" in layers:
            raise EmptyModelError("the model is itself a single layer; wrap it, e.g. nn.Sequential(model)")
        self.disabled = resolve_disabled(list(layers), cfg.disable_names, cfg.quantize_first_last)

        self.fp_model = copy.deepcopy(model).eval()
        self.calib_data = self._calibration_data(cfg, calib_data, self.fp_model)
        self.model = model.eval().to(self.device)
        first = as_batch(next(iter(self.calib_data)), 0)
        first = first._replace(args=to_device(first.args, self.device), kwargs=to_device(first.kwargs, self.device))
        if fuse_module_call_back is not None:
            self.model = fuse_module_call_back(self.model) or self.model
            self.fused = []
        else:
            self.fused = fuse_conv_bn(self.model, first)
        self._wrap()
        self._params: dict[str, dict[str, np.ndarray]] | None = None
        self.timings: dict[str, float] = {}
        self.fallen_back: list[str] = []

    # -- setup --------------------------------------------------------------------------
    def _calibration_data(self, cfg: jaxq.QuantConfig, calib_data, fp_model: nn.Module):
        if calib_data is not None:
            data = reiterable(calib_data)
            if isinstance(data, list) and not data:
                raise CalibrationDataError("calib_data is empty; give at least one batch")
            return data
        if cfg.quant_mode == 1:
            raise CalibrationDataError(
                "QuantConfig.quant_mode=1 (label-free) needs real calib_data: a list of batches"
            )
        if cfg.input_shape is None:
            raise CalibrationDataError(
                "data-free mode (quant_mode=0) without calib_data needs QuantConfig.input_shape, "
                "e.g. input_shape=[1, 3, 224, 224]"
            )
        probe_model = fp_model.to(self.device)
        check_input_shape(probe_model, cfg.input_shape, self.device)
        if cfg.virtual_data == "bn_stats":
            return distill_bn_batches(probe_model, cfg.input_shape, cfg.virtual_steps, cfg.virtual_lr, cfg.seed, self.progress)
        return virtual_batch(cfg.input_shape, cfg.seed)

    def _wrap(self) -> None:
        act_scheme = self.cfg.act_scheme if self.cfg.act_quant else None
        self.specs: dict[str, jaxq.LayerSpec] = {}
        for name, module in quantizable_layers(self.model).items():
            self.specs[name] = layer_spec(name, module)
            if name in self.disabled or isinstance(self.model.get_submodule(name), QuantWrapper):
                continue
            set_module(self.model, name, QuantWrapper(module, self.cfg.weight_scheme, act_scheme))

    @property
    def quantized_names(self) -> list[str]:
        return list(wrappers(self.model))

    # -- calibration --------------------------------------------------------------------
    def run(self) -> "Calibrator":
        """Capture activations, compute every layer's QParams and switch quantization on."""
        layers = wrappers(self.model)
        self.disable_quant()
        t0 = time.perf_counter()
        act = self._calibrate_activations(layers) if self.cfg.act_quant else {}
        t1 = time.perf_counter()
        float_weights = {n: to_jax(w.float_weight.float()) for n, w in layers.items()}
        if self.cfg.keep_acc.admm[0]:
            with self._progress("jaxq admm", len(layers)) as bar:
                weights = jaxq.accuracy.admm_weights(float_weights, self.cfg.weight_scheme, self.cfg.keep_acc.admm[1],
                                                     bar.update)
        else:
            weights = jaxq.quantize_weights(float_weights, self.cfg.weight_scheme)
        self.timings = {"activations_s": t1 - t0, "weights_s": time.perf_counter() - t1}
        self.reports: dict[str, dict[str, tuple[float, float]]] = {}
        ka = self.cfg.keep_acc
        corrections = None
        if ka.easy_quant[0] or ka.round_opt or ka.adaround[0] or self.cfg.bias_correction:
            weights, act, corrections = self._keep_accuracy(layers, float_weights, weights, act)
        self._params = self._collect(layers, weights, act, corrections, nearest=not (ka.round_opt or ka.adaround[0]))
        self.enable_quant()
        if self.cfg.amp_num and not self.fallen_back:  # a second run() keeps the earlier fallback
            table = self.sensitivity(metrics=(self.cfg.amp_metric,))
            self.fall_back(table.ranked(self.cfg.amp_metric)[: self.cfg.amp_num])
        return self

    # -- accuracy keeping ---------------------------------------------------------------
    def _progress(self, desc: str, total: int):
        return tqdm(total=total, desc=desc, unit="layer", disable=not self.progress)

    def _keep_accuracy(self, layers, float_weights, weights, act):
        """EasyQuant (scales), then SQuant or AdaRound (rounding), then bias correction
        of the final weights; `self.reports` keeps each algorithm's per-layer error before
        and after. Returns `(weights, act, bias corrections or None)`."""
        ka = self.cfg.keep_acc
        needs_rows = ka.needs_rows or self.cfg.bias_correction
        layer_rows, mean_rows = self._layer_rows(layers, float_weights, weights, act) if needs_rows else ({}, {})
        if ka.easy_quant[0]:
            t = time.perf_counter()
            with self._progress("jaxq easy_quant", len(layers)) as bar:
                found = jaxq.accuracy.easy_quant_layers(layer_rows, ka.easy_quant[1], progress=bar.update)
            for name, r in found.items():
                qp = jaxq.QParams(r.weight.scale, r.weight.offset, self.cfg.weight_scheme)
                weights[name] = jaxq.QuantizedWeight(qp, _quantize(float_weights[name], qp))
                if name in act:
                    act[name] = act[name]._replace(qparams=r.act)
                layer_rows[name] = layer_rows[name]._replace(weight=qp, act=r.act)
            self.reports["easy_quant"] = {n: (float(r.cosine_before), float(r.cosine_after)) for n, r in found.items()}
            self.timings["easy_quant_s"] = time.perf_counter() - t
        if ka.round_opt:
            t = time.perf_counter()
            weights = jaxq.accuracy.squant_weights(float_weights, weights)
            self.timings["round_opt_s"] = time.perf_counter() - t
        if ka.adaround[0]:
            t = time.perf_counter()
            params = jaxq.AdaRoundParams(steps=ka.adaround[1])
            with self._progress("jaxq adaround", len(layers)) as bar:
                found = jaxq.accuracy.adaround_layers(float_weights, layer_rows, params, progress=bar.update)
            for name, r in found.items():
                weights[name] = jaxq.QuantizedWeight(weights[name].qparams, r.q)
            self.reports["adaround"] = {n: (float(r.error_before), float(r.error_after)) for n, r in found.items()}
            self.timings["adaround_s"] = time.perf_counter() - t
        corrections = self._bias_corrections(layer_rows, mean_rows, weights) if self.cfg.bias_correction else None
        return weights, act, corrections

    def _bias_corrections(self, layer_rows, mean_rows, weights) -> dict[str, np.ndarray]:
        """`δ = (W − Ŵ)·E[x]` per layer; the report holds the RMS output shift removed."""
        t = time.perf_counter()
        found = jaxq.accuracy.bias_corrections(mean_rows, {n: r.wg for n, r in layer_rows.items()}, weights)
        out = {n: np.asarray(d, np.float32) for n, d in found.items()}
        self.reports["bias_correction"] = {n: (float(np.sqrt(np.mean(d.astype(np.float64) ** 2))), 0.0)
                                           for n, d in out.items()}
        self.timings["bias_correction_s"] = time.perf_counter() - t
        return out

    def _sample_rows(self, modules: dict[str, nn.Module], check: bool, desc: str, keep_rows: bool = True):
        from bridge.reconstruction import RowCapture

        capture = RowCapture(modules, self.specs, self.cfg.recon_rows, self.cfg.seed, check=check,
                             keep_rows=keep_rows, batches=self._num_batches())
        self._forward_calibration_data(capture, desc)
        return capture

    def _layer_rows(self, layers, float_weights, weights, act):
        """`({name: LayerRows}, {name: E[row]})`: `cfg.recon_rows` input rows per layer from
        the float model and, with `recon_inputs="quantized"`, from the current quantized
        model at the same positions; the mean float input row over every sampled row."""
        t = time.perf_counter()
        needs_rows = self.cfg.keep_acc.needs_rows
        float_capture = self._sample_rows({n: w.module for n, w in layers.items()}, True, "jaxq sample rows (float)",
                                          keep_rows=needs_rows)
        mean_rows = float_capture.mean_rows()
        # bias correction alone needs only the mean rows
        target = float_capture.result() if needs_rows else dict.fromkeys(layers)
        rows = target
        if self.cfg.recon_inputs == "quantized" and needs_rows:
            self._collect(layers, weights, act)
            for w in layers.values():
                w.quant_enabled = True
            try:
                rows = self._sample_rows(dict(layers), False, "jaxq sample rows (quantized)").result()
            finally:
                self.disable_quant()
        out = {}
        for name, wrapper in layers.items():
            bias = wrapper.float_bias
            out[name] = jaxq.accuracy.LayerRows(
                rows=rows[name],
                target=target[name],
                wg=np.asarray(jaxq.rows.grouped_weight(self.specs[name], float_weights[name])),
                bias=None if bias is None else bias.detach().float().cpu().numpy(),
                act=act[name].qparams if name in act else None,
                weight=weights[name].qparams,
            )
        self.timings["sample_rows_s"] = time.perf_counter() - t
        return out, mean_rows

    # -- sensitivity and fallback -------------------------------------------------------
    def _amp_batches(self, samples: int | None = None):
        batches = [b for _, b in iter_batches(self.calib_data, self.device)]
        return amp_batches(batches, samples or self.cfg.amp_samples)

    def sensitivity(self, metrics=("mse", "relative_mse", "isolated"), samples: int | None = None) -> SensitivityTable:
        """Per-layer sensitivity table of the quantized layers (after `run()`).

        `mse` / `relative_mse` / `cosine`: each layer's output in the fully quantized model
        against the float model; `isolated`: the model-output distance (KL for logits,
        1 − cosine otherwise) with only that layer quantized. Uses the first
        `samples` (default `cfg.amp_samples`) calibration samples.
        """
        self._require_run()
        unknown = set(metrics) - set(SENSITIVITY_METRICS)
        if unknown:
            raise ValueError(f"sensitivity metrics {sorted(unknown)} not known; choose from {SENSITIVITY_METRICS}")
        layers = wrappers(self.model)
        batches = self._amp_batches(samples)
        errors = layer_output_errors(self.model, layers, batches) if set(metrics) - {"isolated"} else {}
        isolated = isolated_sensitivity(self.model, layers, batches) if "isolated" in metrics else {}
        rows = []
        for name, w in layers.items():
            row = {"name": name, "kind": self.specs[name].kind, "weight_shape": tuple(w.float_weight.shape)}
            for m in metrics:
                if m == "isolated":
                    row[m] = isolated[name]
                else:
                    row[m] = errors[name][m]
            row["quantized"] = True
            rows.append(row)
        for name in self.specs:  # float layers (disabled or fallen back) for completeness
            if name not in layers:
                module = self.model.get_submodule(name)
                rows.append({"name": name, "kind": self.specs[name].kind, "weight_shape": tuple(module.weight.shape),
                             **{m: float("nan") for m in metrics}, "quantized": False})
        return SensitivityTable(rows)

    def fall_back(self, names) -> None:
        """Return the named quantized layers to float (their original modules and weights)."""
        layers = wrappers(self.model)
        for name in names:
            if name not in layers:
                raise ValueError(f"{name!r} is not a quantized layer; quantized layers: {list(layers)[:5]}…")
            set_module(self.model, name, layers[name].unwrap())
            for per_layer in (self._params or {}).values():
                per_layer.pop(name, None)
            self.fallen_back.append(name)

    def fallback_search(self, target: float, by: str = "isolated", samples: int | None = None,
                        max_layers: int | None = None) -> FallbackCurve:
        """Fall back the fewest layers, most sensitive first (ranking `by`), until the
        model-output distance from float (KL for logits, 1 − cosine otherwise) on the
        first `samples` calibration samples is ≤ `target`. Returns the whole curve."""
        self._require_run()
        layers = wrappers(self.model)
        batches = self._amp_batches(samples)
        order = self.sensitivity(metrics=(by,), samples=samples).ranked(by)[: max_layers or len(layers)]
        fp = float_outputs(self.model, layers, batches)
        points, chosen = [], -1
        for k in range(len(order) + 1):
            off = set(order[:k])
            points.append(model_distance(self.model, layers, batches, fp, lambda n, off=off: n not in off))
            if chosen < 0 and points[-1] <= target:
                chosen = k
        if chosen > 0:
            self.fall_back(order[:chosen])
        return FallbackCurve("kl" if fp[0].dim() == 2 else "1 - cosine", order, points, chosen)

    def _num_batches(self) -> int | None:
        try:
            return len(self.calib_data)
        except TypeError:
            return None

    def _calibrate_activations(self, layers: dict[str, QuantWrapper]) -> dict[str, jaxq.ActivationResult]:
        observer = observer_for(self.cfg, self._num_batches())
        states = self._capture(layers, observer)
        results = jaxq.finalize_activations(states, observer, self.cfg.act_scheme)
        check_finite(results)
        return results

    def activation_histograms(self, bins: int | None = None) -> dict[str, jaxq.HistogramState]:
        """Histogram of every quantized layer's input over the calibration data.

        The states feed `jaxq.sweep` (ranges and errors of min-max, sigma and L2 ranges)
        and plots; the model computes in float while they are captured.
        """
        layers = wrappers(self.model)
        enabled = {n: w.quant_enabled for n, w in layers.items()}
        self.disable_quant()
        try:
            observer = histogram_observer_for(self.cfg, bins)
            return self._capture(layers, observer)
        finally:
            for n, w in layers.items():
                w.quant_enabled = enabled[n]

    def _capture(self, layers: dict[str, QuantWrapper], observer: jaxq.Observer) -> dict:
        capture = ActivationCapture({n: w.module for n, w in layers.items()}, observer)
        self._forward_calibration_data(capture, "jaxq calibrate", after_batch=capture.flush)
        return capture.states

    def _forward_calibration_data(self, hooks, desc: str, after_batch=None) -> None:
        """Run the model over every calibration batch with `hooks` (a context manager)
        active, calling `after_batch()` after each."""
        batches = tqdm(iter_batches(self.calib_data, self.device), total=self._num_batches(),
                       desc=desc, unit="batch", disable=not self.progress)
        # cached: each layer's (fake-quant) weight is computed once for the pass, not per batch
        with hooks, torch.no_grad(), parametrize.cached():
            for i, batch in batches:
                run_model(self.model, batch, i)
                if after_batch is not None:
                    after_batch()

    def _collect(self, layers, weights, act, corrections=None, nearest=False) -> dict[str, dict[str, np.ndarray]]:
        """The parameter dicts of `get_quant_params`, also set on the wrappers; `nearest`:
        the codes are known to round the float weights to nearest (no custom codes)."""
        params = {k: {} for k in PARAM_KEYS}
        qdtype = integer_dtype(self.cfg.w_bit)
        for name, wrapper in layers.items():
            w = weights[name]
            params["weight_scale"][name] = np.asarray(w.qparams.scale, np.float32)
            params["weight_offset"][name] = np.asarray(w.qparams.offset, np.int32)
            params["quant_weight"][name] = np.asarray(w.q).astype(qdtype)
            if name in act:
                params["input_scale"][name] = np.asarray(act[name].qparams.scale, np.float32)
                params["input_offset"][name] = np.asarray(act[name].qparams.offset, np.int32)
            if corrections is not None:
                params["bias_correction"][name] = corrections[name]
        self._set_buffers(layers, params, nearest)
        return params

    @staticmethod
    def _set_buffers(layers: dict[str, QuantWrapper], params: dict, nearest: bool = False) -> None:
        for name, wrapper in layers.items():
            act = name in params["input_scale"]
            wrapper.set_qparams(
                to_torch(params["weight_scale"][name]),
                to_torch(params["weight_offset"][name]),
                to_torch(params["input_scale"][name]) if act else None,
                to_torch(params["input_offset"][name]) if act else None,
            )
            wrapper.set_weight_codes(None if nearest else custom_codes(wrapper, params["quant_weight"][name]))
            correction = params.get("bias_correction", {}).get(name)
            wrapper.set_bias_correction(None if correction is None else to_torch(correction))

    # -- results ------------------------------------------------------------------------
    def _require_run(self) -> dict:
        if self._params is None:
            raise RuntimeError("Calibrator.run() has not been called yet")
        return self._params

    def get_quant_params(self) -> tuple[dict, dict, dict, dict, dict]:
        """msModelSlim's five dicts `{layer name: array}`:
        `(input_scale, input_offset, weight_scale, weight_offset, quant_weight)`."""
        p = self._require_run()
        return tuple({n: a.copy() for n, a in p[k].items()} for k in
                     ("input_scale", "input_offset", "weight_scale", "weight_offset", "quant_weight"))

    def layer_descriptions(self) -> dict[str, dict]:
        """Per quantized layer: kind, geometry, weight shape and schemes (JSON-ready)."""
        act = self.cfg.act_scheme.describe() if self.cfg.act_quant else None
        out = {}
        for name, wrapper in wrappers(self.model).items():
            spec = dataclasses.asdict(self.specs[name])
            spec.pop("name")
            out[name] = {
                **spec,
                "module_type": type(wrapper.module).__name__,
                "weight_shape": list(wrapper.module.weight.shape),
                "weight_scheme": self.cfg.weight_scheme.describe(),
                "act_scheme": act,
            }
        return out

    def export_param(self, path, legacy: bool = False) -> list:
        """Write the parameters (safetensors + JSON; msModelSlim `.npy` dicts if `legacy`).

        The directory is enough to rebuild the fake-quant model without calibration data:
        `bridge.load_quantized(model, path)` or `Calibrator.load_param(path)`.
        """
        p = self._require_run()
        cfg = dataclasses.asdict(self.cfg)
        cfg["keep_acc"] = self.cfg.keep_acc.as_dict()
        return write_params(path, p, self.layer_descriptions(), cfg, legacy=legacy, fused=self.fused)

    def load_param(self, path) -> "Calibrator":
        """Load parameters written by `export_param` into this calibrator's layers (no data needed)."""
        from bridge.reload import read_params

        description, tensors = read_params(path)
        names = set(description["layers"])
        mine = set(self.quantized_names)
        if names != mine:
            raise ValueError(
                f"parameters in {str(path)!r} are for layers {sorted(names ^ mine)[:5]}… that differ from this "
                "calibrator's quantized layers; build it with the same model and config"
            )
        layers = wrappers(self.model)
        params = {k: {} for k in PARAM_KEYS}
        for name in layers:
            for key in params:
                if f"{name}.{key}" in tensors:
                    params[key][name] = tensors[f"{name}.{key}"]
        self._set_buffers(layers, params)
        self._params = params
        self.enable_quant()
        return self

    def export_quant_safetensor(self, output_path, safetensors_name: str | None = None, json_name: str | None = None) -> list:
        """msModelSlim's W8A8 deployment files (`bridge.w8a8`): int8 weights, `input_scale`,
        `input_offset` (int8 code of 0), `deq_scale`, `quant_bias` per quantized layer, every
        other tensor in float; a JSON marks each key `W8A8` or `FLOAT`."""
        from bridge.export import write_w8a8
        from bridge.w8a8 import check_exportable, layer_tensors

        p = self._require_run()
        check_exportable(self.cfg.w_sym, self.cfg.w_bit, self.cfg.a_bit, self.cfg.act_quant)
        layers = wrappers(self.model)
        tensors, kinds = {}, {}
        for name, w in layers.items():
            bias = w.corrected_bias()
            t = layer_tensors(name, p["quant_weight"][name], p["weight_scale"][name],
                              None if bias is None else bias.detach().float().cpu().numpy(),
                              float(p["input_scale"][name]), int(p["input_offset"][name]), self.cfg.a_signed)
            tensors.update(t)
            kinds.update({k: "W8A8" for k in t})
        for key, value in self._float_tensors(layers).items():
            tensors[key] = value
            kinds[key] = "FLOAT"
        description = {"model_quant_type": "W8A8", **dict(sorted(kinds.items()))}
        return write_w8a8(output_path, tensors, description,
                          safetensors_name or "quant_model_weight_w8a8.safetensors",
                          json_name or "quant_model_description_w8a8.json")

    def export_quant_onnx(self, model_arch: str, save_path, input_names: list[str] | None = None,
                          output_names: list[str] | None = None, opset_version: int = 18,
                          example_batch=None, ascend: bool = False) -> list:
        """Standard ONNX QDQ model `<save_path>/<model_arch>.onnx`: QuantizeLinear /
        DequantizeLinear around every quantized layer's input and weight, traced on the
        first calibration batch with a dynamic batch axis (and sequence axis for token
        inputs), via torch's dynamo exporter (`bridge.onnx_export`). `example_batch`
        replaces the traced batch: tracing specialises data-dependent paths, so trace a
        batch that exercises them (e.g. padded token batches with attention masks)."""
        from bridge.onnx_export import export_qdq

        self._require_run()
        if self.cfg.w_bit != 8 or (self.cfg.act_quant and self.cfg.a_bit != 8):
            raise ExportError(f"ONNX QuantizeLinear holds 8-bit codes; this calibration has w_bit={self.cfg.w_bit}, "
                              f"a_bit={self.cfg.a_bit} (use export_param for other widths)")
        batch = as_batch(example_batch if example_batch is not None else next(iter(self.calib_data)), 0)
        if ascend and not self.cfg.w_sym:
            raise ExportError("the Ascend ONNX form needs symmetric weights (w_sym=True)")
        return export_qdq(self.model, batch, model_arch, save_path, input_names, output_names, opset_version,
                          ascend=ascend)

    def _float_tensors(self, layers) -> dict:
        out = {}
        for key, t in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            if any(key.startswith(f"{n}.") for n in layers):
                continue
            out[key] = t.detach().float().cpu().numpy() if t.is_floating_point() else t.detach().cpu().numpy()
        return out

    def enable_quant(self) -> None:
        """Switch fake quantization on (after `run()`)."""
        self._require_run()
        for w in wrappers(self.model).values():
            w.quant_enabled = True

    def disable_quant(self) -> None:
        """Switch fake quantization off: the model computes in float again."""
        for w in wrappers(self.model).values():
            w.quant_enabled = False
