"""Loading the C++ CPU kernels (``csrc/``) and registering their XLA FFI handlers.

``pip install`` builds each kernel file as a shared library in this package (setup.py): the 4-bit dequantize
(``_dequant4_cpu*.so``, csrc/dequant4.cc), the block-diagonal rotations and the Cayley-Neumann build of their
blocks (``_rotate_cpu*.so``, csrc/rotate.cc), causal attention (``_attention_cpu*.so``, csrc/attention.cc) and
SwiGLU (``_swiglu_cpu*.so``, csrc/swiglu.cc). They are XLA FFI handlers, not Python modules: a library is
loaded with ctypes and its handlers registered for the ``cpu`` platform the first time ``enable()`` asks for
it, never at import. A missing or stale library is not an error: the operations it would serve keep their
pure-JAX defaults and ``oftjax.cpu_kernels.info()`` says why.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from pathlib import Path
from typing import Any

import jax

_HERE = Path(__file__).parent


def library_path(stem: str, directory: Path = _HERE) -> Path | None:
    """The built library ``<directory>/<stem><extension suffix>`` (default: this package), or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = directory / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    return None


@functools.cache
def _load(stem: str, targets: tuple[tuple[str, str], ...]) -> tuple[ctypes.CDLL | None, str]:
    path = library_path(stem)
    if path is None:
        return None, (
            f"{stem}*.so not found in {_HERE}: the package was installed without building csrc/ "
            "(no C++17 compiler?); reinstall with `pip install -e .`"
        )
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
        for name, symbol in targets:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, AttributeError) as e:  # a stale or foreign build
        return None, f"could not load {path}: {e}"
    return lib, "loaded"


class Library:
    """One kernel library: its FFI targets, whether it loaded, and its ``Supports(int64)`` query.

    Args:
      stem: the library's file name without the extension suffix (``_rotate_cpu``).
      targets: ``(FFI name, exported symbol)`` pairs registered for the ``cpu`` platform on first load.
      what: how messages name it ("rotation", "attention").
      supports_symbol: an exported ``int f(int64_t)`` saying whether the kernels run for a size on this
        machine (block size, head dim), or None when they run for every size.
    """

    def __init__(
        self,
        stem: str,
        targets: tuple[tuple[str, str], ...],
        *,
        what: str,
        supports_symbol: str | None = None,
    ):
        self.stem, self.targets, self.what, self.supports_symbol = stem, targets, what, supports_symbol

    def load(self) -> tuple[ctypes.CDLL | None, str]:
        """(library, reason): loads and registers the targets on first use (ctypes, then jax.ffi)."""
        lib, reason = _load(self.stem, self.targets)
        if lib is not None and self.supports_symbol is not None:
            fn = getattr(lib, self.supports_symbol)
            fn.restype, fn.argtypes = ctypes.c_int, (ctypes.c_int64,)
        return lib, reason

    def supports(self, size: int = 1) -> bool:
        """Loaded, and ``supports_symbol`` says the kernels run for ``size`` on this machine."""
        lib = self.load()[0]
        if lib is None:
            return False
        return self.supports_symbol is None or bool(getattr(lib, self.supports_symbol)(int(size)))

    def info(self, key: str | None, sizes: range = range(0)) -> dict[str, Any]:
        """``{"available", "library", [key: the sizes in ``sizes`` that run here,] "reason"}`` (loads it)."""
        lib, reason = self.load()
        path = library_path(self.stem)
        out: dict[str, Any] = {"available": lib is not None, "library": str(path) if path else None}
        if key is not None:
            out[key] = [s for s in sizes if lib is not None and self.supports(s)]
            if lib is not None and not out[key]:
                reason = f"loaded, but this CPU has no AVX-512: {self.what} keeps its pure-JAX default"
        out["reason"] = reason
        return out
