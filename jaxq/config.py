"""`QuantConfig`: the immutable configuration that drives a calibration.

Every field of msModelSlim's `QuantConfig` with the same name and default
(see msModelSlim's QuantConfig page, docs/design.md §4), plus keyword-only
extensions. Construction validates and normalises (lists → tuples, `keep_acc` dict →
`KeepAcc`), so a config is hashable, a pytree with no array leaves, and usable as a
static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import numbers
import re
from typing import Any

import jax

from jaxq.keep_acc import MAX_ITERS, KeepAcc, check_bool, is_int
from jaxq.scheme import ALLOWED_BITS, QScheme
from jaxq.weight_range import WEIGHT_RANGES, resolved_range

ACT_METHODS = {0: "sigma statistic", 1: "min-max observer", 2: "histogram observer"}
QUANT_MODES = {0: "data-free", 1: "label-free"}
MINMAX_COMBINES = ("batch_percentile", "running")
VIRTUAL_DATA = ("uniform", "bn_stats", "genie")
DISTILLED = ("bn_stats", "genie")  # virtual data made from the model's BatchNorm statistics
AMP_METRICS = ("mse", "relative_mse", "isolated", "fisher")
_DEVICE_RE = re.compile(r"(cpu|npu|cuda)(:\d+)?")
SEED_RANGE = (0, 2**32 - 1)
MAX_AUGMENT = 64
MAX_SYNTHETIC = 4096
FIRST_LAST_8BIT = "8bit"  # quantize_first_last: the first and last layers at 8-bit weights and inputs


RECON_INPUTS = ("quantized", "float")


def _check_one_of(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"QuantConfig.{field}={value!r} is not allowed; choose one of {allowed}")


def _is_real(value) -> bool:
    """A real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_share(field: str, value, meaning: str) -> None:
    """A share in [0, 0.5] (not a bool)."""
    if not _is_real(value) or not 0 <= value <= 0.5:
        raise ValueError(f"QuantConfig.{field}={value!r} must be a number in [0, 0.5] ({meaning}; 0: none)")


def _normalise_layer_bits(value, field: str = "layer_bits") -> tuple:
    if value is None:
        return ()
    items = value.items() if isinstance(value, dict) else value
    try:
        pairs = [tuple(p) for p in items]
    except TypeError:
        raise TypeError(f"QuantConfig.{field}={value!r} must be a dict {{layer name or glob: bits}}") from None
    out = []
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise TypeError(f"QuantConfig.{field} entry {pair!r} must be (layer name or glob, bits)")
        bits = pair[1].item() if hasattr(pair[1], "item") else pair[1]
        if not is_int(bits) or bits not in ALLOWED_BITS:
            raise ValueError(
                f"QuantConfig.{field}[{pair[0]!r}]={bits!r} is not supported; allowed bit widths: {ALLOWED_BITS}"
            )
        out.append((pair[0], int(bits)))
    return tuple(out)


def _bits_for(name: str, patterns: tuple, default: int) -> int:
    """The bits of the first `(pattern, bits)` whose glob matches `name`, else `default`."""
    return next((bits for pattern, bits in patterns if fnmatch.fnmatchcase(name, pattern)), default)


SMOOTH_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # `smooth_quant=True`: the range the SmoothQuant paper uses


def _normalise_smooth_quant(value) -> tuple[float, ...]:
    """None/False/[] → () (off); True → `SMOOTH_ALPHAS`; α → (α,); a sequence of α → the grid
    searched per layer group."""
    if value is None or value is False or (isinstance(value, (list, tuple)) and not value):
        return ()
    if value is True:
        return SMOOTH_ALPHAS
    items = value if isinstance(value, (list, tuple)) else (value,)
    out = []
    for a in items:
        a = a.item() if hasattr(a, "item") else a
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not (math.isfinite(a) and 0.0 <= a <= 1.0):
            raise ValueError(
                f"QuantConfig.smooth_quant={value!r}: each α must be a number in [0, 1] (0.5 is the "
                f"paper's default; a list of α is searched per layer group), got {a!r}"
            )
        out.append(float(a))
    return tuple(out)


def _check_choice(field: str, value, allowed) -> Any:
    if not is_int(value) or value not in allowed:
        raise ValueError(f"QuantConfig.{field}={value!r} is not allowed; choose one of {allowed}")
    return int(value)


