"""Loading the native CPU kernels (``csrc/``) and registering their XLA FFI handlers.

``pip install`` builds each kernel as a shared library next to the module that calls it (setup.py): the
4-bit dequantize (``oftjax/quant/_dequant4_cpu*.so``), the block-diagonal rotation
(``oftjax/nn/_rotate_cpu*.so``) and causal attention (``oftjax/models/_attention_cpu*.so``). They are XLA FFI
handlers, not Python modules: loaded with ctypes and registered for the ``cpu`` platform once, on first use.
A missing or stale library is not an error: callers then run their pure-XLA formulation and say why through
their ``native_info()``. ``OFTJAX_NATIVE=0`` (read at first use) turns every kernel off.
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


class Kernels:
    """One kernel library: its FFI targets, whether it loaded, and its ``Supports(int64)`` query.

    Args:
      directory, stem: where the library is built (``<directory>/<stem>*.so``).
      targets: ``(FFI name, exported symbol)`` pairs to register for the ``cpu`` platform.
      what: how errors name it ("rotation", "attention").
      supports_symbol: an exported ``int f(int64_t)`` saying whether the kernels run for a size on this
        machine (block size, head dim), or None.
    """

    def __init__(
        self,
        directory: Path,
        stem: str,
        targets: tuple[tuple[str, str], ...],
        *,
        what: str,
        supports_symbol: str | None = None,
    ):
        self.directory, self.stem, self.targets = directory, stem, targets
        self.what, self.supports_symbol = what, supports_symbol

    def load(self) -> tuple[ctypes.CDLL | None, str]:
        """(library, reason), registering the targets on first use."""
        lib, reason = load(self.directory, self.stem, self.targets)
        if lib is not None and self.supports_symbol is not None:
            fn = getattr(lib, self.supports_symbol)
            fn.restype, fn.argtypes = ctypes.c_int, (ctypes.c_int64,)
        return lib, reason

    def require(self) -> None:
        """Raise a RuntimeError naming why, unless the library is loaded."""
        lib, reason = self.load()
        if lib is None:
            raise RuntimeError(f"the native {self.what} kernels are not available: {reason}")

    def supports(self, size: int) -> bool:
        """Loaded, and ``supports_symbol`` says the kernels run for ``size`` on this machine."""
        lib = self.load()[0]
        return lib is not None and bool(getattr(lib, self.supports_symbol)(int(size)))

    def info(self, key: str, sizes: range) -> dict[str, object]:
        """``{"available", "library", key: the sizes in ``sizes`` that run here, "reason"}``."""
        lib, reason = self.load()
        path = library_path(self.directory, self.stem)
        runs = [s for s in sizes if lib is not None and self.supports(s)]
        if lib is not None and not runs:
            reason = f"loaded, but this CPU has no AVX-512: {self.what} takes the XLA path"
        library = str(path) if path else None
        return {"available": lib is not None, "library": library, key: runs, "reason": reason}
