"""Block reconstruction of a calibrated model (BRECQ / QDrop; the math: `jaxq.block_reconstruction`).

Block by block, in call order:

1. the block's inputs in the quantized model (earlier blocks already reconstructed) and
   its outputs in the float model are captured by torch hooks over the calibration data;
2. the block alone is lowered to JAX with its quantizers (`quantized_forward` on the
   submodule), weights replaced by their soft-rounded `W̃(V)`, input step sizes learnable;
3. `jaxq.block_reconstruction.optimise` learns them in one compiled program, on the
   fitted part of a held-out split of the calibration images (`holdout_split`), keeping the
   state of lowest held-out error;
4. the hard codes and step sizes go into the layer records and the torch model, so the
   next block sees this block's quantized output — unless the held-out error (the fitted
   error without a split) is not below round to nearest's: then the block keeps its records.

Blocks: the items of the outermost `nn.ModuleList`/`nn.Sequential` whose items each hold
quantized layers (EfficientNet's MBConv blocks, a BERT encoder's layers); else, of the
outermost one where two or more items of one class hold quantized layers, those items
(residual units with pooling between them; a stem conv or a Linear head of another class
beside them is searched on its own); every quantized layer outside them is a block of its
own. `blocks=[names]` overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from bridge.capture.data import iter_batches, run_model
from bridge.capture.memory import release_compiled_programs, release_freed_memory
from bridge.jax_model.fitting import capture_block, compile_within, equal_shapes
from bridge.jax_model.quantized import quantized_forward
from bridge.jax_model.studies import primary
from bridge.inplace.record import LayerRecord, apply_records, is_nearest
from jaxq import block_reconstruction as br
from jaxq.model_quant import Switches
from jaxq.sharding import replicate, shard_batch


@dataclasses.dataclass
class BlockReport:
    """Block-output errors with hard rounding (`jaxq.block_reconstruction.ReconErrors`)."""

    name: str
    layers: list[str]
    error_before: float  # on the fitted samples (first 32), round to nearest
    error_after: float  # on the fitted samples, the kept learned state
    seconds: float
    compiles: int
    held_before: float = float("nan")  # on the held-out images, round to nearest (NaN: no split)
    held_after: float = float("nan")  # on the held-out images, the kept learned state
    kept_step: int = 0  # the step whose state was kept (0: the start)
    hard_share: float = 1.0  # share of rounding variables already 0 or 1 in the kept state
    kept: bool = False  # the learned codes replaced round to nearest
    micro_batch: int = 0  # samples per gradient pass (0: the whole mini-batch)
    working_mib: float = float("nan")  # the step program's temporaries (XLA's memory analysis)

    @property
    def held_out(self) -> bool:
        """Images were held out (the held-out errors are numbers, not NaN)."""
        return not math.isnan(self.held_before)

    @property
    def gap(self) -> float:
        """Held-out over fitted error of the kept state: how much the block overfits."""
        return self.held_after / self.error_after if self.error_after > 0 else float("nan")


class BlockNameError(ValueError):
    """A block named in `QuantConfig.recon_blocks` is not a usable block of the model."""


class LayerWiseBlocks(UserWarning):
    """`find_blocks` found no unit of several quantized layers: each layer is its own block."""


def choose_blocks(model: nn.Module, layer_names, named=None) -> list[str]:
    """The user's blocks (`named_blocks`) when named, else `find_blocks`'s, with a
    `LayerWiseBlocks` warning when none of those holds more than one quantized layer."""
    names = list(layer_names)
    if named:
        return named_blocks(model, names, named)
    blocks = find_blocks(model, names)
    if len(names) > 1 and all(len(_holds(names, b)) <= 1 for b in blocks):
        warnings.warn(
            f"block reconstruction found no unit of several quantized layers in {type(model).__name__} "
            "(the items of a ModuleList/Sequential that each hold quantized layers, or two or more of one "
            "class): each of its quantized layers is a block of its own. Name the units with "
            "QuantConfig(recon_blocks=[...]) to reconstruct them whole",
            LayerWiseBlocks,
            stacklevel=3,
        )
    return blocks


def named_blocks(model: nn.Module, layer_names, named) -> list[str]:
    """The user's blocks (`QuantConfig.recon_blocks`), checked, and every quantized layer
    outside them alone, in module order."""
    names = list(layer_names)
    modules = dict(model.named_modules())
    for i, b in enumerate(named):
        if b not in modules:
            near = difflib.get_close_matches(b, list(modules), n=3)
            raise BlockNameError(
                f"QuantConfig.recon_blocks[{i}]={b!r} is not a module of the model"
                + (f"; nearest names: {near}" if near else "")
            )
        if not _holds(names, b):
            raise BlockNameError(
                f"QuantConfig.recon_blocks[{i}]={b!r} holds no quantized layer; name a module that "
                "contains quantized Linear/Conv layers"
            )
        for other in named[:i]:
            if b == other or b.startswith(other + ".") or other.startswith(b + "."):
                raise BlockNameError(f"QuantConfig.recon_blocks: {b!r} and {other!r} overlap; name disjoint modules")
    covered = {n for b in named for n in _holds(names, b)}
    return list(named) + [n for n in names if n not in covered]


def _holds(names: list[str], prefix: str) -> list[str]:
    return [n for n in names if n == prefix or n.startswith(prefix + ".")]


def find_blocks(model: nn.Module, layer_names) -> list[str]:
    """Block names (see the module docstring), in module order."""
    names = list(layer_names)

    def holds(prefix: str) -> list[str]:
        return _holds(names, prefix)

    blocks: list[str] = []
    covered: set[str] = set()

    def visit(prefix: str, module: nn.Module) -> None:
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 1:
            items = [(f"{prefix}.{k}" if prefix else k, child) for k, child in module.named_children()]
            units = [(i, child) for i, child in items if holds(i)]
            repeated = {i for i, _ in units} if len(units) == len(items) else _repeated_units(units)
            if repeated:
                for i, child in units:
                    if i in repeated:
                        blocks.append(i)
                        covered.update(holds(i))
                    else:
                        visit(i, child)
                return
        for key, child in module.named_children():
            visit(f"{prefix}.{key}" if prefix else key, child)

    visit("", model)
    blocks += [n for n in names if n not in covered]
    return blocks


def _repeated_units(units: list[tuple[str, nn.Module]]) -> set[str]:
    """The items among `units` (items that hold quantized layers) whose class at least one
    other item shares: residual units with pooling (or other layers without weights to
    quantize) between them, and a stem or head of another class beside them. Not
    containers: `Sequential(features, Flatten(), classifier)` is not two units."""
    counts: dict[type, int] = {}
    for _, child in units:
        counts[type(child)] = counts.get(type(child), 0) + 1
    return {
        i for i, child in units if counts[type(child)] >= 2 and not isinstance(child, (nn.Sequential, nn.ModuleList))
    }


def _called(model: nn.Module, blocks: list[str], batch) -> tuple[list[str], list[str]]:
    """`(blocks in the order the model first calls them on batch, blocks it never calls)`."""
    seen: list[str] = []
    handles = [
        model.get_submodule(b).register_forward_pre_hook(lambda *_, b=b: seen.append(b) if b not in seen else None)
        for b in blocks
    ]
    try:
        with torch.no_grad():
            run_model(model, batch, 0)
    finally:
        for h in handles:
            h.remove()
    return seen, [b for b in blocks if b not in seen]


def _block_apply(qf, layers, static, keep: float):
    """`apply(consts, learned, (args, kwargs), key)`; `consts = (params, buffers, state, soft)`
    are arguments rather than constants of the program, so blocks of equal shapes (and a
    second run) lower to the same program, which JAX's compilation cache then reuses."""
    n_args, tensor_positions, static_args, static_kwargs = static
    base_in = qf.default_switches().input
    off = jnp.zeros_like(base_in)

    def apply(consts, learned, inputs, key):
        params, buffers, state, soft = consts
        t_args, t_kwargs = inputs
        it = iter(t_args)
        args = tuple(next(it) if i in tensor_positions else static_args[i] for i in range(n_args))
        params = dict(params)
        for layer in layers:
            params[layer.weight_key] = br.soft_weight(soft[layer.weight_key], learned.v[layer.weight_key])
        state = {
            n: s._replace(a_scale=s.a_scale * jnp.exp(learned.u[n]), bias_delta=jnp.zeros_like(s.bias_delta))
            for n, s in state.items()
        }
        drop = None if key is None else (key, keep)
        out = qf.fn(params, buffers, state, Switches(off, base_in), args, {**static_kwargs, **t_kwargs}, drop=drop)
        return primary(out)

    return apply


