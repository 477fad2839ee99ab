"""``OFTLinear``: named OFT adapters over a frozen float, int8 or 4-bit linear (PEFT's ``oft.layer.Linear``).

The wrapper holds its base layer as the child ``base_layer`` (PEFT's name), so the base's state keeps its
names below it (``<module>.base_layer.kernel``/``.bias`` for an ``nnx.Linear``, ``.base_layer.weight`` for a
quantized base), and adds ``oft_R[adapter]`` (an ``OFTParam`` ``[R, b(b-1)/2]``, PEFT's
``oft_R.<adapter>.weight``). The forward is PEFT's input-centric OFTv2 (reference: PEFT 0.21.2
``src/peft/tuners/oft/layer.py``)::

    y = base(x BD(R_a) BD(R_b) ...)      # active adapters in order, x cast to the adapter dtype and back

Where we differ from PEFT, on purpose:

* ``module_dropout`` works: in training (``deterministic=False``, nnx ``model.train()``), ``int(p * r)``
  random blocks become the identity on every call (PEFT builds this layer but never calls it since 0.16);
  ``model.eval()`` turns it off.
* with several adapters merged, the merge follows the forward order (see ``oftjax.merge``).
* rotate-the-input vs rotate-the-kernel is chosen from static shapes (``rotate="auto"``); both give the
  same values (within fp32 rounding) and the same gradients. The kernel side is the base's
  ``LinearBase.rotated_forward`` (``oftjax.nn._base``). A base whose forward quantizes its input
  (``Linear8bit`` in LLM.int8 mode, as bitsandbytes runs in eval) always gets the rotated input, whatever
  ``rotate`` says: rotating its weight would compute something else.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from oftjax.nn._adapters import OFTAdapters
from oftjax.nn._base import LinearBase, base_ops, quantizes_input
from oftjax.nn._forward import rotate_chain, rotation_from_vec
from oftjax.nn._settings import AdapterSettings

__all__ = ["ROTATE_MODES", "AdapterSettings", "OFTLinear", "rotation_from_vec"]

ROTATE_MODES = ("auto", "input", "weight")


class OFTLinear(OFTAdapters):
    """A frozen linear layer with named OFT adapters (PEFT's ``oft.layer.Linear``).

    Build it with ``OFTLinear(base)`` then ``add_adapter``, or let ``oftjax.surgery.apply_oft`` do both.

    Args:
      base: ``nnx.Linear``, ``Linear8bit``, ``Linear4bit`` or any layer implementing
        ``oftjax.nn.LinearBase``. It becomes the child ``base_layer`` (held, not copied).
      rotate: "input" rotates activations (``tokens * d_in * b``), "weight" rotates the kernel
        (``d_in * d_out * b``), "auto" (default) picks the cheaper one from static shapes. A base in
        LLM.int8 mode always gets the rotated input.

    Attributes:
      base_layer: the frozen base layer.
      oft_R: ``nnx.Dict`` adapter name -> ``OFTParam`` ``[R, b(b-1)/2]``.
      active_adapters: names applied in the forward, in order.
      merged_adapters: names folded into the base weight (most recent last).
      deterministic: True turns module_dropout off (``model.eval()`` sets it, ``model.train()`` clears it).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> layer = OFTLinear(nnx.Linear(8, 3, rngs=nnx.Rngs(0)))
      >>> layer.add_adapter("default", AdapterSettings(r=2, block_size=4))
      >>> x = jnp.ones((2, 8))
      >>> bool((layer(x) == layer.base_layer(x)).all())  # identity at init
      True
    """

    def __init__(self, base: nnx.Module, *, rotate: str = "auto"):
        if isinstance(base, OFTAdapters):
            raise TypeError(
                f"OFTLinear: the base layer is already an {type(base).__name__}; add an adapter to it instead"
            )
        if rotate not in ROTATE_MODES:
            raise ValueError(f"OFTLinear: rotate must be one of {ROTATE_MODES}; got {rotate!r}")
        if not isinstance(base_ops(base), LinearBase):
            raise TypeError(f"OFTLinear wraps a linear layer; {type(base).__name__} is not one (OFTEmbed?)")
        super().__init__(base)
        self.rotate = rotate

    # ----------------------------------------------------------------------------------------------------
    # forward (adapter management, rotation_blocks, delta_weight: ``OFTAdapters``)

    def uses_weight_path(self, x_shape: tuple[int, ...], names: Sequence[str]) -> bool:
        """Whether the forward rotates the kernel (else the inputs): from static shapes, never for a base that
        quantizes its input (``Linear8bit`` in LLM.int8 mode)."""
        if not names or quantizes_input(base_ops(self.base_layer)):
            return False
        if self.rotate != "auto":
            return self.rotate == "weight"
        tokens = 1
        for s in x_shape[:-1]:
            tokens *= int(s)
        # input path: tokens * d_in * b per adapter; weight path: d_in * d_out * b per adapter.
        return self.out_features < tokens

    def __call__(self, x: jax.Array) -> jax.Array:
        names = self.forward_adapters()
        if not names:
            return self.base_layer(x)
        rotations = tuple(self.rotation_blocks(n, training=True) for n in names)
        if self.uses_weight_path(x.shape, names):
            return base_ops(self.base_layer).rotated_forward(x, rotations)
        return self.base_layer(rotate_chain(x, rotations).astype(x.dtype))
