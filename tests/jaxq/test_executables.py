"""Executables kept behind a key that needs no tracing (`jaxq.executables`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq import executables
from jaxq.executables import CachedJit, cached_jit

TRACES = []


def scaled_sum(x, y, k: int = 2):
    TRACES.append(x.shape)  # runs only while tracing
    return {"scaled": x * k + y, "total": (x.sum(),)}


@pytest.fixture
def on_disk(tmp_path):
    executables.set_directory(tmp_path)
    TRACES.clear()
    yield tmp_path
    executables.follow_jax_cache()


def fresh():
    """What a new process has: the function, nothing traced or compiled in memory."""
    jax.clear_caches()
    return CachedJit(scaled_sum, ("k",))


def test_a_new_process_loads_the_executable_without_tracing(on_disk):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    first = fresh()(x, 1.0, k=3)
    assert len(TRACES) == 1 and len(list(on_disk.glob("*.bin"))) == 1
    again = fresh()(x, 1.0, k=3)
    assert len(TRACES) == 1  # loaded, not traced
    np.testing.assert_array_equal(again["scaled"], x * 3 + 1)
    np.testing.assert_array_equal(again["total"][0], first["total"][0])


def test_shapes_dtypes_and_static_arguments_each_get_their_own_program(on_disk):
    f = fresh()
    x = np.ones((4, 3), np.float32)
    f(x, 1.0, k=3)
    f(x, 1.0, k=4)
    f(np.ones((5, 3), np.float32), 1.0, k=3)
    f(x.astype(np.float16), 1.0, k=3)
    f(x, np.float32(1.0), k=3)  # a float32 scalar, not a weakly typed Python float
    f(x, jnp.asarray(1.0), k=3)  # a weakly typed jax scalar
    f(x, jnp.float32(1.0), k=3)  # a strong one: the NumPy float32 scalar's program
    assert len(list(on_disk.glob("*.bin"))) == 6  # (jit itself may reuse a trace of equal avals)
    traced = len(TRACES)
    np.testing.assert_array_equal(fresh()(x, 1.0, k=4)["scaled"], x * 4 + 1)
    assert len(TRACES) == traced


def test_positional_and_keyword_calls_share_one_program(on_disk):
    f = fresh()
    x = np.ones((2, 2), np.float32)
    f(x, 0.5, 3)
    f(x, y=0.5, k=3)
    f(x=x, y=0.5, k=3)
    assert len(TRACES) == 1


def test_inside_another_transformation_it_is_plain_jit(on_disk):
    f = fresh()
    out = jax.vmap(lambda r: f(r, 1.0)["scaled"])(jnp.ones((3, 2)))
    np.testing.assert_array_equal(out, np.full((3, 2), 3.0))
    assert not list(on_disk.glob("*.bin"))


def test_a_damaged_file_is_compiled_again_and_replaced(on_disk):
    x = np.ones((2, 2), np.float32)
    fresh()(x, 1.0)
    (path,) = on_disk.glob("*.bin")
    path.write_bytes(b"not an executable")
    np.testing.assert_array_equal(fresh()(x, 1.0)["scaled"], x * 2 + 1)
    assert len(TRACES) == 2
    fresh()(x, 1.0)
    assert len(TRACES) == 2  # the replaced file loads


def test_without_a_directory_nothing_is_written_and_the_process_keeps_it(tmp_path):
    executables.set_directory(None)
    try:
        TRACES.clear()
        f = fresh()
        f(np.ones(3, np.float32), 1.0)
        f(np.ones(3, np.float32), 2.0)
        assert len(TRACES) == 1 and not list(tmp_path.iterdir())
    finally:
        executables.follow_jax_cache()


def test_a_static_argument_without_a_stable_repr_is_not_kept_on_disk(on_disk):
    @cached_jit(static_argnames=("fn",))
    def apply(x, fn):
        return fn(x)

    np.testing.assert_array_equal(apply(np.ones(2, np.float32), fn=lambda v: v + 1), [2.0, 2.0])
    assert not list(on_disk.glob("*.bin"))


def test_the_oldest_files_go_beyond_the_size_limit(on_disk, monkeypatch):
    f, order = fresh(), []
    for n in range(1, 4):
        f(np.ones(n, np.float32), 1.0)
        order += [p for p in on_disk.glob("*.bin") if p not in order]
    limit = sum(p.stat().st_size for p in order[1:]) + 1
    monkeypatch.setattr(executables, "MAX_BYTES", limit)
    f(np.ones(4, np.float32), 1.0)
    left = set(on_disk.glob("*.bin"))
    (newest,) = left - set(order) or {None}
    assert newest is not None and order[0] not in left  # the oldest went first, never the new one
    assert sum(p.stat().st_size for p in left) <= limit


def test_static_parameters_before_others_are_refused():
    def bad(k, x):
        return x * k

    with pytest.raises(TypeError, match="static parameters must follow"):
        CachedJit(bad, ("k",))


def test_observers_from_factories_have_a_key_without_addresses():
    from jaxq.histogram import histogram_observer
    from jaxq.observers import Observer, sigma_statistic

    assert " at 0x" not in repr(histogram_observer(512)) + repr(sigma_statistic(3.0))
    assert repr(histogram_observer(512)) != repr(histogram_observer(1024))
    hand_made = Observer(lambda: 0, lambda s, x, n: s, lambda s: s)
    assert " at 0x" in repr(hand_made)  # so it is never kept on disk


def test_a_second_process_runs_the_observers_without_tracing(tmp_path):
    """The real thing: a new process with JAX's cache directory set loads jaxq's observer
    and weight programs and traces none of them."""
    script = textwrap.dedent("""
        import jax, numpy as np, jaxq, jaxq.calibrate
        from jaxq.histogram import histogram_observer
        from jaxq.scheme import QScheme
        traced = []
        ours = ("update_observer", "quantize_weight_bucket")
        jax.monitoring.register_event_duration_secs_listener(
            lambda e, d, fun_name="", **k: traced.append(fun_name) if fun_name in ours else None)
        obs = histogram_observer(256)
        x = np.linspace(-1, 1, 4096, dtype=np.float32)
        state = jaxq.update_observer(obs.init(), x, np.int32(x.size), obs)
        scheme = QScheme(bits=8, signed=True, symmetric=True, axis=0)
        w = jaxq.calibrate.quantize_weight_bucket(np.ones((2, 4, 8), np.float32), scheme)
        print(len(traced), float(state.count), float(w.qparams.scale.sum()), float(state.hist.sum()))
    """)
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path), "JAXQ_COMPILATION_CACHE": "off"}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    first, second = (r.stdout.split() for r in runs)
    assert int(first[0]) == 2 and int(second[0]) == 0
    assert first[1:] == second[1:]
    assert list((tmp_path / executables.SUBDIR).glob("*.bin"))


def test_a_program_already_in_jaxs_cache_is_kept_in_a_form_that_loads(tmp_path):
    """An executable that JAX loaded from its own persistent cache serializes without its
    kernels; what is kept must be compiled afresh (a third process runs it)."""
    script = textwrap.dedent("""
        import sys, jax, numpy as np
        from jaxq import executables
        from jaxq.calibrate import quantize_weight_bucket
        from jaxq.scheme import QScheme
        executables.set_directory(sys.argv[1])
        w = np.random.RandomState(0).randn(2, 16, 27).astype(np.float32)
        out = quantize_weight_bucket(w, QScheme(bits=8, signed=True, symmetric=True, axis=0))
        print(float(out.qparams.scale.sum()), int(out.q.sum()))
    """)
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax"), "JAXQ_COMPILATION_CACHE": "off"}

    def run(kept: str) -> str:
        command = [sys.executable, "-c", script, str(tmp_path / kept)]
        r = subprocess.run(command, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    first = run("a")  # compiles; JAX's cache and "a" filled
    assert run("b") == first  # JAX's cache hit, "b" filled
    assert run("b") == first  # loads "b"
