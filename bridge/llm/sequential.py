"""Layer-by-layer quantization of a decoder language model (GPTQ's sequential order, as
llm-compressor runs it): the calibration tokens pass the embedding once; then each decoder
layer in turn sees the previous layer's *quantized* outputs, its Linear layers'
statistics are gathered (`bridge.llm.stats`), `jaxq.llm.plan(cfg)` is applied (AWQ scales
folded, codes by GPTQ or round to nearest), the dequantized weights are written into the
model, and the layer's outputs become the next layer's inputs.

The model is changed in place into its fake-quant form: every quantized Linear holds
`Ŵ = (q − o)·s` (group-wise, `jaxq.groupwise`), AWQ's scales sit in the norms and
producing Linear layers, and activation quantizers (`bridge.llm.activations`) are hooks.
A failure restores the model's parameters and hooks to what they were.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bridge.llm import activations
from bridge.llm.rotation import rotate_decoder
from bridge.llm.decoder import can_fold_rows, decoder_parts, first_layer_inputs, input_groups, run_layer
from bridge.llm.stats import capture_inputs
from jaxq.awq import search_clip, search_scales
from jaxq.gptq import GptqParams, Problem, solve_problems
from jaxq.groupwise import columns, dequantize_codes, rtn
from jaxq.numerics import quantize
from jaxq.llm import LlmConfig, plan
from jaxq.qparams import QParams


@dataclasses.dataclass(frozen=True)
class LinearRecord:
    """One quantized Linear: codes `[o, d]`, scale and offset `[o, G]` (`Ŵ = (q − o)·s`),
    its group size, and its static input scale (None: float or dynamic inputs)."""

    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    group_size: int | None
    input_scale: float | None = None


@dataclasses.dataclass
class LlmQuantized:
    """The result of `quantize_decoder`: the model (quantized in place), the config, one
    record per quantized Linear (by full module name), the output error of each Linear
    before (round to nearest) and after its method, `{name: (rtn, final)}` in
    `tr(ΔW H ΔWᵀ)` units, AWQ's chosen scales by producer, and seconds per step."""

    model: nn.Module
    cfg: LlmConfig
    records: dict[str, LinearRecord]
    errors: dict[str, tuple[float, float]]
    awq_scales: dict[str, np.ndarray]
    seconds: dict[str, float]
    act_hooks: list = dataclasses.field(default_factory=list, repr=False)
    rotation_hooks: list = dataclasses.field(default_factory=list, repr=False)


def _batches(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"calib_tokens: token ids [samples, sequence] (int64) expected, got {tokens!r:.80}")
    if len(tokens) == 0:
        raise ValueError("calib_tokens is empty: give at least one sequence of token ids")
    return list(torch.split(tokens.long(), batch_size))


def _fold(layer: nn.Module, producer: str, linears: tuple[str, ...], s: np.ndarray) -> None:
    """Divide the producer's output channels by `s` and multiply the group's weight columns by it."""
    st = torch.from_numpy(s.astype(np.float32))
    prod = layer.get_submodule(producer)
    with torch.no_grad():
        if isinstance(prod, nn.Linear):
            prod.weight.div_(st[:, None])
            if prod.bias is not None:
                prod.bias.div_(st)
        else:
            prod.weight.div_(st)
        for n in linears:
            layer.get_submodule(n).weight.mul_(st[None, :])


def _awq(layer, groups, stats, cfg: LlmConfig, skip) -> dict[str, np.ndarray]:
    """Search every group's scales on the float weights, then fold them all (folds of
    different groups touch rows and columns of different matrices, so the order is free)."""
    chosen = {}
    for g in groups:
        if skip(g) or not can_fold_rows(layer, g):
            continue
        w = np.concatenate([layer.get_submodule(n).weight.detach().float().numpy() for n in g.linears])
        st = stats[g.producer]
        s, _ = search_scales(
            w, st.rows, st.mean_abs.astype(np.float32), cfg.weight_scheme, cfg.group_size, cfg.awq_grid
        )
        chosen[g.producer] = np.asarray(s, np.float64)
    for producer, s in chosen.items():
        g = next(g for g in groups if g.producer == producer)
        _fold(layer, producer, g.linears, s)
        stats[producer] = stats[producer].scaled(s)
    return chosen


NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")  # AWQ leaves them: errors pass through the softmax


def _clip(layer, groups, stats, cfg: LlmConfig, skipped) -> dict:
    """`{name: group QParams}` from AWQ's range search, for every Linear but q/k."""
    out = {}
    for g in groups:
        for n in g.linears:
            if n not in NO_CLIP and not skipped(n):
                w = layer.get_submodule(n).weight.detach().float().numpy()
                qp = search_clip(w, stats[g.producer].rows, cfg.weight_scheme, cfg.group_size, cfg.awq_grid)
                out[n] = jax.tree.map(np.asarray, qp)
    return out


