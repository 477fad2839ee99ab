"""Test configuration: strict dtype promotion so every int->float cast is explicit; a compilation cache for
the session; the `kernels` fixture."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

# Many tests build the same small models at the same shapes, and each builds its functions afresh (new
# closures, so jit's in-memory cache misses and XLA compiles the same program again). JAX's persistent
# compilation cache, in a directory of this session only (empty at the start, removed at exit), hands back
# the executable XLA compiled the first time: the suite runs a third faster, the programs are the ones XLA
# compiled. Compile counters count its hits as compilations (tests/nn/_helpers.py).
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="oftjax-tests-jax-cache-")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402

from oftjax import cpu_kernels  # noqa: E402


@pytest.fixture(params=["pure_jax", "cpu_kernels"])
def kernels(request):
    """Run a test twice: with the library's pure-JAX default, and with ``oftjax.cpu_kernels`` enabled.

    Layer, model and training parity tests use it (``pytestmark = pytest.mark.usefixtures("kernels")``):
    what GPU/TPU users run, and what ``oftjax train`` runs on a CPU.
    """
    if request.param == "cpu_kernels":
        with cpu_kernels.enable():
            assert cpu_kernels.enabled(), cpu_kernels.info()
            yield request.param
    else:
        assert not cpu_kernels.enabled()
        yield request.param
