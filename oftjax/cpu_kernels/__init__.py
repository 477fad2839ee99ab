"""Opt-in C++ kernels for the CPU, behind the library's one seam for faster implementations.

The library computes everything in pure JAX by default. ``enable()`` installs faster CPU implementations of
its named operations (``oftjax._registry``):

============================  ==========================================  ===============================
operation                     what                                        kernel (``csrc/``)
============================  ==========================================  ===============================
``rotate_blocks``             ``x BD(R)`` and its gradient                rotate.cc
``cayley_neumann_blocks``     rotation blocks from OFT parameters         rotate.cc
``dequantize_4bit``           NF4/FP4 dequantize (same bits)              dequant4.cc
``dequantize_rotate``         4-bit dequantize fused with a rotation      dequant4.cc
``causal_attention``          causal attention with RoPE, and gradient    attention.cc
``swiglu``                    ``silu(gate) * up`` and its gradient        swiglu.cc
``dequant_matmul_4bit``       ``x W^T`` from 4-bit bytes, up to 16 rows   matmul4.cc
============================  ==========================================  ===============================

Each is a JAX primitive lowered to the kernel when a computation is compiled for the CPU and to the pure-JAX
formulation for any other platform, so a jitted function that runs on a GPU never calls them; a call the
kernels do not cover (dtype, block or head size, a machine without AVX-512) keeps the default. Every JAX
transformation still works with them enabled: reverse-mode AD runs the backward kernels, forward-mode AD,
``vmap`` and higher derivatives use the pure-JAX formulation (``oftjax.cpu_kernels._primitive``). Results
agree with the defaults to float32 rounding (another summation order, fused multiply-adds, a polynomial exp),
the dequantize kernel bit for bit. ``oftjax train`` enables them on a CPU (``--cpu-kernels off`` does not).

Nothing is loaded at import: ``enable()`` loads each shared library (built next to this file by
``pip install``) and registers its XLA FFI handlers the first time. It changes what functions traced
afterwards run, so it clears JAX's caches; call it at the start of a program, or use it as a context manager
(``with cpu_kernels.enable(): ...``) to restore the previous state on exit.

Example:
    >>> from oftjax import cpu_kernels
    >>> with cpu_kernels.enable():
    ...     on = cpu_kernels.enabled()
    >>> on == cpu_kernels.info()["rotation"]["available"], cpu_kernels.enabled()
    (True, False)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import jax

from oftjax import _registry

__all__ = ["disable", "enable", "enabled", "info"]

# library name -> module holding its LIBRARY and OPERATIONS
_MODULES = {
    "rotation": "oftjax.cpu_kernels._rotate",
    "dequantize": "oftjax.cpu_kernels._dequant",
    "attention": "oftjax.cpu_kernels._attention",
    "swiglu": "oftjax.cpu_kernels._swiglu",
    "matmul4": "oftjax.cpu_kernels._matmul4",
}
# the layers that declare the operations the kernels replace
_DECLARING = ("oftjax.oft", "oftjax.quant", "oftjax.nn", "oftjax.models")


def _kernel_modules() -> dict[str, Any]:
    for name in _DECLARING:
        importlib.import_module(name)
    return {lib: importlib.import_module(mod) for lib, mod in _MODULES.items()}


def _operations() -> dict[str, Callable[..., Any]]:
    """The replacements of every library that loads here."""
    ops: dict[str, Callable[..., Any]] = {}
    for module in _kernel_modules().values():
        if module.LIBRARY.load()[0] is not None:
            ops.update(module.OPERATIONS)
    return ops


class _Restore:
    """Returned by ``enable``/``disable``: as a context manager, restores the replacements found before."""

    def __init__(self, previous: dict[str, Callable[..., Any]]):
        self._previous = previous

    def __enter__(self) -> _Restore:
        return self

    def __exit__(self, *exc: object) -> None:
        _registry.install(self._previous, replace=True)
        jax.clear_caches()


def enable() -> _Restore:
    """Install the CPU kernels for every operation whose library loads; clear JAX's caches.

    Returns an object that, used as a context manager, restores the previous state on exit
    (``with cpu_kernels.enable(): ...``); called plainly, the kernels stay enabled.
    """
    previous = _registry.install(_operations())
    jax.clear_caches()
    return _Restore(previous)


def disable() -> _Restore:
    """Remove the CPU kernels' replacements (back to pure JAX); clear JAX's caches. A context manager too."""
    previous = _registry.current()
    ours = _our_operation_names()
    _registry.install({n: f for n, f in previous.items() if n not in ours}, replace=True)
    jax.clear_caches()
    return _Restore(previous)


def enabled() -> bool:
    """Whether any CPU kernel is installed now."""
    return bool(_our_operation_names() & set(_registry.installed()))


def _our_operation_names() -> set[str]:
    return {n for m in _kernel_modules().values() for n in m.OPERATIONS}


def info() -> dict[str, Any]:
    """What the kernels can do on this machine, and whether they are enabled (loads the libraries).

    Returns:
      ``{"enabled": bool, "operations": installed operation names, "rotation": {...}, "dequantize": {...},
      "attention": {...}, "swiglu": {...}, "matmul4": {...}}``; each library entry has ``available`` (loaded),
      ``library`` (its path or None), ``reason`` and what runs: ``block_sizes`` (rotation), ``avx512`` and
      ``rotate_block_sizes`` (dequantize, fused rotation), ``head_dims`` (attention), ``runs`` (SwiGLU),
      ``avx512`` (4-bit matmul).

    Example:
      >>> sorted(info()["attention"])
      ['available', 'head_dims', 'library', 'reason']
    """
    mods = _kernel_modules()
    rot, deq, att, swi, mm4 = (mods[k] for k in ("rotation", "dequantize", "attention", "swiglu", "matmul4"))
    dequant = deq.LIBRARY.info("rotate_block_sizes", range(1, 257))
    dequant["avx512"] = deq.has_avx512()
    swiglu = swi.LIBRARY.info(None)
    swiglu["runs"] = swi.supports("float32")
    matmul4 = mm4.LIBRARY.info(None)
    matmul4["avx512"] = mm4.has_avx512()
    return {
        "enabled": enabled(),
        "operations": list(_registry.installed()),
        "rotation": rot.LIBRARY.info("block_sizes", range(1, 257)),
        "dequantize": dequant,
        "attention": att.LIBRARY.info("head_dims", range(1, 257)),
        "swiglu": swiglu,
        "matmul4": matmul4,
    }