def reconstruct_block(
    model: nn.Module,
    block: str,
    quantizers: dict,
    records: dict[str, LayerRecord],
    batches,
    params: br.ReconParams,
    set_quant,
    seed: int = 0,
    mesh=None,
    token_mask=None,
    copies: int = 0,
    synthetic: int = 0,
    budget: int | None = None,
) -> tuple[dict[str, LayerRecord], BlockReport]:
    """New records of the layers in `block` (names relative to the model); `set_quant(on)`
    switches the torch model's quantization (inputs are captured quantized, targets float).
    `mesh`: the captured samples split over its devices, the learned values replicated.
    `token_mask` (`[samples, tokens]`): the output positions that count (padding excluded).
    `copies`, `synthetic`: the captured samples are the calibration images, then `copies`
    augmented copies of them in the same order, then `synthetic` distilled images.
    `budget` (bytes): the most the step program's temporaries may take; above it the
    mini-batch's gradient is taken in parts (`ReconParams.micro_batch`, halved until it fits)."""
    import jaxq

    t0 = time.perf_counter()
    prefix = "" if block in quantizers else block + "."
    names = [block] if block in quantizers else [n for n in quantizers if n.startswith(prefix)]
    rel = {n: (n[len(prefix) :] if prefix else "") for n in names}
    set_quant(True)
    quantized_in = capture_block(model, block, batches, output=False)
    set_quant(False)
    target = capture_block(model, block, batches, inputs=False).output
    set_quant(True)
    inputs, static, example = quantized_in.inputs, quantized_in.static, quantized_in.example
    del quantized_in
    module = model.get_submodule(block)
    qf = quantized_forward(module, {rel[n]: records[n] for n in names}, example, {rel[n]: quantizers[n] for n in names})
    soft, v0 = {}, {}
    full = {r: n for n, r in rel.items()}
    for layer in qf.layers:
        s = qf.state[layer.name]
        start = records[full[layer.name]].codes if params.from_codes else None
        soft[layer.weight_key], v0[layer.weight_key] = br.soft_weight_init(
            qf.float_weights[layer.weight_key], s.w_scale, s.w_offset, s.w_qmin, s.w_qmax, start
        )
    learned = br.Learned(v0, {layer.name: jnp.float32(0.0) for layer in qf.layers})
    apply = _block_apply(qf, qf.layers, static, params.keep)
    consts = (dict(qf.lowered.params), qf.lowered.buffers, qf.state, soft)
    del example
    release_freed_memory()
    mask = None
    if token_mask is not None and target.ndim == 3 and tuple(target.shape[:2]) == tuple(token_mask.shape):
        mask = jnp.asarray(token_mask.numpy())
    if mesh is not None:
        inputs, target, mask = shard_batch((inputs, target, mask), mesh, where=f"block {block!r}'s captured samples")
        learned, consts = replicate((learned, consts), mesh)
    n = int(target.shape[0])
    images = (n - synthetic) // (1 + copies)
    key_fit = jax.random.PRNGKey(seed)  # as without a split, so recon_holdout=0 repeats earlier runs
    key_split = jax.random.fold_in(key_fit, 1)
    with jaxq.compile_count() as compiles:
        split = br.holdout_split(key_split, n, images, params.holdout, synthetic) if params.holdout > 0 else None
        args = (consts, learned, inputs, target, key_fit, mask, split)
        run, params, working = _program_within(apply, args, params, budget)
        learned, errors = run(*args)
        learned = jax.block_until_ready(learned)
    e = {k: float(v) for k, v in errors._asdict().items()}
    report = BlockReport(
        block,
        names,
        e["fitted_before"],
        e["fitted_after"],
        time.perf_counter() - t0,
        compiles.count,
        e["held_before"],
        e["held_after"],
        int(e["kept_step"]),
        e["hard_share"],
        micro_batch=params.micro_batch,
        working_mib=working / 2**20 if working is not None else float("nan"),
    )
    report.kept = (
        report.held_after < report.held_before if report.held_out else report.error_after < report.error_before
    )
    if not report.kept:  # never worse than round to nearest on the block's output
        return {}, report
    new = _learned_records(qf, soft, learned, names, rel, quantizers, records)
    apply_records({n: quantizers[n] for n in new}, new)
    return new, report


