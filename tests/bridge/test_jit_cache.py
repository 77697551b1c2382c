"""The persistent compilation cache: on by default, configurable, off with one switch,
shared by processes."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp
    import bridge
    from bridge import jit_cache
    print("DIR", jit_cache.current())
    jax.jit(lambda x: x * 3 + 1)(jnp.ones(7)).block_until_ready()
""")


def _run(env_extra, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION", "JAXQ_", "XDG_CACHE"))}
    env.update({"HOME": str(tmp_path / "home"), **env_extra})
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("DIR ", 1)[1].split()[0]


def test_on_by_default_in_the_user_cache(tmp_path):
    where = _run({}, tmp_path)
    assert where == str(tmp_path / "home" / ".cache" / "jaxq" / "jax")
    assert any(os.scandir(where))  # the program was written


@pytest.mark.slow
def test_directory_and_off_switch(tmp_path):
    assert _run({"JAXQ_COMPILATION_CACHE": str(tmp_path / "c")}, tmp_path) == str(tmp_path / "c")
    assert _run({"JAXQ_COMPILATION_CACHE": "off"}, tmp_path) == "None"
    # a cache the user configured for JAX is left alone
    assert _run({"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "mine")}, tmp_path) == str(tmp_path / "mine")


@pytest.mark.slow
@pytest.mark.parametrize("n", [3])
def test_processes_share_it(tmp_path, n):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION", "JAXQ_"))}
    env["JAXQ_COMPILATION_CACHE"] = str(tmp_path / "shared")
    procs = [
        subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(n)
    ]
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]


def test_the_suite_itself_writes_no_persistent_cache():
    """tests/conftest.py keeps the suite's process off the cache (JAX's cache write crashed it)."""
    from bridge import jit_cache

    assert jit_cache.current() is None
