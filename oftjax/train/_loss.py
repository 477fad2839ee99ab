"""Causal language-modelling loss with a token mask (shifted labels, fp32 log-softmax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["causal_lm_loss", "causal_lm_loss_sum"]


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