def _program_within(apply, args, params: br.ReconParams, budget: int | None):
    """`(compiled step program, params, its temporaries in bytes)`: micro-batches halved
    from the whole mini-batch until the temporaries fit `budget` (`fitting.compile_within`).
    The temporaries are mostly the activations one gradient pass keeps for its backward pass
    (16 samples of an EfficientNet block at 112 px: ~1.4 GB)."""

    def with_micro(micro: int) -> br.ReconParams:
        return params._replace(micro_batch=0 if micro >= params.batch else micro)

    def compile_for(micro: int):
        p = with_micro(micro)
        fn = lambda c, lv, x, y, k, m, s: br.optimise(functools.partial(apply, c), lv, x, y, k, p, m, s)  # noqa: E731
        return jax.jit(fn).lower(*args).compile()

    compiled, micro, working = compile_within(compile_for, params.micro_batch or params.batch, budget)
    return compiled, with_micro(micro), working


def _learned_records(qf, soft, learned, names, rel, quantizers, records) -> dict[str, LayerRecord]:
    """The block's records with the learned codes and input step sizes (δ dropped: bias
    correction runs again after the blocks)."""
    new = {}
    for layer in qf.layers:
        full = names[list(rel.values()).index(layer.name)]
        q = quantizers[full]
        rec = records[full]
        codes = np.asarray(br.hard_codes(soft[layer.weight_key], learned.v[layer.weight_key]))
        custom = not is_nearest(
            np.asarray(q.float_weight.detach().float().cpu()),
            rec.weight_scale,
            rec.weight_offset,
            q.weight_scheme,
            codes,
        )
        scale = rec.input_scale
        if scale is not None and layer.quantize_input:
            scale = np.asarray(np.asarray(scale, np.float32) * np.exp(np.float32(learned.u[layer.name])), np.float32)
        new[full] = dataclasses.replace(
            rec, codes=codes.astype(np.int32), custom_codes=custom, input_scale=scale, bias_correction=None
        )
    return new


