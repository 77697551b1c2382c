import json
import os
import pathlib
import shutil
import tempfile
import textwrap

import jax
import jaxq.executables
import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))  # deterministic numerics for metric thresholds

_CACHE_SETTINGS = {"jax_persistent_cache_min_compile_time_secs": 0, "jax_persistent_cache_min_entry_size_bytes": 0}


def pytest_configure(config):
    """One persistent JAX compilation cache shared by the processes the suite starts (the
    notebooks, tests/test_notebooks.py, load what an earlier one compiled). The suite's own
    process writes no entries: JAX's cache write has crashed it (a segfault in
    `put_executable_and_time`) after thousands of compilations, late in the run. Under
    pytest-xdist the workers share the controller's directory (its environment reaches them)."""
    inherited = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
    if os.environ.get("PYTEST_XDIST_WORKER") and os.path.isdir(inherited):
        cache = inherited  # the controller made it and removes it
    else:
        cache = tempfile.mkdtemp(prefix="jaxq-tests-jit-cache-")
        config._jaxq_jit_cache = cache
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    for name, value in _CACHE_SETTINGS.items():
        os.environ[name.upper()] = str(value)
    os.environ["JAXQ_COMPILATION_CACHE"] = "off"  # `import bridge` must not turn one on here
    jax.config.update("jax_compilation_cache_dir", None)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. Every loaded CPU executable
    holds a few memory mappings; the whole suite compiles enough of them to reach the
    kernel's `vm.max_map_count` (65,530), and XLA then segfaults inside a compile or a
    cache write. Tests that count compilations do so within one module."""
    yield
    jax.clear_caches()
    jaxq.executables.clear()


def pytest_unconfigure(config):
    if hasattr(config, "_jaxq_jit_cache"):
        shutil.rmtree(config._jaxq_jit_cache, ignore_errors=True)


@pytest.fixture(scope="session")
def digits():
    from bridge.models.digits import digits_split

    return digits_split()


@pytest.fixture
def digits_model():
    from bridge.models.digits import load_digits_cnn

    return load_digits_cnn()


@pytest.fixture
def digits_calib(digits):
    x_train = digits[0]
    return [x_train[i : i + 32] for i in range(0, 128, 32)]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's directory with a model factory and calibration files."""
    (tmp_path / "mymodels.py").write_text(
        textwrap.dedent("""
        import torch
        def build():
            from bridge.models.digits import load_digits_cnn
            return load_digits_cnn()
        def data():
            from bridge.models.digits import digits_split
            x = digits_split()[0]
            return [x[i:i + 16] for i in range(0, 64, 16)]
        def not_a_model():
            return 3
    """)
    )
    from bridge.models.digits import digits_split

    x = digits_split()[0][:64]
    torch.save(x, tmp_path / "calib.pt")
    np.save(tmp_path / "calib.npy", x.numpy())
    (tmp_path / "cfg.json").write_text(json.dumps({"quant_mode": 1, "act_method": 2}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


SLOW_TESTS = {
    line.strip()
    for line in (pathlib.Path(__file__).parent / "slow_tests.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
}


def pytest_collection_modifyitems(config, items):
    """The tests listed in `slow_tests.txt` get the `slow` marker (out of the fast tier); a
    name without `[…]` marks every parametrization of that test."""
    for item in items:
        if item.nodeid in SLOW_TESTS or item.nodeid.split("[")[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
