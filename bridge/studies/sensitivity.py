"""Layer sensitivity and float fallback (`amp_num`), computed on captured outputs in JAX.

- `layer_output_errors`: the float and the quantized model run on the same samples;
  every quantized layer's output is compared (`jaxq.sensitivity`: raw MSE — msModelSlim's
  ranking —, relative MSE, cosine). Errors accumulate through depth here.
- `isolated_sensitivity`: only one layer quantized at a time; the distance of the model
  output from float (KL for logits, 1 − cosine otherwise). One forward per layer.
- `fisher_sensitivity`: the second-order estimate of the isolated distance for every layer
  at once (`jaxq.sensitivity`): one forward and one or two backward passes per batch.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
import torch

import jaxq.sensitivity as js
from jaxq.padding import power_of_two
from bridge.capture.data import Batch, run_model
from bridge.inplace.fakequant import probing, quantization, set_quantization
from bridge.inplace.modules import layer_spec, weight_name
from bridge.capture.tensors import to_jax
from jaxq.model_metrics import sample_distances

METRICS = ("mse", "relative_mse", "cosine", "isolated", "fisher")


def amp_batches(batches, samples: int) -> list[Batch]:
    """The first `samples` samples: whole batches, and of the last one the rows still needed
    (`first_rows`) — batches of 8 give 10 samples as 8 + 2, not 16."""
    out, seen = [], 0
    for b in batches:
        b = first_rows(b, samples - seen)
        out.append(b)
        seen += batch_rows(b)
        if seen >= samples:
            break
    return out


def first_rows(batch: Batch, count: int) -> Batch:
    """`batch` cut to its first `count` rows when every input is a tensor with rows on its
    first axis (`batch_rows` of them); any other batch (a nested or non-tensor input, a
    tensor of another length) is kept whole, as the model may not take part of it."""
    rows = batch_rows(batch)
    inputs = list(batch.args) + list(batch.kwargs.values())
    batch_major = all(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == rows for t in inputs)
    if count >= rows or not batch_major:
        return batch
    return Batch(tuple(t[:count] for t in batch.args), {k: t[:count] for k, t in batch.kwargs.items()})


def _padded(t: torch.Tensor) -> tuple:
    flat = t.detach().float().reshape(-1).cpu()
    size = power_of_two(flat.numel(), least=1024)
    buf = torch.zeros(size, dtype=torch.float32)
    buf[: flat.numel()] = flat
    return to_jax(buf), np.float32(flat.numel())


def primary_output(out) -> torch.Tensor:
    """The tensor a model-level metric compares: the output itself, `last_hidden_state`, or the first element."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, (tuple, list)):
        return primary_output(out[0])
    if isinstance(out, dict):
        return primary_output(next(iter(out.values())))
    raise TypeError(f"cannot compare model outputs of type {type(out).__name__}")


def layer_output_errors(model, layers: dict, batches: list[Batch]) -> dict[str, dict[str, float]]:
    """Per layer `mse`, `relative_mse`, `cosine` between float-model and quantized-model
    outputs, call by call (the k-th call of a layer in the quantized forward against its
    k-th call in the float forward). Layers used only functionally (attention) have no
    module output to compare: NaN."""
    stats = {n: js.init_stats() for n in layers}
    fp: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    seen: dict[str, int] = {}

    def keep(name):
        return lambda m, a, out: fp[name].append(out.detach().clone())

    def compare(name):
        def hook(m, a, out):
            k = seen.get(name, 0)
            seen[name] = k + 1
            if k < len(fp[name]):
                f, n = _padded(fp[name][k])
                q, _ = _padded(out)
                stats[name] = js.update_stats(stats[name], f, q, n)

        return hook

    modular = {n: w for n, w in layers.items() if not w.functional}
    with quantization(layers, False), torch.no_grad():
        for i, batch in enumerate(batches):
            for mode, make in ((False, keep), (True, compare)):
                set_quantization(layers, mode)
                handles = [w.module.register_forward_hook(make(n)) for n, w in modular.items()]
                try:
                    run_model(model, batch, i)
                finally:
                    for h in handles:
                        h.remove()
            for v in fp.values():
                v.clear()
            seen.clear()
    names = list(layers)
    stacked = js.ErrorStats(
        *(np.stack([np.asarray(getattr(stats[n], f)) for n in names]) for f in js.ErrorStats._fields)
    )
    metrics = {k: np.asarray(v) for k, v in js.finalize_metrics(stacked).items()}
    return {
        n: {k: float(metrics[k][i]) if n in modular else float("nan") for k in metrics} for i, n in enumerate(names)
    }