def reconstruct_blocks(
    model: nn.Module,
    quantizers: dict,
    records: dict[str, LayerRecord],
    calib_data,
    device,
    params: br.ReconParams,
    set_quant,
    blocks: list[str] | None = None,
    bar=None,
    mesh=None,
    copies: int = 0,
    synthetic: int = 0,
    budget: int | None = None,
) -> tuple[dict[str, LayerRecord], list[BlockReport]]:
    """Every block reconstructed in call order; returns all records and a report per block.
    `copies`, `synthetic`: `calib_data` is the calibration images, then that many augmented
    copies of them (`bridge.capture.augment.augmented_batches`), then `synthetic` distilled
    images. `budget`: bytes the step program's temporaries may take (`reconstruct_block`)."""
    batches, token_mask = equal_shapes(list(iter_batches(calib_data, device)))
    blocks = blocks or find_blocks(model, quantizers)
    blocks, missing = _called(model, blocks, batches[0][1])
    if missing:
        raise BlockNameError(
            f"blocks {missing[:3]} are never called by the model's forward (a ModuleList itself is "
            "not called; name its items), so there is no input to reconstruct them from"
        )
    records, reports = dict(records), []
    for block in blocks:
        new, report = reconstruct_block(
            model,
            block,
            quantizers,
            records,
            batches,
            params,
            set_quant,
            mesh=mesh,
            token_mask=token_mask,
            copies=copies,
            synthetic=synthetic,
            budget=budget,
        )
        records.update(new)
        reports.append(report)
        release_compiled_programs()  # else the resident floor grows with every block (benchmarks/README.md)
        if bar is not None:
            bar.update(1)
            before, after = (
                (report.held_before, report.held_after)
                if report.held_out
                else (report.error_before, report.error_after)
            )
            bar.set_postfix_str(f"{block}: {before:.3g} → {after:.3g}")
    return records, reports
