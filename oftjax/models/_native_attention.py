"""The native CPU kernels for causal attention, forward and backward (``csrc/attention.cc``), via jax.ffi.

``fused_causal_attention`` runs them: float32 q/k/v in the projections' ``[b, s, heads, d]`` layout, grouped
kv heads, rotary embeddings applied inside (q and k rotated on the fly), causal with an optional sliding
window, head dim a multiple of 16 up to 128, on an AVX-512 CPU (``supports``). The forward saves only the
output and the per-row log-sum-exp; the backward recomputes the probabilities tile by tile (no ``[s, s]``
matrix is kept). ``Attention`` uses it for unpadded batches when JAX's default backend is the CPU; otherwise
(GPU/TPU, bf16, padding masks, other head dims) the blocked XLA path of ``oftjax.models._attention`` runs.
The two agree to float32 rounding (tests/models/test_native_attention.py). ``OFTJAX_NATIVE=0`` turns the
kernels off.

Why they exist: XLA:CPU ran the attention of a train step (with RoPE) as ~80 small ops per layer and it cost
~15% of the step; the kernels keep 32 query rows' scores in cache and read q/k/v in place
(benchmarks/bench_layer.py times both paths against torch's SDPA).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oftjax import _ffi

_FORWARD = "oftjax_attention"
_BACKWARD = "oftjax_attention_grad"
_KERNELS = _ffi.Kernels(
    Path(__file__).parent,
    "_attention_cpu",
    ((_FORWARD, "OftjaxAttention"), (_BACKWARD, "OftjaxAttentionGrad")),
    what="attention",
    supports_symbol="OftjaxAttentionSupports",
)


def native_info() -> dict[str, Any]:
    """Whether the attention kernels run on this machine, and for which head dims.

    Returns:
      ``{"available": bool, "library": str | None, "head_dims": list[int], "reason": str}``; ``head_dims``
      is empty without AVX-512.

    Example:
      >>> from oftjax import models
      >>> sorted(models.attention_native_info())
      ['available', 'head_dims', 'library', 'reason']
    """
    return _KERNELS.info("head_dims", range(1, 257))


def supports(head_dim: int, dtype: Any) -> bool:
    """True when the kernels are loaded and run float32 attention with this head dim on this machine."""
    return np.dtype(dtype) == np.float32 and _KERNELS.supports(head_dim)


def _attrs(scale: float, window: int | None, rope: bool) -> dict[str, Any]:
    return {"scale": np.float32(scale), "window": np.int64(window or 0), "rope": bool(rope)}


def fused_causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    scale: float,
    window: int | None = None,
    *,
    cos: jax.Array | None = None,
    sin: jax.Array | None = None,
) -> jax.Array:
    """``softmax(scale * rope(q) rope(k)^T + causal mask) v`` per query head; CPU only (see ``supports``).

    Args:
      q: ``[b, s, heads, d]`` float32.
      k, v: ``[b, s, kv_heads, d]``; query head ``h`` attends with kv head ``h // (heads // kv_heads)``.
      scale: multiplies the float32 scores after the product (HF's ``* self.scaling``).
      window: sliding window (keys ``j > i - window`` only), None for plain causal.
      cos, sin: rotary tables ``[b, s, d]`` (``oftjax.models._rope.rope_cos_sin``): q and k are rotated by
        them first, exactly HF's ``apply_rotary_pos_emb``, inside the kernels; None (both): no rotation.
        They get no gradient.

    Returns:
      ``[b, s, heads, d]`` float32.
    """
    _KERNELS.require()
    if (cos is None) != (sin is None):
        raise ValueError("fused_causal_attention: pass both cos and sin, or neither")
    rope = cos is not None
    if not rope:
        cos = sin = jnp.zeros((0,), jnp.float32)
    return _attention(q, k, v, cos.astype(jnp.float32), sin.astype(jnp.float32), scale, window, rope)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, cos, sin, scale, window, rope):
    return _forward(q, k, v, cos, sin, scale, window, rope)[0]


def _forward(q, k, v, cos, sin, scale, window, rope):
    b, s, h, _ = q.shape
    out = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, s), jnp.float32))
    call = jax.ffi.ffi_call(_FORWARD, out, vmap_method="sequential")
    return call(q, k, v, cos, sin, **_attrs(scale, window, rope))


def _fwd(q, k, v, cos, sin, scale, window, rope):
    o, lse = _forward(q, k, v, cos, sin, scale, window, rope)
    return o, (q, k, v, cos, sin, lse)


def _bwd(scale, window, rope, res, g):
    q, k, v, cos, sin, lse = res
    out = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v))
    call = jax.ffi.ffi_call(_BACKWARD, out, vmap_method="sequential")
    dq, dk, dv = call(q, k, v, cos, sin, lse, g.astype(q.dtype), **_attrs(scale, window, rope))
    return dq, dk, dv, jnp.zeros_like(cos), jnp.zeros_like(sin)


_attention.defvjp(_fwd, _bwd)
