"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p.

The order is transformers' (``generate`` with ``do_sample=True``): temperature, then top-k, then top-p, then
a categorical draw; ``temperature=0`` is greedy (``argmax``, the first of equal maxima, as torch). Everything
is static-shape and jit-able; the PRNG key is explicit, so the same key draws the same tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["SamplingConfig", "sample_logits"]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to decode (hashable: a static argument of the jitted decode).

    Attributes:
      max_new_tokens: tokens to generate per prompt at most (>= 1).
      temperature: 0 for greedy decoding, else the logits are divided by it before sampling.
      top_k: keep only the k most likely tokens (0: all).
      top_p: keep the smallest set of most likely tokens whose probabilities sum to at least top_p (1: all).
      eos_token_ids: a row stops after generating one of these (the checkpoint's ``generation_config.json``).
      pad_token_id: written after a row has stopped.

    Example:
      >>> SamplingConfig(max_new_tokens=8, temperature=0.7, top_p=0.9).greedy
      False
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1; got {self.max_new_tokens!r}")
        if not (self.temperature >= 0.0 and self.temperature < float("inf")):
            raise ValueError(f"temperature must be finite and >= 0 (0: greedy); got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: off); got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1: off); got {self.top_p!r}")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample_logits(logits: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
    """The next token of each row of ``logits [b, vocab]`` (computed in float32): int32 ``[b]``.

    Example:
      >>> sample_logits(jnp.array([[0.0, 2.0, 1.0]]), jax.random.key(0), SamplingConfig()).tolist()
      [1]
    """
    logits = logits.astype(jnp.float32)
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / jnp.float32(config.temperature)
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, config.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if config.top_p < 1.0:
        logits = _top_p(logits, config.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _top_p(logits: jax.Array, p: float) -> jax.Array:
    """Mask all but the smallest set of most likely tokens whose probabilities reach ``p`` (the most likely
    token always stays)."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
    keep_sorted = before < jnp.float32(p)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)