def _normalise_input_shape(value) -> tuple[tuple[int, ...], ...] | None:
    """`None`/`[]` → None; one shape → ((…),); a list of shapes → tuple of tuples."""
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return None
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"QuantConfig.input_shape={value!r} must be a shape like [1, 3, 224, 224] or a list of shapes")
    shapes = [value] if all(is_int(d) for d in value) else list(value)
    out = []
    for shape in shapes:
        if not isinstance(shape, (list, tuple)) or not shape or not all(is_int(d) for d in shape):
            raise ValueError(
                f"QuantConfig.input_shape={value!r}: each shape must be a non-empty list of ints, got {shape!r}"
            )
        if any(d <= 0 for d in shape):
            raise ValueError(f"QuantConfig.input_shape={value!r}: every dimension must be positive, got {list(shape)}")
        out.append(tuple(int(d) for d in shape))
    return tuple(out)


def _normalise_names(value, field: str = "disable_names") -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(
            f"QuantConfig.{field}={value!r} must be a list of {'module' if field == 'recon_blocks' else 'layer'} "
            "names (or None)"
        )
    bad = [n for n in value if not isinstance(n, str)]
    if bad:
        raise TypeError(f"QuantConfig.{field} contains non-string entries {bad!r}")
    return tuple(value)


# keep_acc steps that choose per-channel weight scales or codes (`w_group_size` refuses them)
GROUPLESS_STEPS = ("admm", "easy_quant", "round_opt")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Post-training quantization settings (msModelSlim `QuantConfig`, docs/design.md §4).

    Keyword-only extensions:
      quantize_first_last: with empty `disable_names`, msModelSlim keeps the first and the
          last quantizable layer in float; `True` quantizes them too (every layer);
          `"8bit"` quantizes them with 8-bit weights and 8-bit inputs (the convention of
          the BRECQ/QDrop papers; layers narrower than 8 bits only), whatever
          `disable_names` says of the others. The bridge writes the names it chose into
          `layer_bits` / `layer_act_bits` of `Calibrator.cfg`.
      minmax_combine: how `act_method=1` combines batch extremes: `"batch_percentile"`
          (msModelSlim: 40th percentile of the batch minima, 60th of the maxima) or
          `"running"` (absolute min and max over all batches).
      seed: seed of the virtual data of data-free mode.
      hist_bins: bins of the histogram observer (`act_method=2`), 2048 as torch.ao.
      hist_samples: values of each batch that the histogram observer bins per layer, as
          contiguous blocks of 1024 evenly spaced through the batch (counts weighted back
          to the full batch); min and max still come from every value. 0 bins every
          value. The default 2^18 keeps histogram calibration near the float forward time.
      virtual_data: data-free inputs without `calib_data`: `"uniform"` (msModelSlim's one
          `torch.rand(input_shape)` sample), `"bn_stats"` (inputs optimised so every
          BatchNorm sees its running statistics, ZeroQ-style) or `"genie"` (images drawn
          from a small generator trained with its latents to that end, Genie-style; one
          image input `[N, C, H, W]`). The batch dimension of `input_shape` is the number of
          samples. With `recon_synthetic`, `"genie"` also makes the fitting steps' synthetic
          images (otherwise they are `"bn_stats"`'s).
      virtual_steps, virtual_lr: Adam steps of `"bn_stats"` and `"genie"`; learning rate of
          `"bn_stats"` (Genie's are fixed: latents 0.1, generator 0.01).
      amp_metric: how `amp_num` ranks layers: `"fisher"` (default: the second-order
          estimate of `"isolated"` for every layer from one forward and one backward pass
          per batch, two for outputs that are not logits), `"isolated"` (model-output
          distance with only that layer quantized, a forward per layer;
          `benchmarks/README.md` compares the rankings and their cost),
          `"mse"` (msModelSlim's: raw output MSE in the fully quantized model) or
          `"relative_mse"` (MSE / output variance).
      w_range: how each output channel's weight range is chosen before rounding
          (`jaxq.weight_range`): `"minmax"` (msModelSlim: the channel's min and max) or
          `"mse"` (that range shrunk by the factor, of 80 from 1 down to 0.2, of least
          Σ(w − ŵ)², as BRECQ's and QDrop's weight start). None (default): `"mse"` for
          layers with weights of at most `MSE_RANGE_BITS` (4) bits, `"minmax"` wider
          (msModelSlim's arithmetic at 8 bits); `benchmarks/README.md` measures both at
          4 and 6 bits.
      layer_bits: per-layer weight bit widths, `{name or glob: bits}` (first match wins;
          other layers use `w_bit`), e.g. the allocation of
          `bridge.jax_model.mixed_precision`. Stored as a tuple of `(pattern, bits)`.
      layer_act_bits: per-layer input (activation) bit widths, the same form; other
          layers use `a_bit`.
      amp_samples: calibration samples the ranking uses: the first 16 (msModelSlim reads
          10; 16 ranked better on EfficientNet-Lite0 and MiniLM at W6A8, `benchmarks/README.md`)
          — whole batches, the last one cut to the rows still needed where its inputs allow.
      recon_rows: input rows (token or pixel positions, `jaxq.rows`) sampled per layer from
          the calibration data for AdaRound and GPTQ; EasyQuant reads at most 1,024 of them.
      recon_augment: augmented copies of each calibration image that the reconstruction
          steps (EasyQuant, AdaRound, GPTQ, BRECQ/QDrop, PD-Quant) fit on beside the images
          themselves — random resized crops, flips, colour jitter, mixes of two images,
          drawn from `seed` (`bridge.capture.augment`); 0 (default) fits on the images
          only. Observers, bias correction and the fallback ranking read the images only.
      recon_synthetic: images distilled from the model's BatchNorm statistics (as
          `virtual_data="bn_stats"`, or Genie's generator with `virtual_data="genie"`, with
          `virtual_steps` / `virtual_lr`, before BN folding)
          that the fitting steps read beside the calibration images and their augmented
          copies; shaped like the calibration images, never held out, never read by the
          observers or bias correction. 0 (default): none.
      recon_holdout: share of the calibration images (at least one, at most 32) that
          BRECQ/QDrop hold out of the fit, with all their augmented copies: each block keeps
          the learned state of lowest error on them (measured four times during the steps,
          and round to nearest as the start), and `reports["blocks"]` shows both errors.
          0 (default): every image is fitted and the final state is kept if it lowers the
          fitted error (holding a quarter out cost EfficientNet-Lite0 W4A8 QDrop agreement
          on unseen photos; `docs/accuracy.md`). `keep_acc["pd_quant"]` holds the same share
          out and keeps its learned step sizes only if they lower the output distance there.
      recon_hard_final: share of BRECQ/QDrop's steps, at the end, that hold every weight's
          rounding hard and learn only the input step sizes against it, so the block that
          is deployed is the one that was fitted and every rounding variable ends hard
          (`reports["blocks"]` shows the hard share). The rounding regulariser's schedule
          runs over the steps before them. 0 (default): the last step's soft rounding is
          rounded at ½.
      recon_lr: Adam's learning rate on BRECQ/QDrop's rounding variables `V` (per block;
          the input step sizes keep theirs). Adam moves each `V` by about this much per step,
          and `h(V)` is hard only beyond |V| ≈ 2.4, so `recon_lr × steps` decides whether the
          rounding can end hard. 0.05 (default; 0.01 before: about half of a CNN block's
          rounding stayed soft after 300 steps, `docs/accuracy.md`).
      recon_reg: λₙ, the rounding regulariser's weight in BRECQ/QDrop's loss normalised per
          block (`jaxq.block_reconstruction.loss_weights`): the block's output error divided
          by its error under round to nearest, plus λₙ times the mean regulariser per rounding
          variable, so one weight balances blocks of any activation scale and size. 0: the
          papers' unnormalised loss (error summed over features + 0.01·Σ regulariser), whose
          balance differs by 10⁵ between an EfficientNet's blocks and a transformer's.
          1000 (default; 0 before: most of EfficientNet-Lite0's rounding stayed soft, and
          its W4A8 QDrop agreement / KL on unseen photos went 0.547 / 0.417 → 0.625 / 0.223
          with it, `docs/accuracy.md`).
      recon_inputs: what the quantized layer sees while EasyQuant and AdaRound fit it to the
          float layer's output: `"float"` (the float model's inputs, default) or
          `"quantized"` (the inputs of the round-to-nearest quantized model, one more pass
          over the data; see `benchmarks/README.md` for how the two compare).
      bias_correction: after the weights are final (round-to-nearest or `keep_acc`), add
          `δ = (W − Ŵ)·E[x]` to each quantized layer's bias (`jaxq.bias_correction`), with
          `E[x]` the mean input of the float model over `recon_rows` sampled rows per batch
          of the calibration data. Cancels the mean output shift of weight rounding
          (`benchmarks/README.md`). Needs representative data (real
          `calib_data` or `virtual_data="bn_stats"`); layers without a bias get one.
          None (default): on when the calibration data is representative (real
          `calib_data`, or `virtual_data="bn_stats"`), off for msModelSlim's uniform
          data-free sample; the Calibrator stores the resolved value in its `cfg`.
          `False` gives msModelSlim's arithmetic exactly.
      memory_budget: MiB that the sampled rows of EasyQuant / AdaRound may hold at once.
          Layers are processed in groups whose rows fit (one pass over the data per
          group); a layer whose `recon_rows` alone would not fit samples fewer rows (a
          warning names it). Block reconstruction (BRECQ / QDrop): the most a block's
          training program may allocate for its temporaries; above it each step's
          gradient is taken over smaller parts of its mini-batch (the same loss;
          `reports["blocks"]` gives each block's parts and memory). None: an eighth of
          the machine's memory, at most 1024 MiB, for rows; half that for a block's
          program (its temporaries come on top of the block's captured samples).
      smooth_quant: SmoothQuant (`jaxq.smoothing`) for Linear layers and ungrouped 1×1
          convolutions with quantized inputs: each input channel is divided by `s_j = max|X_j|^α / max|W_j|^(1−α)`
          before the activation quantizer and its weight column multiplied by it
          (layers reading one tensor share `s`). `α` (e.g. 0.5), or a list of α searched
          per layer group by the quantized output error (no smoothing is a candidate);
          `True` searches `SMOOTH_ALPHAS` (0.3…0.8). None: off. The factors are part of the record
          (`smooth_scale`) and every export.
      recon_blocks: module names that BRECQ/QDrop reconstruct as blocks (each must hold
          quantized layers; no two may overlap; every quantized layer outside them is a
          block of its own), checked before any work. None (default): found from the
          model — the items of its outermost ModuleList/Sequential that each hold quantized
          layers, or else those that are two or more modules of one class (residual units with
          pooling between them, a stem or head of another class beside them searched on its
          own); a `LayerWiseBlocks` warning says when none holds several layers.
      w_group_size: input columns per weight scale of 2-D weights (Linear layers, attention
          projections): `Ŵ[r, c] = (q[r, c] − o[r, c//g])·s[r, c//g]`, scales and offsets
          `[out, in/g]` (`jaxq.groupwise`), with every layer's input width a multiple of `g`
          (else the Calibrator names the layer). Convolutions keep one scale per output
          channel. Round to nearest, `keep_acc` "gptq", "adaround", "brecq", "qdrop" and
          "pd_quant" (they keep the group scales and choose codes or input step sizes); "admm",
          "easy_quant" and "round_opt" choose per-channel scales or codes and are refused.
          `export_param` and `load_param` carry the group scales; the W8A8, ONNX and Ascend
          exports refuse them; the JAX model simulates them (its mixed-precision front and
          `QuantizedModel` refuse them). None (default): one scale per output channel.
      rotate_inputs: rotate each quantized Linear layer's input by an orthogonal `Q`
          (`jaxq.rotation.random_hadamard`, drawn from `seed` and the layer's place):
          its weight becomes `W·Q` and a forward pre-hook multiplies its input by `Q` at
          run time, so the float function is unchanged (to float32 rounding) while the
          quantizers see channels whose outliers are spread over a block of `b` channels
          (QuaRot's online Hadamard, for any model's Linear layers). Costs `b`
          multiply-adds per input value. `restore()` undoes it; the exports refuse a model
          whose layers rotate their inputs (no format carries the rotation). Convolutions,
          layers tapped at a functional call and parametrized weights are not rotated.
          False (default): off.
    """

    w_bit: int = 8
    a_bit: int = 8
    w_signed: bool = True
    a_signed: bool = False
    w_sym: bool = True
    a_sym: bool = False
    input_shape: Any = None
    act_quant: bool = True
    act_method: int = 0
    quant_mode: int = 0
    disable_names: Any = None
    amp_num: int = 0
    keep_acc: Any = None
    sigma: float = 25
    device: str = "cpu"
    _: dataclasses.KW_ONLY
    quantize_first_last: bool | str = False
    minmax_combine: str = "batch_percentile"
    seed: int = 0
    hist_bins: int = 2048
    hist_samples: int = 1 << 18
    virtual_data: str = "uniform"
    virtual_steps: int = 200
    virtual_lr: float = 0.2
    amp_metric: str = "fisher"
    amp_samples: int = 16
    recon_rows: int = 2048
    recon_inputs: str = "float"
    recon_augment: int = 0
    recon_holdout: float = 0.0
    recon_hard_final: float = 0.0
    recon_lr: float = 0.05
    recon_reg: float = 1000.0
    recon_synthetic: int = 0
    bias_correction: bool | None = None
    memory_budget: int | None = None
    w_range: str | None = None
    layer_bits: Any = None
    layer_act_bits: Any = None
    smooth_quant: Any = None
    recon_blocks: Any = None
    w_group_size: int | None = None
    rotate_inputs: bool = False

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        for f in dataclasses.fields(self):  # NumPy scalars → Python values (JSON, hashing, equality)
            v = getattr(self, f.name)
            if hasattr(v, "item") and hasattr(v, "dtype") and getattr(v, "shape", None) == ():
                set_(f.name, v.item())
        for field in ("w_bit", "a_bit"):
            v = getattr(self, field)
            if not is_int(v) or v not in ALLOWED_BITS:
                raise ValueError(f"QuantConfig.{field}={v!r} is not supported; allowed bit widths: {ALLOWED_BITS}")
        for field in ("w_signed", "a_signed", "w_sym", "a_sym", "act_quant"):
            check_bool(field, getattr(self, field))
        if self.quantize_first_last != FIRST_LAST_8BIT:
            check_bool("quantize_first_last", self.quantize_first_last)
        if self.bias_correction is not None:
            check_bool("bias_correction", self.bias_correction)
        set_("act_method", _check_choice("act_method", self.act_method, tuple(ACT_METHODS)))
        set_("quant_mode", _check_choice("quant_mode", self.quant_mode, tuple(QUANT_MODES)))
        set_("input_shape", _normalise_input_shape(self.input_shape))
        set_("disable_names", _normalise_names(self.disable_names))
        if not is_int(self.amp_num) or self.amp_num < 0:
            raise ValueError(f"QuantConfig.amp_num={self.amp_num!r} must be an int ≥ 0")
        set_("keep_acc", KeepAcc.from_user(self.keep_acc))
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, numbers.Real) or not self.sigma >= 0:
            raise ValueError(f"QuantConfig.sigma={self.sigma!r} must be a number ≥ 0 (0 = plain min-max)")
        if not isinstance(self.device, str) or not _DEVICE_RE.fullmatch(self.device):
            raise ValueError(
                f"QuantConfig.device={self.device!r} is not allowed; use 'cpu', 'npu', 'cuda' (optionally ':N')"
            )
        if self.minmax_combine not in MINMAX_COMBINES:
            raise ValueError(
                f"QuantConfig.minmax_combine={self.minmax_combine!r} is not allowed; choose one of {MINMAX_COMBINES}"
            )
        self._check_extensions()
        set_("layer_bits", _normalise_layer_bits(self.layer_bits))
        set_("layer_act_bits", _normalise_layer_bits(self.layer_act_bits, "layer_act_bits"))
        set_("smooth_quant", _normalise_smooth_quant(self.smooth_quant))
        set_("recon_blocks", _normalise_names(self.recon_blocks, "recon_blocks"))
        if self.recon_blocks and self.keep_acc.blocks is None:
            raise ValueError(
                f"QuantConfig.recon_blocks={list(self.recon_blocks)!r} names blocks for "
                "keep_acc['brecq'] or keep_acc['qdrop'], which are off; switch one on or drop recon_blocks"
            )
        if self.recon_synthetic and not self.keep_acc.fits:
            raise ValueError(
                f"QuantConfig.recon_synthetic={self.recon_synthetic} distils images for the steps that fit "
                "layers or blocks (keep_acc easy_quant, adaround, gptq, brecq, qdrop, pd_quant), which are all off; "
                "switch one on or set recon_synthetic=0"
            )
        self._check_group_size()
        if self.smooth_quant and not self.act_quant:
            raise ValueError(
                f"QuantConfig.smooth_quant={self.smooth_quant!r} moves range out of quantized activations; "
                "it needs act_quant=True"
            )
        if self.keep_acc.pd_quant is not None and not self.act_quant:
            raise ValueError(
                "QuantConfig.keep_acc['pd_quant'] learns the step sizes of quantized inputs; it needs act_quant=True"
            )
        if not is_int(self.seed):
            raise TypeError(f"QuantConfig.seed={self.seed!r} must be an int")
        if not isinstance(self.rotate_inputs, bool):
            raise TypeError(f"QuantConfig.rotate_inputs={self.rotate_inputs!r} must be True or False")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"QuantConfig.seed={self.seed!r} must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
        for name, value in (("sigma", self.sigma), ("virtual_lr", self.virtual_lr)):
            if not math.isfinite(value):
                raise ValueError(f"QuantConfig.{name}={value!r} must be finite")
        if self.virtual_steps > MAX_ITERS:
            raise ValueError(
                f"QuantConfig.virtual_steps={self.virtual_steps} is more than {MAX_ITERS} "
                "(about one forward and backward pass each): hours of work; use ≤ 1000"
            )

    def _check_extensions(self) -> None:
        """The numeric jaxq extensions: bins, samples, virtual data, ranking, rows, budget."""
        if not is_int(self.hist_bins) or not 16 <= self.hist_bins <= 65536:
            raise ValueError(f"QuantConfig.hist_bins={self.hist_bins!r} must be an int in [16, 65536]")
        if not is_int(self.hist_samples) or self.hist_samples < 0:
            raise ValueError(f"QuantConfig.hist_samples={self.hist_samples!r} must be an int ≥ 0 (0 = every value)")
        _check_one_of("virtual_data", self.virtual_data, VIRTUAL_DATA)
        if not is_int(self.virtual_steps) or self.virtual_steps < 1:
            raise ValueError(f"QuantConfig.virtual_steps={self.virtual_steps!r} must be an int ≥ 1")
        if not _is_real(self.virtual_lr) or not self.virtual_lr > 0:
            raise ValueError(f"QuantConfig.virtual_lr={self.virtual_lr!r} must be a number > 0")
        _check_one_of("amp_metric", self.amp_metric, AMP_METRICS)
        if self.w_range is not None:
            _check_one_of("w_range", self.w_range, WEIGHT_RANGES)
        if not is_int(self.amp_samples) or self.amp_samples < 1:
            raise ValueError(f"QuantConfig.amp_samples={self.amp_samples!r} must be an int ≥ 1")
        if not is_int(self.recon_rows) or self.recon_rows < 16:
            raise ValueError(f"QuantConfig.recon_rows={self.recon_rows!r} must be an int ≥ 16")
        _check_one_of("recon_inputs", self.recon_inputs, RECON_INPUTS)
        if not is_int(self.recon_augment) or not 0 <= self.recon_augment <= MAX_AUGMENT:
            raise ValueError(
                f"QuantConfig.recon_augment={self.recon_augment!r} must be an int in [0, {MAX_AUGMENT}] "
                "(augmented copies of each calibration image)"
            )
        if not is_int(self.recon_synthetic) or not 0 <= self.recon_synthetic <= MAX_SYNTHETIC:
            raise ValueError(
                f"QuantConfig.recon_synthetic={self.recon_synthetic!r} must be an int in [0, {MAX_SYNTHETIC}] "
                "(BN-statistics images distilled for the fitting steps)"
            )
        _check_share(
            "recon_holdout", self.recon_holdout, "the share of calibration images block reconstruction holds out"
        )
        _check_share(
            "recon_hard_final",
            self.recon_hard_final,
            "the share of block reconstruction's steps with the rounding held hard",
        )
        if not _is_real(self.recon_lr) or not 0 < self.recon_lr <= 10:
            raise ValueError(
                f"QuantConfig.recon_lr={self.recon_lr!r} must be a number in (0, 10] "
                "(Adam's learning rate on block reconstruction's rounding variables)"
            )
        if not _is_real(self.recon_reg) or not 0 <= self.recon_reg <= 1e6:
            raise ValueError(
                f"QuantConfig.recon_reg={self.recon_reg!r} must be a number in [0, 1e6] (the rounding "
                "regulariser's weight in block reconstruction's normalised loss; 0: the unnormalised loss)"
            )
        if self.memory_budget is not None and (not is_int(self.memory_budget) or self.memory_budget < 16):
            raise ValueError(
                f"QuantConfig.memory_budget={self.memory_budget!r} must be an int ≥ 16 (MiB) or None (auto)"
            )

    def _check_group_size(self) -> None:
        g = self.w_group_size
        if g is None:
            return
        if not is_int(g) or g < 2:
            raise ValueError(
                f"QuantConfig.w_group_size={g!r} must be an int ≥ 2 (input columns per weight scale) "
                "or None (one scale per output channel)"
            )
        per_channel_only = [n for n in GROUPLESS_STEPS if getattr(self.keep_acc, n) is not None]
        if per_channel_only:
            raise ValueError(
                f"QuantConfig.w_group_size={g} works with round to nearest and keep_acc 'gptq', 'adaround', "
                "'brecq', 'qdrop' and 'pd_quant'; "
                f"keep_acc {per_channel_only} choose per-channel scales or codes only — switch them off "
                "or set w_group_size=None"
            )

    # Derived schemes -------------------------------------------------------------
    @property
    def weight_scheme(self) -> QScheme:
        """Per-output-channel weight quantizer (axis 0 of Conv/Linear weights)."""
        return QScheme(bits=self.w_bit, signed=self.w_signed, symmetric=self.w_sym, axis=0)

    def weight_bits_for(self, name: str) -> int:
        """`w_bit`, or the bits of the first `layer_bits` pattern matching `name`."""
        return _bits_for(name, self.layer_bits, self.w_bit)

    def weight_range_for(self, bits: int) -> str:
        """`w_range`, resolved for weights of `bits` bits (`jaxq.weight_range.resolved_range`)."""
        return resolved_range(self.w_range, bits)

    def weight_scheme_for(self, name: str) -> QScheme:
        """The weight quantizer of layer `name` (`weight_scheme` with its `layer_bits`)."""
        return dataclasses.replace(self.weight_scheme, bits=self.weight_bits_for(name))

    @property
    def act_scheme(self) -> QScheme:
        """Per-tensor activation quantizer."""
        return QScheme(bits=self.a_bit, signed=self.a_signed, symmetric=self.a_sym, axis=None)

    def act_bits_for(self, name: str) -> int:
        """`a_bit`, or the bits of the first `layer_act_bits` pattern matching `name`."""
        return _bits_for(name, self.layer_act_bits, self.a_bit)

    def act_scheme_for(self, name: str) -> QScheme:
        """The input quantizer of layer `name` (`act_scheme` with its `layer_act_bits`)."""
        return dataclasses.replace(self.act_scheme, bits=self.act_bits_for(name))

    def with_8bit_layers(self, names) -> "QuantConfig":
        """`names` at ≥ 8-bit weights and inputs, ahead of `layer_bits` / `layer_act_bits`
        (the `quantize_first_last="8bit"` convention, resolved by the bridge)."""
        names = list(names)
        w = tuple((n, max(self.weight_bits_for(n), 8)) for n in names)
        a = tuple((n, max(self.act_bits_for(n), 8)) for n in names)
        rest = lambda pairs: tuple(p for p in pairs if p[0] not in names)  # noqa: E731 (idempotent)
        return self.replace(layer_bits=w + rest(self.layer_bits), layer_act_bits=a + rest(self.layer_act_bits))

    def resolved(self, representative_data: bool) -> "QuantConfig":
        """The config with its automatic defaults decided: `bias_correction=None` becomes
        `representative_data` (real calibration data or BN-statistics virtual data)."""
        if self.bias_correction is None:
            return self.replace(bias_correction=bool(representative_data))
        return self

    def replace(self, **changes) -> "QuantConfig":
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    QuantConfig, data_fields=[], meta_fields=[f.name for f in dataclasses.fields(QuantConfig)]
)
