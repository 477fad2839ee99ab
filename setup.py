"""Builds the native CPU kernels next to the modules that call them; the rest is in pyproject.toml.

csrc/dequant4.cc -> oftjax/quant/_dequant4_cpu*.so (4-bit dequantize, also fused with a rotation of the
weight's rows), csrc/rotate.cc -> oftjax/nn/_rotate_cpu*.so (block-diagonal rotations and the Cayley-Neumann
build of their blocks; the row micro-kernel, csrc/rotate_rows.h, is shared with dequant4.cc),
csrc/attention.cc -> oftjax/models/_attention_cpu*.so (causal attention) and csrc/swiglu.cc ->
oftjax/models/_swiglu_cpu*.so (SwiGLU's activation; its exp, csrc/simd_exp.h, is attention's). They are XLA
FFI handlers loaded with ctypes (oftjax/_ffi.py), not Python modules. Their build is optional: without a C++17
compiler the install still succeeds and the pure-XLA paths run (``oftjax.quant.native_info()``,
``oftjax.nn.rotation_native_info()``, ``oftjax.models.attention_native_info()`` and
``oftjax.models.swiglu_native_info()`` say which path runs and why). ``-ffp-contract=off`` for the dequantize
(the double-quant absmax is a multiply then an add, rounded twice as bitsandbytes does; an FMA would round
once) and for SwiGLU (products and sums rounded one by one, as XLA's formulation does).
"""

import sys

from setuptools import Extension, setup

_ARGS = ["-O3", "-std=c++17", "-Wno-attributes"] if sys.platform != "win32" else ["/O2", "/std:c++17"]
_NO_CONTRACT = ["-ffp-contract=off"] if sys.platform != "win32" else []


def _kernel(module: str, source: str, args: list[str]) -> Extension:
    return Extension(
        module,
        sources=[source],
        depends=["csrc/parallel_for.h", "csrc/rotate_rows.h", "csrc/simd_exp.h"],
        include_dirs=["csrc", "csrc/third_party"],
        language="c++",
        extra_compile_args=args,
        optional=True,
    )


setup(
    ext_modules=[
        _kernel("oftjax.quant._dequant4_cpu", "csrc/dequant4.cc", _ARGS + _NO_CONTRACT),
        _kernel("oftjax.models._attention_cpu", "csrc/attention.cc", _ARGS),
        _kernel("oftjax.nn._rotate_cpu", "csrc/rotate.cc", _ARGS),
        _kernel("oftjax.models._swiglu_cpu", "csrc/swiglu.cc", _ARGS + _NO_CONTRACT),
    ]
)
