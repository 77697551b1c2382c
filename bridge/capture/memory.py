"""The memory budget of row-based accuracy keeping (`QuantConfig.memory_budget`).

EasyQuant and AdaRound fit each layer on `recon_rows` sampled input rows of `g·d` floats
(`jaxq.rows`). Rows of every layer at once can take gigabytes (a 5×5 depthwise conv over
1152 channels: 236 MB at 2048 rows), so layers are planned into groups whose rows fit the
budget, each group sampled in its own pass over the calibration data; a layer that alone
would not fit samples fewer rows.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import warnings

MIN_ROWS = 16
# float rows, their copy stacked for JAX and the sample taken from the per-batch parts
COPIES_FLOAT_INPUTS = 3
COPIES_QUANTIZED_INPUTS = 5  # plus the quantized model's rows and their copy


class MemoryBudgetError(MemoryError):
    """A layer's rows cannot fit the memory budget even at the fewest rows."""


class ReducedRowsWarning(UserWarning):
    """Some layers sample fewer rows than `recon_rows` to fit the memory budget."""


def budget_bytes(memory_budget_mib: int | None) -> int:
    """The budget in bytes: the configured MiB, or an eighth of physical memory (≤ 1 GiB)."""
    if memory_budget_mib is not None:
        return int(memory_budget_mib) << 20
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 8 << 30
    return min(1 << 30, physical // 8)


def block_program_bytes(memory_budget_mib: int | None) -> int:
    """What a block reconstruction step program's temporaries may take: the configured MiB,
    or half the automatic budget. Rows are the whole of what row sampling adds; a step
    program's temporaries come on top of the block's captured samples and the process's
    floor (libraries, model, data), so by default they get half (peaks in
    `benchmarks/README.md`)."""
    return budget_bytes(memory_budget_mib) if memory_budget_mib is not None else budget_bytes(None) // 2


def plan_row_groups(
    row_floats: dict[str, int], rows: int, copies: int, budget: int
) -> tuple[list[list[str]], dict[str, int]]:
    """`(groups of layer names, rows per layer)` so that each group's rows fit `budget`
    bytes (`row_floats`: floats per row of each layer, in order)."""
    per_layer, reduced = {}, []
    for name, floats in row_floats.items():
        fit = budget // (floats * 4 * copies)
        if fit < MIN_ROWS:
            need = -(-floats * 4 * copies * MIN_ROWS // (1 << 20))
            raise MemoryBudgetError(
                f"layer {name!r}: even {MIN_ROWS} input rows of {floats} floats need ~{need} MiB, more than "
                f"QuantConfig.memory_budget={budget >> 20} MiB; raise memory_budget, or keep the layer in float "
                "(disable_names) or switch easy_quant/adaround off"
            )
        per_layer[name] = min(rows, fit)
        if per_layer[name] < rows:
            reduced.append(f"{name} ({per_layer[name]} rows)")
    if reduced:
        warnings.warn(
            f"to fit the memory budget of {budget >> 20} MiB these layers sample fewer than the {rows} rows asked "
            f"(recon_rows): {', '.join(reduced[:8])}{'…' if len(reduced) > 8 else ''}",
            ReducedRowsWarning,
            stacklevel=3,
        )
    groups, used = [[]], 0
    for name, floats in row_floats.items():
        size = per_layer[name] * floats * 4 * copies
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups, per_layer


@functools.lru_cache(maxsize=None)
def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl)
        return None


def release_freed_memory() -> None:
    """Give memory that was freed back to the system (glibc's `malloc_trim`; a no-op
    elsewhere). torch's CPU tensors and numpy's arrays come from malloc, whose arenas keep
    freed blocks: after the forward passes of preparation and row sampling that is
    hundreds of MB of resident memory no one uses (measured in `benchmarks/README.md`)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def release_compiled_programs() -> None:
    """Drop the compiled programs JAX's in-memory caches keep for the process, then give
    the freed memory back. Steps that compile programs per block (block reconstruction,
    PD-Quant) call it so that an earlier step's programs (AdaRound's, when QDrop starts
    from its codes) and earlier blocks' do not pile up; equal blocks still share programs
    through the persistent compilation cache."""
    import jax

    jax.clear_caches()
    release_freed_memory()
