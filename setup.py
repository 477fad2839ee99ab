"""Builds the native CPU kernel (csrc/dequant4.cc) next to oftjax.quant; the rest is in pyproject.toml.

The kernel is an XLA FFI handler loaded with ctypes (oftjax/quant/_native.py), not a Python module. Its build
is optional: without a C++17 compiler the install still succeeds and dequantize uses its pure-XLA path
(``oftjax.quant.native_info()`` says which path runs and why). ``-ffp-contract=off``: the double-quant
absmax is a multiply then an add, rounded twice as bitsandbytes does; an FMA would round once.
"""

import sys

from setuptools import Extension, setup

_ARGS = (
    ["-O3", "-std=c++17", "-ffp-contract=off", "-Wno-attributes"]
    if sys.platform != "win32"
    else ["/O2", "/std:c++17"]
)

setup(
    ext_modules=[
        Extension(
            "oftjax.quant._dequant4_cpu",
            sources=["csrc/dequant4.cc"],
            include_dirs=["csrc/third_party"],
            language="c++",
            extra_compile_args=_ARGS,
            optional=True,
        )
    ]
)
