"""Test setup (before jax is imported): CPU only, 8 fake devices for sharding tests, one compilation cache.

The session shares one fresh persistent compilation cache (spp_jax/compile_cache.py) with every launch
script it starts: the subprocess tests restart the same small runs dozens of times, and in-process tests
compile many identical programs. Every program is cached (no minimum compile time), and the cache is removed
at exit, so no test reads entries from an earlier session or writes into the user's home.
"""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="spp_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    """Synthetic Fashion-MNIST idx files (point SPP_FASHION_MNIST_DIR at them), one set per test module."""
    from tests.helpers import write_synthetic_fashion_mnist

    d = tmp_path_factory.mktemp("idx")
    write_synthetic_fashion_mnist(d)
    return d