def _codes(layer, names_h: dict, cfg: LlmConfig, use_gptq: bool, ranges: dict):
    """`{name: (codes, QParams, (rtn error, final error))}` of the named Linear layers;
    `ranges` gives searched group parameters (else min–max)."""
    scheme = cfg.weight_scheme
    out, problems = {}, {}
    for name, h in names_h.items():
        w = layer.get_submodule(name).weight.detach().float().numpy()
        if name in ranges:
            qp = ranges[name]
            codes = np.asarray(quantize(w, columns(qp, w.shape[1])))
        else:
            codes, qp = jax.tree.map(np.asarray, rtn(w, scheme, cfg.group_size))
        out[name] = (codes, qp)
        if use_gptq:
            d = w.shape[1]
            col = lambda v: np.repeat(v, d // v.shape[1], axis=1)  # noqa: E731
            problems[name] = Problem(w, h.astype(np.float32), col(qp.scale), col(qp.offset), codes)
    if not use_gptq:
        return {n: (c, qp, (np.nan, np.nan)) for n, (c, qp) in out.items()}
    g = cfg.gptq
    solved = solve_problems(problems, scheme.qmin, scheme.qmax, GptqParams(g.block_size, g.damp, g.act_order))
    return {n: (solved[n][0], out[n][1], solved[n][1:]) for n in out}


def _quantize_layer(layer, prefix: str, inputs, cfg: LlmConfig, seconds: dict):
    steps = plan(cfg)
    groups = input_groups(layer)
    skipped = lambda n: f"{prefix}.{n}" in cfg.ignore  # noqa: E731
    ignored = lambda g: any(skipped(n) for n in g.linears)  # noqa: E731
    t0 = time.perf_counter()
    stats = capture_inputs(layer, groups, lambda: run_layer(layer, inputs), cfg.awq_rows, cfg.seed)
    seconds["capture"] = seconds.get("capture", 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    scales = _awq(layer, groups, stats, cfg, ignored) if "awq" in steps else {}
    seconds["awq"] = seconds.get("awq", 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    ranges = _clip(layer, groups, stats, cfg, skipped) if "clip" in steps else {}
    names_h = {n: stats[g.producer].h for g in groups for n in g.linears if not skipped(n)}
    solved = _codes(layer, names_h, cfg, use_gptq="gptq" in steps, ranges=ranges)
    key = "gptq" if "gptq" in steps else "rtn"
    seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0
    records, errors, quantizers = {}, {}, {}
    for g in groups:
        input_scale = None
        if cfg.activations == "static":
            input_scale = float(max(stats[g.producer].max_abs.max(), 1e-8) / (2 ** (cfg.a_bit - 1) - 1))
        for n in (n for n in g.linears if not skipped(n)):
            codes, qp, err = solved[n]
            lin = layer.get_submodule(n)
            w_hat = np.asarray(dequantize_codes(codes, QParams(qp.scale, qp.offset, qp.scheme)))
            with torch.no_grad():
                lin.weight.copy_(torch.tensor(w_hat, dtype=lin.weight.dtype))
            records[f"{prefix}.{n}"] = LinearRecord(
                codes.astype(np.int8),
                np.asarray(qp.scale, np.float32),
                np.asarray(qp.offset, np.int32),
                cfg.group_size,
                input_scale,
            )
            errors[f"{prefix}.{n}"] = tuple(float(e) for e in err)
            if cfg.a_bit is not None:
                quantizers[n] = activations.ActQuant(cfg.a_bit, input_scale)
    return records, errors, {f"{prefix}.{k}": v for k, v in scales.items()}, quantizers


def quantize_decoder(
    model: nn.Module,
    calib_tokens: torch.Tensor,
    cfg: LlmConfig = LlmConfig(),
    batch_size: int = 16,
    progress: bool = True,
) -> LlmQuantized:
    """Quantize `model` (a `transformers` decoder in the Llama layout) in place, layer by
    layer, on the calibration token windows `calib_tokens [samples, sequence]` (module docstring)."""
    if not isinstance(cfg, LlmConfig):
        raise TypeError(f"cfg: a jaxq.llm.LlmConfig, got {type(cfg).__name__}")
    parts = decoder_parts(model)
    batches = _batches(calib_tokens, batch_size)
    known = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = [n for n in cfg.ignore if n not in known]
    if unknown:
        raise ValueError(f"LlmConfig.ignore names no Linear layer of the model: {unknown}")
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hooks_before = {id(m): dict(m._forward_pre_hooks) for m in model.modules()}
    result = LlmQuantized(model, cfg, {}, {}, {}, {})
    try:
        t0 = time.perf_counter()
        if "rotate" in plan(cfg):
            result.rotation_hooks = rotate_decoder(model, cfg.seed, online=cfg.online_hadamard)
            result.seconds["rotate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        inputs = first_layer_inputs(model, batches)
        result.seconds["embed"] = time.perf_counter() - t0
        for i, layer in enumerate(tqdm(parts.layers, desc=f"{cfg.describe()} layers", disable=not progress)):
            prefix = f"model.layers.{i}"
            records, errors, scales, quantizers = _quantize_layer(layer, prefix, inputs, cfg, result.seconds)
            result.records.update(records)
            result.errors.update(errors)
            result.awq_scales.update(scales)
            result.act_hooks += activations.install(layer, quantizers)
            t0 = time.perf_counter()
            inputs = run_layer(layer, inputs)
            result.seconds["propagate"] = result.seconds.get("propagate", 0.0) + time.perf_counter() - t0
    except BaseException:
        for h in result.act_hooks + result.rotation_hooks:
            h.remove()
        model.load_state_dict(snapshot)
        for m in model.modules():
            m._forward_pre_hooks.clear()
            m._forward_pre_hooks.update(hooks_before.get(id(m), {}))
        raise
    return result
