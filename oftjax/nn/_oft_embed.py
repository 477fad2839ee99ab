"""``OFTEmbed``: named OFT adapters over a frozen ``nnx.Embed`` (PEFT's ``oft.layer.Embedding``, >= 0.19).

The wrapper holds the base as its child ``base_layer`` (PEFT's name; its table is
``<module>.base_layer.embedding`` ``[num_embeddings, d]``, PEFT's ``<module>.base_layer.weight``) and adds
``oft_embedding_R[adapter]`` (an ``OFTParam`` ``[R, b(b-1)/2]`` over ``d``, PEFT's
``oft_embedding_R.<adapter>.weight``). Unlike a linear, the rotation acts on the OUTPUT (reference: PEFT
0.21.2 ``src/peft/tuners/oft/layer.py`` class ``Embedding``)::

    y = emb(ids) BD(R_a) BD(R_b) ...     # row vectors times blocks; active adapters in order
    merge:   W' = W BD(R_a) BD(R_b)      # W = the table [num_embeddings, d]; same order as the forward
    unmerge: W  = W' BD(R_b)^-1 BD(R_a)^-1

PEFT merges several embedding adapters in forward order already (its linear merge is the one in the wrong
order). ``module_dropout`` works in training, as in ``OFTLinear``; ``attend`` (tied output heads) uses the
base table, as PEFT's tied ``lm_head`` does (it sees the rotation only once merged).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from oftjax.nn._adapters import OFTAdapters
from oftjax.nn._forward import rotate_chain

__all__ = ["OFTEmbed"]


class OFTEmbed(OFTAdapters):
    """A frozen ``nnx.Embed`` with named OFT adapters rotating its output (PEFT's ``oft.layer.Embedding``).

    Build it with ``OFTEmbed(base)`` then ``add_adapter``, or let ``oftjax.surgery.apply_oft`` do both when
    ``target_modules`` names the embedding (PEFT targets embeddings only when named).

    Args:
      base: an ``nnx.Embed``. It becomes the child ``base_layer`` (held, not copied).

    Attributes:
      base_layer: the frozen ``nnx.Embed``.
      oft_embedding_R: ``nnx.Dict`` adapter name -> ``OFTParam`` ``[R, b(b-1)/2]``.
      in_features: the rotated dimension ``d`` (``features``; PEFT's ``in_features`` = ``embedding_dim``).
      active_adapters, merged_adapters, deterministic: as in ``OFTLinear``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from oftjax.nn import AdapterSettings
      >>> layer = OFTEmbed(nnx.Embed(10, 8, rngs=nnx.Rngs(0)))
      >>> layer.add_adapter("default", AdapterSettings(r=2, block_size=4))
      >>> ids = jnp.array([[1, 2, 3]])
      >>> bool((layer(ids) == layer.base_layer(ids)).all())  # identity at init
      True
    """

    PARAM_NAME = "oft_embedding_R"
    ROTATES_OUTPUT = True

    def __init__(self, base: nnx.Module):
        if isinstance(base, OFTAdapters):
            raise TypeError(
                f"OFTEmbed: the base layer is already an {type(base).__name__}; add an adapter to it instead"
            )
        if not isinstance(base, nnx.Embed):
            raise TypeError(f"OFTEmbed wraps an nnx.Embed; got {type(base).__name__}")
        super().__init__(base)

    def attend(self, query: jax.Array, out_sharding: Any = None) -> jax.Array:
        """The base ``nnx.Embed.attend`` (unrotated table, as PEFT's tied output layer)."""
        return self.base_layer.attend(query, out_sharding=out_sharding)

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        y = self.base_layer(inputs, out_sharding=out_sharding)
        names = self.forward_adapters()
        if not names:
            return y
        # Rotate the looked-up rows (tokens * d * b), not the table (vocab * d * b; vocab >> tokens).
        rotations = tuple(self.rotation_blocks(n, training=True) for n in names)
        return rotate_chain(y, rotations).astype(y.dtype)
