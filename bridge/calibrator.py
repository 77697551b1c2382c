"""`Calibrator`: msModelSlim's calibration facade over the pure-JAX core.

    cal = Calibrator(model, cfg, calib_data)   # fuses Conv+BN, attaches quantizers in place
    cal.run()                                  # capture → observers → records → buffers
    cal.get_quant_params(); cal.export_param(path); cal.restore()

The facade delegates: preparing the model (`bridge.inplace.prepare`), one calibration
(`bridge.pipeline` runs the steps of `jaxq.pipeline.plan(cfg)`),
sensitivity and fallback (`bridge.studies.sensitivity`), exports (`bridge.export`). Every
change to the user's model is logged (`bridge.inplace.transaction`): a failure in the
constructor or in `run()` leaves the model exactly as it was, and `restore()` gives it back.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import TYPE_CHECKING, Callable, Iterable

from torch import nn

import jaxq
from bridge.studies import sensitivity as sens
from bridge.calibrated import Calibrated
from bridge.capture.observers import histograms
from bridge.capture.context import Context
from bridge.capture.data import iter_batches
from bridge.output_check import check_output
from bridge.capture.synthetic import synthetic_images
from bridge.devices import resolve_device
from bridge.inplace.fakequant import quantization, set_quantization
from bridge.inplace.functional import one_attention_path
from bridge.pipeline import StepReport, run_pipeline
from bridge.inplace.prepare import EmptyModelError, calibration_data, prepare
from bridge.inplace.record import PARAM_KEYS, LayerRecord, apply_records, refresh_records
from bridge.studies.sensitivity import FallbackCurve, SensitivityTable
from bridge.inplace.transaction import ModelEdit, refuse_quantized
from jaxq.config import DISTILLED
from jaxq.pipeline import plan
from jaxq.sharding import check_mesh, layers_over

if TYPE_CHECKING:
    import jax

__all__ = ["Calibrator", "EmptyModelError", "PARAM_KEYS"]


class Calibrator:
    """Post-training quantization of a torch model driven by a `jaxq.QuantConfig`.

    Args:
      model: the float `nn.Module`; fused and quantized in place (undo: `restore()`).
      cfg: a `jaxq.QuantConfig`; `cal.cfg` holds it with its automatic defaults decided
        (`QuantConfig.resolved`: bias correction on with representative data).
      calib_data: a list (or re-iterable, e.g. DataLoader) of batches; a batch is a
        tensor, a tuple/list of positional inputs or a dict of keyword inputs. Required
        for `quant_mode=1`; optional in data-free mode (`quant_mode=0`), where
        `cfg.input_shape` otherwise gives one `torch.rand` virtual sample.
      fuse_module_call_back: `f(model) -> model | None` that fuses modules itself;
        when given, it replaces the automatic Conv+BN fusion.
      progress: show progress bars.
      mesh: a `jax.sharding.Mesh` (`jaxq.sharding.data_mesh()`): calibration batches are
        split over its devices and run through the model lowered to JAX
        (`bridge.jax_model.observe`), and the layer axis of every vectorised bucket is
        split over them too. Batch sizes must divide by the devices of each process.
        Default: the torch forward, one device.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: jaxq.QuantConfig,
        calib_data: Iterable | None = None,
        fuse_module_call_back: Callable | None = None,
        *,
        progress: bool = True,
        mesh: "jax.sharding.Mesh | None" = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(cfg, jaxq.QuantConfig):
            raise TypeError(f"cfg must be a jaxq.QuantConfig, got {type(cfg).__name__}")
        if fuse_module_call_back is not None and not callable(fuse_module_call_back):
            raise TypeError("fuse_module_call_back must be callable: f(model) -> model or None")
        refuse_quantized(model)
        _refuse_inference_mode("Calibrator(...)")
        self.mesh = None if mesh is None else check_mesh(mesh)
        self._default_bias_correction = cfg.bias_correction is None
        cfg = cfg.resolved(
            representative_data=(calib_data is not None or cfg.virtual_data in DISTILLED)
            and not _several_processes(mesh)
        )
        self._default_bias_correction &= cfg.bias_correction
        self.cfg, self.progress, self.device = cfg, progress, resolve_device(cfg.device)
        self.model = model
        self._edit = ModelEdit(model)
        try:
            self.calib_data = calibration_data(model, cfg, calib_data, self.device, progress)
            self._synthetic = (  # distilled before BN folding, from the model as it was given
                synthetic_images(
                    model,
                    self.calib_data,
                    cfg.recon_synthetic,
                    cfg.virtual_steps,
                    cfg.virtual_lr,
                    cfg.seed,
                    progress,
                    method="genie" if cfg.virtual_data == "genie" else "bn_stats",
                )
                if cfg.recon_synthetic
                else []
            )
            prepared = prepare(model, cfg, self.calib_data, self.device, fuse_module_call_back, self._edit)
        except BaseException:
            self._edit.restore()
            raise
        self._edit.revert_buffers()
        self.cfg = prepared.cfg  # quantize_first_last="8bit" written out as layer names
        self.specs, self.disabled, self.unsupported = prepared.specs, prepared.disabled, prepared.unsupported
        self.all_layers = prepared.layers
        self._why_float = prepared.why_float
        self._records: dict[str, LayerRecord] | None = None
        self._jax_cache = None
        self.reports: dict = {}  # {step: per-layer entries} of the steps that report (`steps` has them all)
        self.steps: list[StepReport] = []  # one report per step of the pipeline (`jaxq.pipeline.plan`)
        self.timings: dict[str, float] = {}
        self.fallen_back: list[str] = []
        self.output_cosine: float | None = None  # bridge.output_check, after run()
        self._fp_model: nn.Module | None = None
        self._restored = False

    # -- the model ----------------------------------------------------------------------
    @property
    def fused(self) -> list[tuple[str, str]]:
        """`(conv, bn)` pairs folded before calibration."""
        return [f.pair for f in self._edit.folds]

    @property
    def fp_model(self) -> nn.Module:
        """A float copy of the model as it was passed in, built on first use."""
        if self._fp_model is None:
            try:
                self._fp_model = self._edit.float_copy()
            except (TypeError, copy.Error, RuntimeError) as e:
                raise TypeError(
                    f"fp_model is a deep copy of the model, and {type(self.model).__name__} cannot be "
                    f"deep-copied ({type(e).__name__}: {e}); keep your own float model instead, or make "
                    "the model copyable (e.g. keep locks and open files out of its attributes)"
                ) from e
        return self._fp_model

    @property
    def quantized_names(self) -> list[str]:
        return list(self._quantizers())

    @property
    def quantizers(self) -> dict:
        """Name → `LayerQuantizer` of every quantized layer (fallen-back layers left out)."""
        return self._quantizers()

    def calibrated(self) -> Calibrated:
        """The calibrated model as data (`bridge.calibrated.Calibrated`): what exports,
        studies and the JAX model take. Needs `run()` (or `load_param`)."""
        records = self._require_run()
        return Calibrated(
            self.model, self._quantizers(), records, self.cfg, self.specs, tuple(self.fused), self.calib_data
        )

    def _quantizers(self) -> dict:
        self._require_open()
        return {n: q for n, q in self._edit.quantizers.items() if n not in self.fallen_back}

    def restore(self) -> nn.Module:
        """Give the model back as it was passed in (float, unfused, no jaxq state)."""
        if not self._restored:
            self._edit.restore()
            self._restored = True
        return self.model

    def _require_open(self) -> None:
        if self._restored:
            raise RuntimeError("this Calibrator restored its model (restore() or a failed run()); create a new one")

    def _context(self, layers: dict | None = None) -> Context:
        return Context(
            self.model,
            layers if layers is not None else self._quantizers(),
            self.specs,
            self.cfg,
            self.calib_data,
            self.device,
            self.progress,
            self.mesh,
            self._default_bias_correction,
            self._synthetic,
        )

    @property
    def records(self) -> dict[str, LayerRecord] | None:
        """Per quantized layer, its parameter record — of the model as it is now: a weight
        trained or loaded since `run()` gets the codes its fake quantizer computes
        (`bridge.inplace.record.refresh_records`)."""
        if self._records is not None and not self._restored:
            self._records = refresh_records(self._quantizers(), self._records)
        return self._records

    @records.setter
    def records(self, value) -> None:
        self._records = value

    # -- calibration --------------------------------------------------------------------
    def run(self) -> "Calibrator":
        """Capture activations, compute every layer's record and switch quantization on.
        On failure the model is restored as it was passed in."""
        self._require_open()
        _refuse_inference_mode("Calibrator.run()")
        _refuse_local_data_steps(self.cfg, self.mesh)
        self.disable_quant()
        try:
            ctx = self._context()
            if self.fallen_back:  # a second run() keeps the earlier fallback
                ctx = dataclasses.replace(ctx, cfg=ctx.cfg.replace(amp_num=0))
            with layers_over(self.mesh):
                result = run_pipeline(ctx, self.all_layers)
            self._records, self.steps, self.timings = result.records, result.steps, result.timings
            self.reports = result.reports
            apply_records(self._quantizers(), self._records)
            self.enable_quant()
            if result.fall_back:
                self.fall_back(result.fall_back)
            first = next(iter_batches(self.calib_data, self.device))[1]
            self.output_cosine = check_output(self.model, self._quantizers(), first)
        except BaseException:
            self._records = None
            self.restore()
            raise
        finally:
            if not self._restored:
                self._edit.revert_buffers()
        return self

    def activation_histograms(self, bins: int | None = None) -> dict[str, jaxq.HistogramState]:
        """Histogram of every quantized layer's input over the calibration data (float
        model); the states feed `jaxq.sweep` and plots."""
        if bins is not None:
            sens.check_count("bins", bins, allow_none=False, minimum=16)
        layers = self._quantizers()
        with quantization(layers, False):
            return histograms(self._context(layers), bins)

    # -- sensitivity and fallback -------------------------------------------------------
    def calibration_batches(self, samples: int | None = None) -> list:
        """The first `samples` calibration samples (default `cfg.amp_samples`) as `Batch`es,
        on the calibration device: what the studies (`sensitivity`, `mixed_precision_front`) read."""
        samples = sens.check_count("samples", samples)
        return sens.amp_batches(
            (b for _, b in iter_batches(self.calib_data, self.device)), samples or self.cfg.amp_samples
        )

    def sensitivity(
        self, metrics=("mse", "relative_mse", "isolated"), samples: int | None = None, engine: str = "torch"
    ) -> SensitivityTable:
        """Per-layer sensitivity table of the quantized layers (after `run()`).

        `mse` / `relative_mse` / `cosine`: each layer's output in the fully quantized model
        against the float model, call by call; `isolated`: the model-output distance (KL
        for logits, 1 − cosine otherwise) with only that layer quantized; `fisher`: its
        second-order estimate for every layer at once (`sens.fisher_sensitivity`). Uses the first
        `samples` (default `cfg.amp_samples`) calibration samples. `engine="jax"`: the
        isolated column from the JAX model in one compiled program (`jax_forward`).
        """
        self._require_run()
        metrics = sens.check_metrics(metrics)
        if engine not in ("torch", "jax"):
            raise ValueError(f"engine={engine!r}: expected 'torch' or 'jax'")
        isolated_by = None
        if engine == "jax" and "isolated" in metrics:
            from bridge.jax_model.studies import isolated_sensitivity

            isolated_by = lambda batches: isolated_sensitivity(self.jax_forward(batches[0]), batches, mesh=self.mesh)  # noqa: E731
        with one_attention_path():
            return sens.sensitivity_table(
                self.model,
                self._quantizers(),
                self.specs,
                self.all_layers,
                self.calibration_batches(samples),
                metrics,
                isolated_by,
            )

    # -- the model as a JAX function ------------------------------------------------------
    def jax_forward(self, example_batch=None):
        """The calibrated model's quantized forward as a pure JAX function
        (`bridge.jax_model.QuantizedForward`: `fn(params, buffers, state, switches, args,
        kwargs)`), lowered through torchax and checked against torch on `example_batch`
        (default: the first calibration batch). `LoweringError` if the model cannot be
        lowered; the torch path is unaffected. Cached until the records change."""
        records = self._require_run()
        key = (id(records), tuple(self.fallen_back), len(records))
        if self._jax_cache is None or self._jax_cache[0] != key:
            from bridge.jax_model.quantized import quantized_forward

            example = (
                example_batch if example_batch is not None else next(iter_batches(self.calib_data, self.device))[1]
            )
            self._jax_cache = (key, quantized_forward(self.model, records, example, self._quantizers()))
        return self._jax_cache[1]

    def jax_model(self, example_batch=None):
        """The quantized model as a Flax NNX module (`bridge.jax_model.QuantizedModel`):
        weights `nnx.Param`, quantizer state `QuantizerState`, ready for `nnx.jit` and optax."""
        from bridge.jax_model.nnx_model import QuantizedModel

        return QuantizedModel(self.jax_forward(example_batch))

    def fall_back(self, names) -> None:
        """Return the named quantized layers to float: their quantizers are removed."""
        self._require_run()
        layers = self._quantizers()
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            if name not in layers:
                raise ValueError(f"{name!r} is not a quantized layer; quantized layers: {list(layers)[:5]}…")
        for name in names:
            layers[name].detach()
            self._records.pop(name, None)
            self.fallen_back.append(name)

    def fallback_search(
        self,
        target: float,
        by: str = "isolated",
        samples: int | None = None,
        max_layers: int | None = None,
        engine: str = "torch",
    ) -> FallbackCurve:
        """Fall back the fewest layers, most sensitive first (ranking `by`), until the
        model-output distance from float (KL for logits, 1 − cosine otherwise) on the
        first `samples` calibration samples is ≤ `target`. Returns the whole curve.
        `engine="jax"`: the isolated ranking from the JAX model (`sensitivity`)."""
        self._require_run()
        max_layers = sens.check_count("max_layers", max_layers, minimum=0)
        layers = self._quantizers()
        limit = len(layers) if max_layers is None else max_layers
        order = self.sensitivity(metrics=(by,), samples=samples, engine=engine).ranked(by)[:limit]
        with one_attention_path():
            curve = sens.fallback_curve(self.model, layers, self.calibration_batches(samples), order, target)
        if curve.chosen > 0:
            self.fall_back(order[: curve.chosen])
        return curve

    def quantize_with_accuracy_control(
        self,
        validate: Callable,
        max_drop: float,
        by: str = "isolated",
        samples: int | None = None,
        engine: str = "torch",
        higher_is_better: bool = True,
    ):
        """Fall back the fewest layers so that `validate(model)` (the user's score, e.g.
        top-1 on their validation set) drops at most `max_drop` from the float model's.
        Layers are ranked by `sensitivity(by)` (`engine="jax"`: the isolated ranking in one
        program) and the count is found by bisection (`bridge.studies.accuracy_control`). The chosen
        layers fall back; returns the report (scores measured, chosen count; −1 and no
        fallback when even the float model of every layer misses the drop)."""
        from bridge.studies.accuracy_control import accuracy_control

        self._require_run()
        if not callable(validate):
            raise TypeError(f"validate must be callable: validate(model) -> score, got {type(validate).__name__}")
        order = self.sensitivity(metrics=(by,), samples=samples, engine=engine).ranked(by)
        report = accuracy_control(self.model, self._quantizers(), validate, max_drop, order, higher_is_better)
        if report.chosen > 0:
            self.fall_back(order[: report.chosen])
        return report

    # -- results ------------------------------------------------------------------------
    def _require_run(self) -> dict[str, LayerRecord]:
        self._require_open()
        if self._records is None:
            raise RuntimeError("Calibrator.run() has not been called yet")
        return self.records

    def params(self) -> dict[str, dict]:
        """`{key: {layer: array}}` for `PARAM_KEYS`, a view of the records."""
        return self.calibrated().params()

    def get_quant_params(self) -> tuple[dict, dict, dict, dict, dict]:
        """msModelSlim's five dicts `{layer name: array}`:
        `(input_scale, input_offset, weight_scale, weight_offset, quant_weight)`."""
        p = self.params()
        return tuple(p[k] for k in PARAM_KEYS[:5])

    def layer_descriptions(self) -> dict[str, dict]:
        """Per quantized layer: kind, geometry, weight shape and schemes (JSON-ready)."""
        self._require_open()
        return Calibrated(self.model, self._quantizers(), {}, self.cfg, self.specs).layer_descriptions()

    def export_param(self, path, legacy: bool = False) -> list:
        """Write the parameters (safetensors + JSON + manifest; msModelSlim `.npy` dicts if
        `legacy`). The directory rebuilds the fake-quant model without calibration data:
        `bridge.load_quantized(model, path)` or `Calibrator.load_param(path)`."""
        from bridge.export.calibrated import export_param

        return export_param(self.calibrated(), path, legacy)

    def load_param(self, path) -> "Calibrator":
        """Load parameters written by `export_param` into this calibrator's layers (no data
        needed). The files are checked against this calibrator (config, layers, shapes,
        values) before anything changes."""
        from bridge.export.reload import load_float_params, read_records

        self._require_open()
        records, description = read_records(path, self.cfg, dict(self._edit.quantizers), self.fused)
        load_float_params(self.model, path, description, self._edit)
        layers = self._quantizers()
        apply_records(layers, records)
        self._records = records
        self.enable_quant()
        return self

    def export_quant_safetensor(
        self, output_path, safetensors_name: str | None = None, json_name: str | None = None
    ) -> list:
        """msModelSlim's W8A8 deployment files (`bridge.export.w8a8`): int8 weights, `input_scale`,
        `input_offset` (int8 code of 0), `deq_scale`, `quant_bias` per quantized layer, every
        other tensor in float; a JSON marks each key `W8A8` or `FLOAT`."""
        from bridge.export.calibrated import export_w8a8

        return export_w8a8(self.calibrated(), output_path, safetensors_name, json_name)

    def export_quant_onnx(
        self,
        model_arch: str,
        save_path,
        input_names: list[str] | None = None,
        output_names: list[str] | None = None,
        opset_version: int = 18,
        example_batch=None,
        ascend: bool = False,
    ) -> list:
        """Standard ONNX QDQ model `<save_path>/<model_arch>.onnx` (`bridge.export.onnx`),
        traced on the first calibration batch or `example_batch` (tracing specialises
        data-dependent paths: trace a batch that exercises them)."""
        from bridge.export.calibrated import export_onnx

        return export_onnx(
            self.calibrated(), model_arch, save_path, input_names, output_names, opset_version, example_batch, ascend
        )

    def enable_quant(self) -> None:
        """Switch fake quantization on (after `run()`)."""
        self._require_run()
        set_quantization(self._quantizers(), True)

    def disable_quant(self) -> None:
        """Switch fake quantization off: the model computes in float again."""
        set_quantization(self._quantizers(), False)

    @contextlib.contextmanager
    def quantization(self, enabled: bool = True):
        """Context manager: quantization `enabled` inside, the previous state after."""
        if not isinstance(enabled, bool):
            raise TypeError(f"quantization(enabled={enabled!r}): expected True or False")
        if enabled:
            self._require_run()
        with quantization(self._quantizers(), enabled):
            yield self.model

    def summary(self) -> str:
        """Which layers are quantized, kept float (and why)."""
        lines = [f"quantized layers {len(self._quantizers())} of {len(self.all_layers) + len(self.unsupported)}"]
        lines += [f"  float  {n}: {self._why_float.get(n, 'in disable_names')}" for n in sorted(self.disabled)]
        lines += [f"  float  {n}: fallen back (sensitivity)" for n in self.fallen_back]
        lines += [f"  float  {n}: {why}" for n, why in self.unsupported.items()]
        if self.output_cosine is not None:
            lines.append(f"output cosine with the float model (first calibration sample): {self.output_cosine:.4f}")
        return "\n".join(lines)


