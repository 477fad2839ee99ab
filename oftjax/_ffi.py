"""Loading the native CPU kernels (``csrc/``) and registering their XLA FFI handlers.

``pip install`` builds each kernel as a shared library next to the module that calls it (setup.py): the
4-bit dequantize (``oftjax/quant/_dequant4_cpu*.so``) and the block-diagonal rotation
(``oftjax/nn/_rotate_cpu*.so``). They are XLA FFI handlers, not Python modules: loaded with ctypes and
registered for the ``cpu`` platform once, on first use. A missing or stale library is not an error: callers
then run their pure-XLA formulation and say why through their ``native_info()``. ``OFTJAX_NATIVE=0`` (read
at first use) turns every kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
from pathlib import Path

import jax


def library_path(directory: Path, stem: str) -> Path | None:
    """The built library ``<directory>/<stem><extension suffix>``, or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = directory / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    return None


@functools.cache
def load(directory: Path, stem: str, targets: tuple[tuple[str, str], ...]) -> tuple[ctypes.CDLL | None, str]:
    """(library, reason): the library with ``targets`` ((FFI name, symbol) pairs) registered, or None, why."""
    if os.environ.get("OFTJAX_NATIVE", "1") == "0":
        return None, "disabled by OFTJAX_NATIVE=0"
    path = library_path(directory, stem)
    if path is None:
        return None, (
            f"{stem}*.so not found in {directory}: the package was installed without building csrc/ "
            "(no C++17 compiler?); reinstall with `pip install -e .`"
        )
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
        for name, symbol in targets:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, AttributeError) as e:  # a stale or foreign build
        return None, f"could not load {path}: {e}"
    return lib, "loaded"
