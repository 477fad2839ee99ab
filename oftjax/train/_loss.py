"""Causal language-modelling loss with a token mask (shifted labels, fp32 log-softmax), from logits or fused
with a matrix output head in chunks (``head_loss_sum``: the trainer's path for ``CausalLM``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from oftjax.models._layers import soft_cap

__all__ = ["causal_lm_loss", "causal_lm_loss_sum", "head_chunk_rows", "head_loss_sum"]


def causal_lm_loss_sum(
    logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy and the number of predicted tokens.

    Position t predicts token t+1; a prediction counts when ``loss_mask[:, t+1]`` is set (the target is a real
    token). The log-softmax runs in float32 whatever the logits dtype, so bf16 compute keeps an fp32 loss.

    Args:
      logits: ``[batch, seq, vocab]``, any float dtype.
      input_ids: int ``[batch, seq]``.
      loss_mask: bool or 0/1 ``[batch, seq]``; None counts every target.

    Returns:
      ``(loss_sum float32 [], count float32 [])``; the mean is ``loss_sum / max(count, 1)``.

    Example:
      >>> s, n = causal_lm_loss_sum(jnp.zeros((1, 3, 4)), jnp.array([[0, 1, 2]]))
      >>> float(s / n)  # uniform over 4 classes: log 4
      1.3862943649291992
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = input_ids[:, 1:]
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = logz - picked
    if loss_mask is None:
        mask = jnp.ones(targets.shape, jnp.float32)
    else:
        mask = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def causal_lm_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy over the masked-in targets (0 when there are none).

    Example:
      >>> float(causal_lm_loss(jnp.zeros((1, 3, 4)), jnp.array([[0, 1, 2]])))
      1.3862943649291992
    """
    total, count = causal_lm_loss_sum(logits, input_ids, loss_mask)
    return total / jnp.maximum(count, 1.0)


# Bytes of float32 logits one chunk of the fused head + loss may hold (rows x vocabulary x 4).
_CHUNK_BYTES = 128 * 2**20


