"""Causal (optionally windowed) attention over query blocks with a hand-written backward.

Without a padding mask, query block ``[i0, i1)`` never attends to a key at or past ``i1``, so the scores are
computed block by block over keys ``[0, i1)`` only (``blocks`` query blocks): about half of the ``seq^2``
work and memory of the full score matrix is skipped. Plain autodiff of that blocked forward is slow on
XLA:CPU: every block's ``dq``/``dk``/``dv`` is padded back to the full length and the padded copies are summed
(8 blocks: 8 full-size arrays per gradient). The custom VJP here writes ``dq`` block by block into one
concatenation and accumulates ``dk``/``dv`` in place (``.at[:, :, :e].add``), from the softmax probabilities
the forward saves (the same residual autodiff keeps). Same products, same softmax backward
(``ds = p * (dp - sum(dp * p))``) in float32, so the gradients equal autodiff's up to summation order.

Layout: heads-major ``q [b, kv, groups, s, d]`` (query head ``h`` uses kv head ``h // groups``, HF's
``repeat_kv``) and ``k, v [b, kv, s, d]``, so every product is one batched matmul over ``(b, kv)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["causal_attention"]


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


def _scores(q_i: jax.Array, k_e: jax.Array, scale: float | None) -> jax.Array:
    s = jnp.einsum("bkgqd,bktd->bkgqt", q_i, k_e)
    return s if scale is None else s * jnp.asarray(scale, s.dtype)


def _forward(q, k, v, scale, window, blocks):
    outs, probs = [], []
    for i0, i1 in _bounds(q.shape[3], blocks):
        s = _scores(q[:, :, :, i0:i1], k[:, :, :i1], scale)
        s = jnp.where(_block_mask(i0, i1, window), s.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
        probs.append(p)
        outs.append(jnp.einsum("bkgqt,bktd->bkgqd", p, v[:, :, :i1]))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out, tuple(probs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    scale: float | None = None,
    window: int | None = None,
    blocks: int = 1,
) -> jax.Array:
    """``softmax(q k^T * scale + causal mask) v`` per (batch, kv head, group), in query blocks.

    Args:
      q: ``[b, kv, groups, s, d]`` queries (already scaled when ``scale`` is None).
      k, v: ``[b, kv, s, d]``.
      scale: multiply the scores by this (in the compute dtype) after the product; None: not at all.
      window: sliding window (keys ``k > q - window`` only), None for plain causal.
      blocks: number of query blocks (static); 1 computes the full ``[s, s]`` score matrix.

    Returns:
      ``[b, kv, groups, s, d]`` in ``q.dtype``; scores and softmax in float32, probabilities cast back to
      ``q.dtype`` before the product with ``v`` (HF's eager attention).

    Example:
      >>> q = jnp.ones((1, 1, 2, 4, 8)); k = v = jnp.ones((1, 1, 4, 8))
      >>> causal_attention(q, k, v, blocks=2).shape
      (1, 1, 2, 4, 8)
    """
    return _forward(q, k, v, scale, window, blocks)[0]


def _fwd(q, k, v, scale, window, blocks):
    out, probs = _forward(q, k, v, scale, window, blocks)
    return out, (q, k, v, probs)


def _bwd(scale, window, blocks, res, g):
    q, k, v, probs = res
    dq_parts = []
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for (i0, i1), p in zip(_bounds(q.shape[3], blocks), probs, strict=True):
        g_i = g[:, :, :, i0:i1].astype(q.dtype)
        dv = dv.at[:, :, :i1].add(jnp.einsum("bkgqt,bkgqd->bktd", p, g_i).astype(jnp.float32))
        dp = jnp.einsum("bkgqd,bktd->bkgqt", g_i, v[:, :, :i1]).astype(jnp.float32)
        p32 = p.astype(jnp.float32)
        ds = p32 * (dp - jnp.sum(dp * p32, axis=-1, keepdims=True))
        if scale is not None:
            ds = ds * jnp.float32(scale)
        ds = ds.astype(q.dtype)
        dq_parts.append(jnp.einsum("bkgqt,bktd->bkgqd", ds, k[:, :, :i1]))
        dk = dk.at[:, :, :i1].add(jnp.einsum("bkgqt,bkgqd->bktd", ds, q[:, :, :, i0:i1]).astype(jnp.float32))
    dq = dq_parts[0] if len(dq_parts) == 1 else jnp.concatenate(dq_parts, axis=3)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


causal_attention.defvjp(_fwd, _bwd)
