"""Test configuration: strict dtype promotion so every int->float cast is explicit; the `kernels` fixture."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

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