def head_chunk_rows(vocab: int, rows: int) -> int:
    """Rows per chunk of ``head_loss_sum``: a power of two whose float32 logits fit in 128 MiB (at least 16
    rows, so each chunk is still a matrix product), and no more rows than there are. Fewer, larger chunks run
    the head's products at a better rate on the CPU (benchmarks/RESULTS.md, "Output head and loss in
    chunks"); a chunk holds its logits and their gradient, so the bound is also the memory it costs.

    Example:
      >>> head_chunk_rows(49152, 1024), head_chunk_rows(2048, 1024), head_chunk_rows(256000, 4096)
      (512, 1024, 128)
    """
    fit = max(16, _CHUNK_BYTES // (4 * vocab))
    return min(1 << (fit.bit_length() - 1), rows)


def head_loss_sum(
    hidden: jax.Array,
    table: jax.Array,
    input_ids: jax.Array,
    loss_mask: jax.Array | None = None,
    *,
    softcap: float | None = None,
    chunk_rows: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``causal_lm_loss_sum(head(hidden), ...)`` for a matrix head, never holding ``[batch, seq, vocab]``.

    The head is ``hidden @ table.T`` in ``hidden``'s dtype, then ``softcap * tanh(. / softcap)`` when given
    (Gemma 2); the log-softmax runs in float32, as in ``causal_lm_loss_sum``. Positions are taken in chunks of
    ``chunk_rows`` (``head_chunk_rows``): a chunk's logits live only while its loss is computed. Under
    differentiation each chunk also computes its gradient right away (softmax minus the one-hot target, times
    the mask, back through the head), so the backward pass only scales the stored gradients: no logits are
    kept for it and no head product is recomputed. The gradient for ``table`` is accumulated only when
    ``table`` is differentiated (a frozen table costs nothing extra).

    Same values as the unfused loss up to float32 summation order (tests/train/test_loss.py).

    Args:
      hidden: final hidden states ``[batch, seq, dim]`` (after the final norm).
      table: the head ``[vocab, dim]`` (a tied embedding table or ``lm_head``'s weight), any float dtype; it
        is cast to ``hidden``'s dtype once.
      input_ids: int ``[batch, seq]``.
      loss_mask: bool or 0/1 ``[batch, seq]``; None counts every target.
      softcap: the final logit soft-cap, or None.
      chunk_rows: positions per chunk; default ``head_chunk_rows(vocab, batch * seq)``.

    Returns:
      ``(loss_sum float32 [], count float32 [])``, as ``causal_lm_loss_sum``.

    Example:
      >>> h, table = jnp.zeros((1, 3, 2)), jnp.ones((4, 2))
      >>> s, n = head_loss_sum(h, table, jnp.array([[0, 1, 2]]))
      >>> float(s / n)  # uniform over 4 classes: log 4
      1.3862943649291992
    """
    b, t, d = hidden.shape
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros((b, 1), input_ids.dtype)], axis=1)
    mask = jnp.ones((b, t - 1), jnp.float32) if loss_mask is None else loss_mask[:, 1:].astype(jnp.float32)
    # the last position predicts nothing
    mask = jnp.concatenate([mask, jnp.zeros((b, 1), jnp.float32)], axis=1)
    n = b * t
    rows = head_chunk_rows(table.shape[0], n) if chunk_rows is None else min(chunk_rows, n)
    pad = -n % rows
    h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0)))
    targets = jnp.pad(targets.reshape(n).astype(jnp.int32), (0, pad))
    mask = jnp.pad(mask.reshape(n), (0, pad))
    total = _head_nll(softcap, rows, h, table.astype(hidden.dtype), targets, mask)
    return total, jnp.sum(mask)


def _chunk_logits(h: jax.Array, table: jax.Array, softcap: float | None) -> jax.Array:
    with jax.named_scope("gemm"):  # a profile label (benchmarks/profile_train.py), as CausalLM.logits
        out = h @ table.T
    return out if softcap is None else soft_cap(out, softcap)


def _chunk_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-row ``logsumexp - picked`` in float32, with ``exp(z - max z)`` and its row sums (one exp pass: the
    gradient reuses them)."""
    z = logits.astype(jnp.float32)
    zmax = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.exp(z - zmax)
    s = jnp.sum(e, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(z, targets[:, None], axis=-1)[:, 0]
    return (jnp.log(s) + zmax)[:, 0] - picked, e, s


def _split(x: jax.Array, rows: int) -> jax.Array:
    return x.reshape(x.shape[0] // rows, rows, *x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _head_nll(softcap, rows, h, table, targets, mask):
    def body(total, xs):
        hc, tc, mc = xs
        nll, _, _ = _chunk_nll(_chunk_logits(hc, table, softcap), tc)
        return total + jnp.sum(nll * mc), None

    xs = (_split(h, rows), _split(targets, rows), _split(mask, rows))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total


def _head_nll_fwd(softcap, rows, h, table, targets, mask):
    want_table = table.perturbed
    h, table, targets, mask = h.value, table.value, targets.value, mask.value

    def body(carry, xs):
        total, d_table = carry
        hc, tc, mc = xs
        logits = _chunk_logits(hc, table, softcap)
        nll, e, sums = _chunk_nll(logits, tc)
        # d(sum nll * mask)/dz = (softmax(z) - onehot(target)) * mask in float32, then the head's dtype; the
        # one-hot part is a scatter into the target column (no [rows, vocab] one-hot array)
        dz = e * (mc[:, None] / sums)
        dz = dz.at[jnp.arange(dz.shape[0]), tc].add(-mc).astype(logits.dtype)
        if softcap is not None:  # d(c tanh(x / c))/dx = 1 - tanh(x / c)^2, with tanh(x / c) = logits / c
            th = logits / jnp.asarray(softcap, logits.dtype)
            dz = dz * (1 - th * th)
        with jax.named_scope("gemm"):
            dh = dz @ table
        if want_table:
            d_table = d_table + (dz.T @ hc).astype(jnp.float32)
        return (total + jnp.sum(nll * mc), d_table), dh

    d_table0 = jnp.zeros(table.shape, jnp.float32) if want_table else None
    xs = (_split(h, rows), _split(targets, rows), _split(mask, rows))
    (total, d_table), dh = jax.lax.scan(body, (jnp.zeros((), jnp.float32), d_table0), xs)
    d_table = None if d_table is None else d_table.astype(table.dtype)
    return total, (dh.reshape(h.shape), d_table)


def _head_nll_bwd(softcap, rows, res, g):
    dh, d_table = res
    return (
        (g * dh.astype(jnp.float32)).astype(dh.dtype),
        None if d_table is None else (g * d_table.astype(jnp.float32)).astype(d_table.dtype),
        None,
        None,
    )


_head_nll.defvjp(_head_nll_fwd, _head_nll_bwd, symbolic_zeros=True)
