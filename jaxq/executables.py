"""Compiled programs kept on disk behind a key that needs no tracing.

JAX's persistent compilation cache (`bridge.jit_cache`) skips compiling in a later process,
but its key is a hash of the lowered program: every process still traces and lowers each
program before it can look it up. `cached_jit` keeps the compiled executable itself behind
a key computed from the call alone, so a later process loads it without tracing:

    key = (module, name and source file of the function, its static arguments, the pytree
           structure and each array argument's shape, dtype and weak type, jax / jaxlib
           versions, the platform, `XLA_FLAGS`, `jax_enable_x64`, a digest of every jaxq
           source file)

Only functions whose program depends on nothing but their arguments may use it (module-
level, no closures over values, no global state read at trace time); a change to any
jaxq module changes every key. Where a key cannot be formed without doubt — a traced
argument (the function called inside another transformation), an array on another device
or on several, a static argument whose `repr` carries an object address — the call is
plain `jax.jit`; with several processes every call is. With no directory (`set_directory`,
or JAX's cache directory when that is set) or with several devices (a serialized executable
names its devices) nothing is written and the executables are still kept for the process.
What is written is compiled afresh (`_jax_cache_off`); files are replaced atomically, so
processes may share the directory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import os
import pickle
import sys
import weakref
from pathlib import Path

import jax
import jaxlib
import numpy as np

SUBDIR = "jaxq-executables"
MAX_BYTES = 512 << 20  # oldest files removed beyond this
_directory: list[Path | None] = []  # [] = follow JAX's cache directory
_instances: weakref.WeakSet = weakref.WeakSet()


def set_directory(path: str | os.PathLike | None) -> None:
    """Keep executables in `path` (None: nowhere on disk)."""
    _directory[:] = [None if path is None else Path(path)]


def follow_jax_cache() -> None:
    """Keep executables beside JAX's persistent cache (the default)."""
    _directory.clear()


def clear() -> None:
    """Drop the executables this process holds (as `jax.clear_caches()` does for jit's);
    the files stay."""
    for program in list(_instances):
        program.loaded.clear()


def directory() -> Path | None:
    """Where executables are kept; None with several devices or processes (a serialized
    executable names its devices: kept for one device, it does not run on a mesh)."""
    if jax.process_count() != 1 or jax.device_count() != 1:
        return None
    if _directory:
        return _directory[0]
    jax_dir = jax.config.jax_compilation_cache_dir
    return Path(jax_dir) / SUBDIR if jax_dir else None


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """Every jaxq module's bytes: a changed program body gives new keys."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _file_digest(path: str | None) -> str:
    """The defining file of a function outside jaxq counts too."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""
    except OSError:
        return ""


def _environment() -> tuple:
    return (
        jax.__version__,
        jaxlib.__version__,
        jax.default_backend(),
        str(jax.devices()[0].device_kind),
        bool(jax.config.jax_enable_x64),
        os.environ.get("XLA_FLAGS", ""),
        sys.version_info[:2],
        _source_digest(),
    )


def _leaf_signature(leaf, device):
    """`(shape, dtype, weak)` of an argument the key can stand for; None where it cannot."""
    if isinstance(leaf, jax.core.Tracer):
        return None
    if isinstance(leaf, jax.Array):
        if leaf.sharding.device_set != {device}:
            return None
        return (leaf.shape, leaf.dtype.str, bool(leaf.weak_type))
    if isinstance(leaf, (np.ndarray, np.generic)):
        return (leaf.shape, leaf.dtype.str, False)
    if type(leaf) in (bool, int, float, complex):
        return ((), type(leaf).__name__, True)
    return None


