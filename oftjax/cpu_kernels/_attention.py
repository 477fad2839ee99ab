"""Causal attention with RoPE on the CPU, forward and backward (``csrc/attention.cc``).

Replacement of the named operation ``causal_attention`` (``oftjax.models._attention``) for float32 q/k/v in
the projections' ``[b, s, heads, d]`` layout with grouped kv heads, RoPE applied inside (q and k rotated on
the fly), causal with an optional sliding window, head dims a multiple of 16 up to 128, on an AVX-512 CPU.
The forward saves only the output and the per-row log-sum-exp; the backward recomputes the probabilities
tile by tile (no ``[s, s]`` matrix is kept). Agrees with the pure-JAX formulation to float32 rounding.

Why: XLA:CPU runs a train step's attention (with RoPE) as ~80 small ops per layer; the kernels keep 32 query
rows' scores in cache and read q/k/v in place (benchmarks/RESULTS.md has the figures).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oftjax import _registry
from oftjax.cpu_kernels._library import Library
from oftjax.cpu_kernels._primitive import KernelOp

_FORWARD, _BACKWARD = "oftjax_attention", "oftjax_attention_grad"
LIBRARY = Library(
    "_attention_cpu",
    ((_FORWARD, "OftjaxAttention"), (_BACKWARD, "OftjaxAttentionGrad")),
    what="attention",
    supports_symbol="OftjaxAttentionSupports",
)


def supports(head_dim: int, dtype: Any) -> bool:
    """True when the kernels run ``dtype`` attention with this head dim on this machine."""
    return np.dtype(dtype) == np.float32 and LIBRARY.supports(head_dim)


def _attrs(scale: float, window: int | None, rope: bool) -> dict[str, Any]:
    return {"scale": np.float32(scale), "window": np.int64(window or 0), "rope": bool(rope)}


def _xla(q, k, v, cos, sin, *, scale, window, rope) -> tuple[jax.Array, jax.Array]:
    fn = _registry.default("causal_attention")
    o = fn(q, k, v, cos if rope else None, sin if rope else None, scale=scale, window=window)
    # the log-sum-exp is read only by the CPU backward kernel; elsewhere the backward is JAX's own
    b, s, h, _ = q.shape
    return o, jnp.zeros((b, h, s), jnp.float32)


def _cpu(q, k, v, cos, sin, *, scale, window, rope) -> tuple[jax.Array, jax.Array]:
    b, s, h, _ = q.shape
    out = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, s), jnp.float32))
    return tuple(jax.ffi.ffi_call(_FORWARD, out)(q, k, v, cos, sin, **_attrs(scale, window, rope)))


def _cpu_bwd(q, k, v, cos, sin, lse, g, *, scale, window, rope):
    out = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v))
    return tuple(jax.ffi.ffi_call(_BACKWARD, out)(q, k, v, cos, sin, lse, g, **_attrs(scale, window, rope)))


ATTENTION = KernelOp(
    "oftjax_causal_attention", xla=_xla, cpu=_cpu, num_results=1, diff=(0, 1, 2), cpu_bwd=_cpu_bwd
)


def causal_attention(q, k, v, cos, sin, *, scale: float, window: int | None = None) -> Any:
    """Replacement of ``oftjax.models._attention.causal_attention``: the kernels for float32 operands with a
    supported head dim; cos/sin (``[b, s, d]``) get no derivative through the kernels."""
    if not all(a.dtype == np.float32 for a in (q, k, v)) or not supports(q.shape[-1], q.dtype):
        return NotImplemented
    if window is not None and window < 1:  # the kernel reads 0 as "no window": leave it to the default
        return NotImplemented
    rope = cos is not None
    if rope:
        cos, sin = cos.astype(jnp.float32), sin.astype(jnp.float32)
    else:
        cos = sin = jnp.zeros((0,), jnp.float32)
    window = None if window is None else int(window)
    return ATTENTION(q, k, v, cos, sin, scale=float(scale), window=window, rope=rope)[0]


OPERATIONS = {"causal_attention": causal_attention}
