"""Shared by the CPU-kernel tests: where the kernels must run, scaled tolerances, lowered programs."""

from __future__ import annotations

import platform
import sys
from typing import Any

import jax
import numpy as np
import pytest

from oftjax.cpu_kernels._library import Library
from tests._cpu import has_avx512f
from tests.tolerances import TOL

# CI runs on Linux x86-64: there the libraries must be built and loaded (a missing one fails a test)
BUILT_HERE = sys.platform == "linux" and platform.machine() == "x86_64"

# the block sizes the rotation kernels (and the fused dequantize-rotate kernel) take on an AVX-512 CPU
ROTATE_BLOCK_SIZES = [16, 32, 48, 64]

# the dequantize kernel's AVX-512 path needs these; the other kernels need avx512f
AVX512_DEQUANT = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


def skip_without_avx512(runs_here: bool, default_tested_in: str) -> pytest.MarkDecorator:
    """Skip a module where the kernels do not run *and* the CPU has no AVX-512 (they cannot run there).

    On Linux with AVX-512 nothing is skipped, so a missing or stale build fails instead of passing unseen.
    """
    return pytest.mark.skipif(
        not runs_here and not (sys.platform == "linux" and has_avx512f()),
        reason=f"no AVX-512 on this machine: the pure-JAX default runs ({default_tested_in})",
    )


def require_loaded(library: Library) -> None:
    """Load ``library`` (registering its FFI targets) so its CPU functions can be called directly."""
    lib, reason = library.load()
    assert lib is not None, reason


def assert_scaled_close(got: Any, expected: Any, key: str, magnitude: float = 0.0) -> None:
    """Within ``TOL[key]``, atol times ``max(1, max |expected|, magnitude)``: float32 sums of products keep
    absolute rounding errors of the size of their largest terms."""
    tol = TOL[key]
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, magnitude, float(np.max(np.abs(expected))) if expected.size else 0.0)
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=tol.rtol, atol=tol.atol * scale)


def assert_trees_close(got: Any, expected: Any, key: str) -> None:
    """``assert_scaled_close`` leaf by leaf (same tree structure)."""
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert np.shape(a) == np.shape(e)
        assert_scaled_close(a, e, key)


def lowered(f: Any, *args: Any) -> str:
    """The StableHLO text of ``jax.jit(f)`` for ``args`` (custom calls appear as ``@target(``)."""
    return jax.jit(f).lower(*args).as_text()


def bits(a: Any) -> np.ndarray:
    """float32 values as their uint32 bit patterns."""
    return np.asarray(a, np.float32).view(np.uint32)


def rotate_reference(x: Any, R: Any, transpose: bool = False) -> np.ndarray:
    """``x BD(R)`` (or ``x BD(R)^T``) in float64."""
    x, R = np.asarray(x, np.float64), np.asarray(R, np.float64)
    r, b = R.shape[0], R.shape[1]
    if transpose:
        R = R.transpose(0, 2, 1)
    return np.einsum("...rk,rkc->...rc", x.reshape(*x.shape[:-1], r, b), R).reshape(x.shape)