class CachedJit:
    """`jax.jit(fn, static_argnames=...)` whose executables `jaxq.executables` keeps (module
    docstring). Calls take the same arguments as `fn`."""

    def __init__(self, fn, static_argnames: tuple[str, ...] = ()):
        self.fn = fn
        self.jitted = jax.jit(fn, static_argnames=static_argnames)
        self.static = frozenset(static_argnames)
        self.signature = inspect.signature(fn)
        positional = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY)
        kinds = [(k in self.static, p.kind) for k, p in self.signature.parameters.items()]
        if [s for s, _ in kinds] != sorted(s for s, _ in kinds) or any(kind not in positional for _, kind in kinds):
            raise TypeError(f"cached_jit({fn.__qualname__}): static parameters must follow the others, none variadic")
        self.loaded: dict = {}
        functools.update_wrapper(self, fn)
        _instances.add(self)

    def lower(self, *args, **kwargs):
        return self.jitted.lower(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        if not kwargs and len(args) == len(self.signature.parameters):  # the common call, without `bind`
            arguments = dict(zip(self.signature.parameters, args))
        else:
            bound = self.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = bound.arguments
        dynamic = tuple(v for k, v in arguments.items() if k not in self.static)
        statics = {k: v for k, v in arguments.items() if k in self.static}
        leaves, tree = jax.tree.flatten((dynamic, {}))
        device = jax.devices()[0]
        signature = tuple(_leaf_signature(leaf, device) for leaf in leaves)
        if any(s is None for s in signature) or jax.process_count() != 1:
            return self.jitted(*args, **kwargs)
        static_repr = repr(sorted(statics.items()))
        if " at 0x" in static_repr:
            return self.jitted(*args, **kwargs)
        key = (tree, static_repr, signature)
        compiled = self.loaded.get(key)
        if compiled is None:
            compiled = self._load_or_compile(key, dynamic, statics)
            self.loaded[key] = compiled
        return compiled(*dynamic)

    def _load_or_compile(self, key, dynamic, statics):
        tree, static_repr, signature = key
        where = directory()
        origin = (self.fn.__module__, self.fn.__qualname__, _file_digest(inspect.getsourcefile(self.fn)))
        name = hashlib.sha256(repr((origin, str(tree), static_repr, signature, _environment())).encode()).hexdigest()
        path = None if where is None else where / f"{name}.bin"
        if path is not None and path.is_file():
            compiled = _read(path, tree)
            if compiled is not None:
                return compiled
        # An executable JAX loaded from its own cache serializes broken: what is kept is compiled afresh.
        with _jax_cache_off() if path is not None else contextlib.nullcontext():
            compiled = self.jitted.lower(*dynamic, **statics).compile()
        if path is not None:
            _write(path, compiled)
        return compiled


@contextlib.contextmanager
def _jax_cache_off():
    """JAX's persistent cache off for one compilation. An executable JAX loaded from that
    cache serializes without its kernels (a later load fails: "Function wrapped_broadcast
    not found"), so what is kept here is always compiled afresh."""
    from jax.experimental.compilation_cache import compilation_cache

    configured = jax.config.jax_compilation_cache_dir
    if not configured:
        yield
        return
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", configured)
        compilation_cache.reset_cache()


def cached_jit(fn=None, *, static_argnames: tuple[str, ...] = ()):
    """Decorator: `CachedJit(fn, static_argnames)`."""
    if fn is None:
        return functools.partial(cached_jit, static_argnames=tuple(static_argnames))
    return CachedJit(fn, tuple(static_argnames))


def _read(path: Path, tree):
    from jax.experimental.serialize_executable import deserialize_and_load

    try:
        serialized, in_tree, out_tree = pickle.loads(path.read_bytes())
        if in_tree != tree:
            return None
        compiled = deserialize_and_load(serialized, in_tree, out_tree)
        os.utime(path)
        return compiled
    except Exception:  # a torn, stale or foreign file: compile again and replace it
        return None


def _write(path: Path, compiled) -> None:
    from jax.experimental.serialize_executable import serialize

    try:
        payload = pickle.dumps(serialize(compiled))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(payload)
        os.replace(tmp, path)
        _evict(path.parent)
    except (OSError, ValueError, TypeError, pickle.PicklingError):
        pass  # not kept: the next process compiles (or loads from JAX's cache) again


def _evict(where: Path) -> None:
    files = [(p.stat(), p) for p in where.glob("*.bin")]
    total = sum(st.st_size for st, _ in files)
    for st, p in sorted(files, key=lambda f: f[0].st_mtime):
        if total <= MAX_BYTES:
            break
        p.unlink(missing_ok=True)
        total -= st.st_size
