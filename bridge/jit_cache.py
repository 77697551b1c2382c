"""JAX's persistent compilation cache, on by default for jaxq users.

A user calibrates each model once, in a fresh process, so the programs jaxq compiles are
what the first run pays for. With the cache on, a later process (another model with
layers of the same shapes, the same model again) loads them instead.

- Where: `$JAXQ_COMPILATION_CACHE` if it names a directory, else
  `$XDG_CACHE_HOME/jaxq/jax` (`~/.cache/jaxq/jax`).
- Off: `JAXQ_COMPILATION_CACHE=off` (or `0`, `false`, `no`), or `bridge.jit_cache.disable()`.
- A cache the user configured for JAX (`jax_compilation_cache_dir`, `JAX_COMPILATION_CACHE_DIR`)
  is left alone.
- Several processes may share it: the cache runs with a size limit (`MAX_BYTES`), which
  makes JAX guard reads and writes with a file lock and evict least recently used entries.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax

ENV = "JAXQ_COMPILATION_CACHE"
MAX_BYTES = 2 << 30
_OFF = ("0", "off", "false", "no")


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxq" / "jax"


def enable(path: str | os.PathLike | None = None) -> Path | None:
    """Turn the persistent cache on at `path` (default: see module docstring); returns the
    directory in use, or None when it is off or cannot be created (a warning says why)."""
    setting = os.environ.get(ENV, "")
    if path is None and setting.lower() in _OFF:
        return None
    configured = jax.config.jax_compilation_cache_dir
    if path is None and configured:
        return Path(configured)
    target = Path(path or setting or default_dir()).expanduser()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warnings.warn(
            f"jaxq: compilation cache directory {str(target)!r} cannot be created ({e}); "
            f"compiling without it (set {ENV} to another directory, or {ENV}=off)",
            stacklevel=2,
        )
        return None
    if not os.access(target, os.W_OK | os.X_OK):
        warnings.warn(
            f"jaxq: compilation cache directory {str(target)!r} is not writable; compiling without it "
            f"(set {ENV} to another directory, or {ENV}=off)",
            stacklevel=2,
        )
        return None
    jax.config.update("jax_compilation_cache_dir", str(target))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # jaxq's programs compile in < 1 s each
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return target


def disable() -> None:
    """Compile without the persistent cache from now on (this process)."""
    jax.config.update("jax_compilation_cache_dir", None)
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()


def current() -> Path | None:
    configured = jax.config.jax_compilation_cache_dir
    return Path(configured) if configured else None