def sample_output_distances(fp: torch.Tensor, q: torch.Tensor) -> np.ndarray:
    """Per sample (leading axis): KL for logits (2-D), `1 − cosine` of the sample otherwise
    (`jaxq.model_metrics.sample_distances`, as the JAX studies)."""
    return np.asarray(sample_distances(to_jax(fp.float()), to_jax(q.float())), np.float64)


def output_distance(fp: torch.Tensor, q: torch.Tensor) -> float:
    """The mean of `sample_output_distances`."""
    return float(np.mean(sample_output_distances(fp, q)))


def model_distance(model, layers, batches, fp_outputs, enabled: Callable[[str], bool]) -> float:
    """Output distance from float with the `enabled` layers quantized, averaged over every
    sample of `batches` (each sample weighs the same whatever the size of its batch)."""
    total, count = 0.0, 0
    with quantization(layers, enabled), torch.no_grad():
        for i, (b, f) in enumerate(zip(batches, fp_outputs)):
            d = sample_output_distances(f, primary_output(run_model(model, b, i)))
            total, count = total + float(d.sum()), count + d.size
    return total / max(count, 1)


def float_outputs(model, layers, batches) -> list[torch.Tensor]:
    with quantization(layers, False), torch.no_grad():
        return [primary_output(run_model(model, b, i)).detach().clone() for i, b in enumerate(batches)]


def isolated_sensitivity(model, layers: dict, batches: list[Batch]) -> dict[str, float]:
    """Per layer: model-output distance from float with only that layer quantized."""
    fp = float_outputs(model, layers, batches)
    return {name: model_distance(model, layers, batches, fp, lambda n, name=name: n == name) for name in layers}


def fisher_sensitivity(model, layers: dict, batches: list[Batch], draws: int | None = None, seed: int = 0):
    """Per layer: the second-order estimate of `isolated_sensitivity`, all layers at once.

    Under `probing`, layer i's quantization error enters scaled by `εᵢⱼ` for batch row j
    (the float model at `ε = 0`), so `tᵢⱼ = ∂⟨c, z⟩/∂εᵢⱼ = c·Δzᵢⱼ`, the first-order output
    change of quantizing layer i alone in row j. With `c` drawn per row as
    `jaxq.sensitivity.kl_cotangent` (2-D logits) or `cosine_cotangent`, `½·E[tᵢⱼ²]`
    estimates row j's isolated distance (rows are independent). Mean of `draws` cotangents
    (default `jaxq.sensitivity.cotangent_draws`), averaged over every sample of `batches`
    (as `model_distance`)."""
    names = list(layers)
    if not names:
        return {}
    device = next(iter(layers.values())).weight_scale.device
    key = jax.random.key(seed)
    total, rows = np.zeros(len(names)), 0
    for i, batch in enumerate(batches):
        eps = torch.zeros(len(names), batch_rows(batch), device=device, requires_grad=True)
        with probing(layers, eps), torch.enable_grad():
            z = primary_output(run_model(model, batch, i))
            if not z.requires_grad:
                raise RuntimeError(
                    f"amp_metric='fisher' needs gradients from the model's output (batch {i}) back to its "
                    "quantized layers, and this model's forward computes its output without them "
                    "(torch.no_grad or detach inside forward?); use amp_metric='isolated'"
                )
            key, sub = jax.random.split(key)
            f = to_jax(z.detach().float().cpu().contiguous())
            logits = z.dim() == 2
            count = draws or js.cotangent_draws(logits)
            cotangents = np.array(js.output_cotangents(sub, f, count, logits))
            rows += z.shape[0]
            for k, c in enumerate(cotangents):
                c = torch.from_numpy(c).to(device=z.device, dtype=z.dtype)
                (t,) = torch.autograd.grad(z, eps, c, retain_graph=k + 1 < count, allow_unused=True)
                if t is not None:
                    t = t.detach().double().cpu().numpy()
                    total += 0.5 * np.square(t).sum(axis=1) / count
    return {n: float(total[j] / max(rows, 1)) for j, n in enumerate(names)}


