"""A tiny NNX causal LM with OFTParam variables, for tests of the generic training machinery."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oftjax.nn import OFTParam


class TinyLM(nnx.Module):
    """Embed -> (scaled by 1 + OFT vector) -> tanh(Linear) -> Linear head; kernels carry fsdp metadata."""

    def __init__(self, vocab: int = 32, dim: int = 16, *, seed: int = 0):
        rngs = nnx.Rngs(seed)
        meta = {"sharding_names": ("fsdp", None), "eager_sharding": False}
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)
        self.proj.kernel.set_metadata(**meta)
        self.head = nnx.Linear(dim, vocab, rngs=rngs)
        self.head.kernel.set_metadata(**meta)
        self.scale = OFTParam(0.1 * jax.random.normal(jax.random.key(seed + 1), (dim,)))

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        h = self.embed(input_ids) * (1.0 + self.scale[...])
        # a causal mixing term (cumulative mean) so positions interact as in a real LM
        counts = jnp.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        h = h + jnp.cumsum(h, axis=1) / counts
        return self.head(jnp.tanh(self.proj(h)))


def random_batch(n: int = 8, seq: int = 12, vocab: int = 32, *, seed: int = 0, ragged: bool = True) -> dict:
    """int32 ids and a loss mask with different numbers of valid tokens per row (when ``ragged``)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(n, seq)).astype(np.int32)
    mask = np.ones((n, seq), bool)
    if ragged:
        for i in range(n):
            mask[i, seq - (i % 5) * 2 :] = False
    return {"input_ids": ids, "loss_mask": mask}
