"""Grouped-query attention as transformers' eager path computes it: scores, float32 softmax, probabilities
cast back to the compute dtype, then the product with the values.

* ``causal_attention``: no padding, the mask is causal (optionally a sliding window), RoPE applied to q and k
  inside. Query block ``[i0, i1)`` never attends to a key at or past ``i1``, so the scores are computed block
  by block over keys ``[0, i1)`` only (``CAUSAL_BLOCKS`` query blocks): about half of the ``seq^2`` work and
  memory of the full score matrix is skipped. The skipped keys would get probability exactly 0, so the values
  are the same up to summation order. A named operation (``oftjax._registry``): ``oftjax.cpu_kernels``
  replaces it on the CPU by a fused kernel.
* ``masked_attention``: any boolean mask ``[b, q, k]`` (padding, packed examples): the full score matrix, as
  HF (a fully masked query row is uniform over all keys there, and here).
* ``softcapped_causal_attention``: Gemma 2's causal attention with soft-capped scores
  (``cap * tanh(scores / cap)`` before the mask), block by block like ``causal_attention`` but plain JAX and
  not a named operation: a kernel replacing ``causal_attention`` computes plain attention only.
  ``masked_attention`` takes the same ``softcap``.

Both are plain JAX with ordinary autodiff. Layout inside: heads-major ``q [b, kv, groups, s, d]`` (query head
``h`` uses kv head ``h // groups``, HF's ``repeat_kv``) and ``k, v [b, kv, s, d]``, so every product is one
batched matmul over ``(b, kv)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from oftjax._registry import operation
from oftjax.models._layers import soft_cap
from oftjax.models._rope import apply_rope

__all__ = ["CAUSAL_BLOCKS", "causal_attention", "masked_attention", "softcapped_causal_attention"]

# query blocks of the causal path: 64-row blocks at seq 256, 5/8 of the full score work, larger matmuls than 8
CAUSAL_BLOCKS = 4


def _bounds(s: int, blocks: int) -> list[tuple[int, int]]:
    b = [round(s * i / blocks) for i in range(blocks + 1)]
    return list(zip(b[:-1], b[1:], strict=True))


def _block_mask(i0: int, i1: int, window: int | None) -> np.ndarray:
    # transformers' causal (and sliding-window) mask for query rows [i0, i1) over keys [0, i1).
    q = np.arange(i0, i1)[:, None]
    k = np.arange(i1)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return allowed


def _heads_major(q: jax.Array, k: jax.Array, v: jax.Array, scale: float):
    """``[b, s, heads, d]`` projections -> heads-major layout, q pre-scaled when that is exact.

    Returns ``(q, k, v, score_scale)``: scaling q by a power of two before the product gives the same bits as
    scaling the scores after it (HF's ``matmul(q, k^T) * scaling``); otherwise ``score_scale`` is applied to
    the scores.
    """
    b, s, heads, d = q.shape
    kv = k.shape[2]
    if math.frexp(scale)[0] == 0.5:
        q, score_scale = q * jnp.asarray(scale, q.dtype), None
    else:
        score_scale = scale
    q = q.reshape(b, s, kv, heads // kv, d).transpose(0, 2, 3, 1, 4)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), score_scale


def _scores(q: jax.Array, k: jax.Array, scale: float | None, softcap: float | None = None) -> jax.Array:
    s = jnp.einsum("bkgqd,bktd->bkgqt", q, k)
    s = s if scale is None else s * jnp.asarray(scale, s.dtype)
    if softcap is None:
        return s
    return soft_cap(s, softcap)  # transformers' Gemma 2: in the scores' dtype, before the mask


def _softmax_values(scores: jax.Array, allowed: jax.Array | np.ndarray, v: jax.Array) -> jax.Array:
    scores = jnp.where(allowed, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgqt,bktd->bkgqd", p, v)


def _to_projection_layout(out: jax.Array) -> jax.Array:
    # [b, kv, groups, s, d] -> [b, s, heads, d]
    b, kv, g, s, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, kv * g, d)


@operation("causal_attention")
def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cos: jax.Array | None,
    sin: jax.Array | None,
    *,
    scale: float,
    window: int | None = None,
) -> jax.Array:
    """Causal self-attention with rotary embeddings: ``softmax(rope(q) rope(k)^T * scale + mask) v``.

    Args:
      q: ``[b, s, heads, d]``.
      k, v: ``[b, s, kv_heads, d]``; query head ``h`` attends with kv head ``h // (heads // kv_heads)``.
      cos, sin: rotary tables ``[b, s, d]`` (``oftjax.models._rope.rope_cos_sin``), or both None (no RoPE).
      scale: multiplies the scores (HF's ``scaling``).
      window: sliding window (keys ``j > i - window`` only), None for plain causal.

    Returns:
      ``[b, s, heads, d]`` in ``q.dtype``.

    Example:
      >>> q = jnp.ones((1, 4, 2, 8)); k = v = jnp.ones((1, 4, 1, 8))
      >>> causal_attention(q, k, v, None, None, scale=8**-0.5).shape
      (1, 4, 2, 8)
    """
    if (cos is None) != (sin is None):
        raise ValueError("causal_attention: pass both cos and sin, or neither")
    if cos is not None:
        with jax.named_scope("rope"):
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return _blocked_causal(q, k, v, scale, window, None)


def softcapped_causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, window: int | None, softcap: float
) -> jax.Array:
    """``causal_attention`` of (already rotated) q/k with soft-capped scores ``softcap * tanh(s / softcap)``
    (transformers' Gemma 2). Plain JAX, not a named operation. Shapes as ``causal_attention``.

    Example:
      >>> q = jnp.ones((1, 4, 2, 8)); k = v = jnp.ones((1, 4, 1, 8))
      >>> softcapped_causal_attention(q, k, v, scale=0.25, window=None, softcap=50.0).shape
      (1, 4, 2, 8)
    """
    return _blocked_causal(q, k, v, scale, window, softcap)


def _blocked_causal(q, k, v, scale: float, window: int | None, softcap: float | None) -> jax.Array:
    # query block [i0, i1) over keys [0, i1) only: the skipped keys would get probability exactly 0
    q, k, v, score_scale = _heads_major(q, k, v, scale)
    s = q.shape[3]
    blocks = min(CAUSAL_BLOCKS, max(1, s // 32))
    outs = []
    for i0, i1 in _bounds(s, blocks):
        scores = _scores(q[:, :, :, i0:i1], k[:, :, :i1], score_scale, softcap)
        outs.append(_softmax_values(scores, _block_mask(i0, i1, window), v[:, :, :i1]))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return _to_projection_layout(out)


def masked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float, softcap: float | None = None
) -> jax.Array:
    """Attention of (already rotated) ``q [b, s, heads, d]`` over ``k, v [b, s, kv, d]`` under a boolean
    ``mask [b, s, s]`` (True: may attend), the full score matrix; scores soft-capped by ``softcap`` when
    given (before the mask, as transformers). Returns ``[b, s, heads, d]``."""
    q, k, v, score_scale = _heads_major(q, k, v, scale)
    scores = _scores(q, k, score_scale, softcap)
    return _to_projection_layout(_softmax_values(scores, mask[:, None, None], v))
