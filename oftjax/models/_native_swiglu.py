"""The native CPU kernels for SwiGLU's ``silu(gate) * up``, forward and backward (``csrc/swiglu.cc``).

``oftjax.models._llama.swiglu`` runs them on CPU for float32 operands of one shape on an AVX-512 machine
(``supports``; chosen at lowering time, so GPU/TPU run XLA's formulation). They compute the same formulas as
the XLA path (torch's ``silu_backward`` for the gradient) to float32 rounding: their exp is a polynomial (~1
ulp) where XLA has its own logistic (tests/models/test_native_swiglu.py, TOL["swiglu"]). ``OFTJAX_NATIVE=0``
turns them off.

Why they exist: XLA:CPU evaluates the logistic 8 floats wide; SwiGLU's forward took ~3x the time of a plain
multiply of the same arrays, and its transcendental cost ~5 ms of the 4-layer CPU train step
(benchmarks/bench_train.py); 16 wide it is close to the memory traffic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from oftjax import _ffi

_FORWARD = "oftjax_swiglu"
_BACKWARD = "oftjax_swiglu_grad"
_KERNELS = _ffi.Kernels(
    Path(__file__).parent,
    "_swiglu_cpu",
    ((_FORWARD, "OftjaxSwiglu"), (_BACKWARD, "OftjaxSwigluGrad")),
    what="SwiGLU",
    supports_symbol="OftjaxSwigluSupports",
)


def native_info() -> dict[str, Any]:
    """Whether the SwiGLU kernels run on this machine.

    Returns:
      ``{"available": bool, "library": str | None, "runs": bool, "reason": str}``; ``runs`` is False without
      AVX-512 (XLA's formulation then runs).

    Example:
      >>> from oftjax import models
      >>> sorted(models.swiglu_native_info())
      ['available', 'library', 'reason', 'runs']
    """
    info = _KERNELS.info("sizes", range(1, 2))
    info["runs"] = bool(info.pop("sizes"))
    return info


def supports(dtype: Any) -> bool:
    """True when the kernels are loaded and run float32 operands on this machine."""
    return np.dtype(dtype) == np.float32 and _KERNELS.supports(1)


def swiglu_cpu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up`` for float32 operands of one shape; CPU only."""
    _KERNELS.require()
    call = jax.ffi.ffi_call(_FORWARD, jax.ShapeDtypeStruct(gate.shape, gate.dtype), vmap_method="sequential")
    return call(gate, up)


def swiglu_grad_cpu(gate: jax.Array, up: jax.Array, dh: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(d gate, d up)`` of ``swiglu_cpu`` for the cotangent ``dh``; CPU only."""
    _KERNELS.require()
    out = (jax.ShapeDtypeStruct(gate.shape, gate.dtype),) * 2
    return jax.ffi.ffi_call(_BACKWARD, out, vmap_method="sequential")(gate, up, dh)