def batch_rows(batch: Batch) -> int:
    """The batch size: the first axis of the first tensor input (1 if there is none)."""
    first = next((t for t in list(batch.args) + list(batch.kwargs.values()) if isinstance(t, torch.Tensor)), None)
    return 1 if first is None or first.dim() == 0 else int(first.shape[0])


@dataclasses.dataclass
class SensitivityTable:
    """Rows of per-layer sensitivity: name, kind, weight shape, metrics, quantized or not."""

    rows: list[dict]

    def ranked(self, metric: str) -> list[str]:
        """Layer names, most sensitive first (`cosine`: lowest first)."""
        sign = 1.0 if metric == "cosine" else -1.0
        rows = [r for r in self.rows if r["quantized"]]
        return [r["name"] for r in sorted(rows, key=lambda r: sign * r[metric])]

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def __str__(self) -> str:
        if not self.rows:
            return "(no layers)"
        cols = list(self.rows[0])
        cells = [[_fmt(r[c]) for c in cols] for r in self.rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
        return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@dataclasses.dataclass
class FallbackCurve:
    """Metric after falling back the first k layers of `order` (k = 0 … len(points) − 1)."""

    metric: str
    order: list[str]
    points: list[float]
    chosen: int  # layers fallen back to reach the target (−1: not reached)

    def __str__(self) -> str:
        lines = [f"{'k':>3}  {'fallen back':<45} {self.metric}"]
        for k, value in enumerate(self.points):
            name = "-" if k == 0 else self.order[k - 1]
            mark = "  ← target reached" if k == self.chosen else ""
            lines.append(f"{k:>3}  {name:<45} {value:.5g}{mark}")
        return "\n".join(lines)


def check_metrics(metrics) -> tuple[str, ...]:
    """`metrics` as a tuple of known names; a bare string or an unknown name is an error."""
    if isinstance(metrics, str):
        raise TypeError(f"metrics must be a sequence of names such as ({metrics!r},), not the string {metrics!r}")
    metrics = tuple(metrics)
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown or not metrics:
        raise ValueError(f"sensitivity metrics {unknown or '()'} not known; choose from {METRICS}")
    return metrics


def check_count(name: str, value, allow_none: bool = True, minimum: int = 1):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer ≥ {minimum}")
    return int(value)


def sensitivity_table(
    model,
    layers: dict,
    specs: dict,
    all_layers: dict,
    batches: list[Batch],
    metrics,
    isolated_by: Callable | None = None,
) -> SensitivityTable:
    """The table of `Calibrator.sensitivity` (quantized layers, then the float ones as NaN rows).
    `isolated_by(batches)`: computes the isolated column instead of the torch loop (the JAX model)."""
    errors = layer_output_errors(model, layers, batches) if set(metrics) - {"isolated", "fisher"} else {}
    fisher = fisher_sensitivity(model, layers, batches) if "fisher" in metrics else {}
    if "isolated" not in metrics:
        isolated = {}
    elif isolated_by is not None:
        isolated = isolated_by(batches)
    else:
        isolated = isolated_sensitivity(model, layers, batches)
    rows = []
    for name, w in layers.items():
        row = {"name": name, "kind": specs[name].kind, "weight_shape": tuple(w.float_weight.shape)}
        for m in metrics:
            row[m] = isolated[name] if m == "isolated" else fisher[name] if m == "fisher" else errors[name][m]
        rows.append({**row, "quantized": True})
    for name, module in all_layers.items():
        if name not in layers:
            shape = tuple(getattr(module, weight_name(module)).shape)
            rows.append(
                {
                    "name": name,
                    "kind": (specs[name] if name in specs else layer_spec(name, module)).kind,
                    "weight_shape": shape,
                    **{m: float("nan") for m in metrics},
                    "quantized": False,
                }
            )
    return SensitivityTable(rows)


def fallback_curve(model, layers: dict, batches: list[Batch], order: list[str], target: float) -> FallbackCurve:
    """Distance from float after falling back the first k layers of `order`, k = 0 … len(order)."""
    fp = float_outputs(model, layers, batches)
    points, chosen = [], -1
    for k in range(len(order) + 1):
        off = set(order[:k])
        points.append(model_distance(model, layers, batches, fp, lambda n, off=off: n not in off))
        if chosen < 0 and points[-1] <= target:
            chosen = k
    return FallbackCurve("kl" if fp[0].dim() == 2 else "1 - cosine", order, points, chosen)