def _refuse_inference_mode(what: str) -> None:
    import torch

    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{what} cannot run under torch.inference_mode(): calibration edits the model's parameters "
            "in place and reads their version counters, which inference mode takes away; call it outside "
            "the inference_mode block (jaxq turns autograd off itself where it can)"
        )


def _several_processes(mesh) -> bool:
    """A mesh over several processes: steps that read data through torch see local data only."""
    if mesh is None:
        return False
    import jax

    return jax.process_count() > 1


def _refuse_local_data_steps(cfg: jaxq.QuantConfig, mesh) -> None:
    """With several processes only the observers see the global batch; the steps that
    read calibration data through torch would see each process's part and give each
    process a different model."""
    import jax

    if mesh is None or jax.process_count() == 1:
        return
    torch_reads = {"rows", "mean_rows", "outputs"}
    field = {"fallback": "amp_num", "bias_correction": "bias_correction", "smooth_quant": "smooth_quant"}
    asked = [
        field.get(s.name, f"keep_acc.{s.name}")
        for s in plan(cfg)
        if s.name == "smooth_quant" or (s.name != "activations" and torch_reads & set(s.reads))
    ]
    if asked:
        raise ValueError(
            f"{', '.join(asked)}: with {jax.process_count()} processes these read each process's own "
            "calibration data through torch and would give each process a different model; calibrate "
            "with them in one process, or switch them off for the multi-process run"
        )
