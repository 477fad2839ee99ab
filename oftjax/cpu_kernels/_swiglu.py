"""SwiGLU's ``silu(gate) * up`` on the CPU, forward and backward (``csrc/swiglu.cc``).

Replacement of the named operation ``swiglu`` (``oftjax.models._layers``) for float32 operands of one shape on
an AVX-512 machine. The same formulas as the pure-JAX formulation (torch's ``silu_backward`` for the
gradient) to float32 rounding: their exp is a polynomial (~1 ulp) where XLA has its own logistic.

Why: XLA:CPU evaluates the logistic 8 floats wide; 16 wide the activation costs about its memory traffic
(benchmarks/RESULTS.md has the figures).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from oftjax import _registry
from oftjax.cpu_kernels._library import Library
from oftjax.cpu_kernels._primitive import KernelOp

_FORWARD, _BACKWARD = "oftjax_swiglu", "oftjax_swiglu_grad"
LIBRARY = Library(
    "_swiglu_cpu",
    ((_FORWARD, "OftjaxSwiglu"), (_BACKWARD, "OftjaxSwigluGrad")),
    what="SwiGLU",
    supports_symbol="OftjaxSwigluSupports",
)


def supports(dtype: Any) -> bool:
    """True when the kernels run ``dtype`` operands on this machine."""
    return np.dtype(dtype) == np.float32 and LIBRARY.supports(1)


def _xla(gate: jax.Array, up: jax.Array) -> tuple[jax.Array]:
    return (_registry.default("swiglu")(gate, up),)


def swiglu_cpu(gate: jax.Array, up: jax.Array) -> tuple[jax.Array]:
    """``silu(gate) * up`` by the kernel (lowers for the CPU only)."""
    return (jax.ffi.ffi_call(_FORWARD, jax.ShapeDtypeStruct(gate.shape, gate.dtype))(gate, up),)


def swiglu_grad_cpu(gate: jax.Array, up: jax.Array, dh: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(d gate, d up)`` for the cotangent ``dh`` by the kernel."""
    out = (jax.ShapeDtypeStruct(gate.shape, gate.dtype),) * 2
    return tuple(jax.ffi.ffi_call(_BACKWARD, out)(gate, up, dh))


SWIGLU = KernelOp(
    "oftjax_swiglu", xla=_xla, cpu=swiglu_cpu, num_results=1, diff=(0, 1), cpu_bwd=swiglu_grad_cpu
)


def swiglu(gate: jax.Array, up: jax.Array) -> Any:
    """Replacement of ``oftjax.models``' ``swiglu``: the kernels for float32 operands of one shape."""
    if gate.shape != up.shape or gate.dtype != up.dtype or not supports(gate.dtype):
        return NotImplemented
    return SWIGLU(gate, up)[0]


OPERATIONS = {"swiglu": swiglu}
