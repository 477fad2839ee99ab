"""Builds the C++ CPU kernels into oftjax/cpu_kernels/; the rest of the build is in pyproject.toml.

csrc/dequant4.cc (4-bit dequantize, also fused with a rotation of the weight's rows), csrc/rotate.cc (block-
diagonal rotations and the Cayley-Neumann build of their blocks; the row micro-kernel, csrc/rotate_rows.h,
is shared with dequant4.cc), csrc/attention.cc (causal attention) and csrc/swiglu.cc (SwiGLU; its exp,
csrc/simd_exp.h, is attention's). They are XLA FFI handlers that ``oftjax.cpu_kernels.enable()`` loads with
ctypes, not Python modules. Their build is optional: without a C++17 compiler the install still succeeds and
everything runs in pure JAX (``oftjax.cpu_kernels.info()`` says why).
``-ffp-contract=off`` for the dequantize
(the double-quant absmax is a multiply then an add, rounded twice as bitsandbytes does; an FMA would round
once) and for SwiGLU (products and sums rounded one by one, as the JAX formulation does).

csrc/block_cache.c is not a kernel: a C library that ``oftjax train`` preloads (LD_PRELOAD) so that freed
blocks of 32 MiB and more stay mapped for reuse (oftjax/cli/_malloc.py); optional too.
"""

import sys

from setuptools import Extension, setup

_ARGS = ["-O3", "-std=c++17", "-Wno-attributes"] if sys.platform != "win32" else ["/O2", "/std:c++17"]
_NO_CONTRACT = ["-ffp-contract=off"] if sys.platform != "win32" else []


def _kernel(module: str, source: str, args: list[str]) -> Extension:
    return Extension(
        module,
        sources=[source],
        depends=["csrc/cpu_state.h", "csrc/parallel_for.h", "csrc/rotate_rows.h", "csrc/simd_exp.h"],
        include_dirs=["csrc", "csrc/third_party"],
        language="c++",
        extra_compile_args=args,
        optional=True,
    )


setup(
    ext_modules=[
        _kernel("oftjax.cpu_kernels._dequant4_cpu", "csrc/dequant4.cc", _ARGS + _NO_CONTRACT),
        _kernel("oftjax.cpu_kernels._attention_cpu", "csrc/attention.cc", _ARGS),
        _kernel("oftjax.cpu_kernels._rotate_cpu", "csrc/rotate.cc", _ARGS),
        _kernel("oftjax.cpu_kernels._swiglu_cpu", "csrc/swiglu.cc", _ARGS + _NO_CONTRACT),
        _kernel("oftjax.cpu_kernels._matmul4_cpu", "csrc/matmul4.cc", _ARGS + _NO_CONTRACT),
    ]
    + (
        [
            Extension(
                "oftjax.cli._block_cache",
                sources=["csrc/block_cache.c"],
                language="c",
                extra_compile_args=["-O2", "-std=gnu11"],
                libraries=["dl", "pthread"],
                optional=True,
            )
        ]
        if sys.platform.startswith("linux")
        else []
    )
)
