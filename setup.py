"""Builds the native CPU kernels next to the modules that call them; the rest is in pyproject.toml.

csrc/dequant4.cc -> oftjax/quant/_dequant4_cpu*.so (4-bit dequantize), csrc/rotate.cc ->
oftjax/nn/_rotate_cpu*.so (block-diagonal rotations) and csrc/attention.cc ->
oftjax/models/_attention_cpu*.so (causal attention). They are XLA FFI handlers loaded with ctypes
(oftjax/_ffi.py), not Python modules. Their build is optional: without a C++17 compiler the install still
succeeds and the pure-XLA paths run (``oftjax.quant.native_info()``, ``oftjax.nn.rotation_native_info()``
and ``oftjax.models.attention_native_info()`` say which path runs and why). ``-ffp-contract=off`` for the
dequantize: the double-quant absmax is a multiply then an add, rounded twice as bitsandbytes does; an FMA
would round once.
"""

import sys

from setuptools import Extension, setup

_ARGS = ["-O3", "-std=c++17", "-Wno-attributes"] if sys.platform != "win32" else ["/O2", "/std:c++17"]
_NO_CONTRACT = ["-ffp-contract=off"] if sys.platform != "win32" else []

setup(
    ext_modules=[
        Extension(
            "oftjax.quant._dequant4_cpu",
            sources=["csrc/dequant4.cc"],
            include_dirs=["csrc", "csrc/third_party"],
            language="c++",
            extra_compile_args=_ARGS + _NO_CONTRACT,
            optional=True,
        ),
        Extension(
            "oftjax.models._attention_cpu",
            sources=["csrc/attention.cc"],
            include_dirs=["csrc", "csrc/third_party"],
            language="c++",
            extra_compile_args=_ARGS,
            optional=True,
        ),
        Extension(
            "oftjax.nn._rotate_cpu",
            sources=["csrc/rotate.cc"],
            include_dirs=["csrc", "csrc/third_party"],
            language="c++",
            extra_compile_args=_ARGS,
            optional=True,
        ),
    ]
)
