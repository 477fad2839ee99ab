"""A static-shape key/value cache for decoding: every layer's keys and values for ``max_len`` slots.

Generation writes the prompt's keys and values into slots ``[0, P)`` (prefill), then one slot per new token.
All rows of a batch advance together (prompts are left-padded to one length), so one scalar ``length`` says
where the next write goes, and ``key_mask`` which slots hold a real token (left padding does not). The
shapes never change while decoding, so a jitted decode step compiles once per batch size and ``max_len``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oftjax.models._config import ModelConfig

__all__ = ["KVCache"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every decoder layer (after RoPE), for ``max_len`` slots.

    Invariants:
      * ``keys[i]``, ``values[i]``: ``[batch, max_len, kv_heads, head_dim]`` in the compute dtype; slots at
        and after ``length`` hold zeros or stale values that no query attends to.
      * ``key_mask``: bool ``[batch, max_len]``, True where the slot holds a real (not padding) token.
      * ``length``: int32 scalar, the number of slots written (the next token's slot).

    Example:
      >>> cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
      ...     num_attention_heads=2, num_key_value_heads=1, head_dim=4)
      >>> cache = KVCache.create(cfg, batch=3, max_len=16, dtype=jnp.float32)
      >>> cache.max_len, len(cache.keys), cache.nbytes
      (16, 2, 3124)
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    key_mask: jax.Array
    length: jax.Array

    @classmethod
    def create(cls, config: ModelConfig, *, batch: int, max_len: int, dtype: Any) -> KVCache:
        """An empty cache (zeros, no slot written) for ``batch`` rows of ``max_len`` slots."""
        shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
        return cls(
            keys=zeros,
            values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers)),
            key_mask=jnp.zeros((batch, max_len), jnp.bool_),
            length=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return int(self.key_mask.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's arrays."""
        return int(sum(np.dtype(a.dtype).itemsize * a.size for a in jax.tree.leaves(self)))
