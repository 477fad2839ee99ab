"""``OFTLinear``: named OFT adapters over a frozen float, int8 or 4-bit linear (PEFT's ``oft.layer.Linear``).

The wrapper adopts the base layer's state under the base's own attribute names (``kernel``/``bias`` for a
float base, ``weight``/``bias`` for a quantized one), so a checkpoint maps onto it exactly as onto the base,
and adds ``oft_R[adapter]`` (an ``OFTParam`` ``[R, b(b-1)/2]``, PEFT's ``oft_R.<adapter>.weight``). The
forward is PEFT's input-centric OFTv2 (reference: PEFT 0.21.2 ``src/peft/tuners/oft/layer.py``)::

    y = base(x BD(R_a) BD(R_b) ...)      # active adapters in order, x cast to the adapter dtype and back

Where we differ from PEFT, on purpose:

* ``module_dropout`` works: in training (``deterministic=False``, nnx ``model.train()``), ``int(p * r)``
  random blocks become the identity on every call (PEFT builds this layer but never calls it since 0.16);
  ``model.eval()`` turns it off.
* with several adapters merged, the merge follows the forward order (see ``oftjax.merge``).
* rotate-the-input vs rotate-the-kernel is chosen from static shapes (``rotate="auto"``); both give the
  same values (within fp32 rounding) and the same gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from oftjax import quant
from oftjax.nn._adapters import OFTAdapters
from oftjax.nn._base import base_kind, in_out_features
from oftjax.nn._forward import rotate_chain, rotated_dequant_matmul, rotated_matmul, rotation_from_vec
from oftjax.nn._settings import AdapterSettings

__all__ = ["ROTATE_MODES", "AdapterSettings", "OFTLinear", "rotation_from_vec"]

ROTATE_MODES = ("auto", "input", "weight")


class OFTLinear(OFTAdapters):
    """A frozen linear layer with named OFT adapters (PEFT's ``oft.layer.Linear``).

    Build it with ``OFTLinear(base)`` then ``add_adapter``, or let ``oftjax.surgery.apply_oft`` do both.

    Args:
      base: ``nnx.Linear`` (or a layer with the same ``kernel``/``bias`` state), ``Linear8bit`` or
        ``Linear4bit``. Its variables are adopted (shared, not copied) under the same attribute names.
      rotate: "input" rotates activations (``tokens * d_in * b``), "weight" rotates the kernel
        (``d_in * d_out * b``), "auto" (default) picks the cheaper one from static shapes.

    Attributes:
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
      >>> bool((layer(x) == layer.base_forward(x)).all())  # identity at init
      True
    """

    def __init__(self, base: nnx.Module, *, rotate: str = "auto"):
        if isinstance(base, OFTLinear):
            raise TypeError("OFTLinear: the base layer is already an OFTLinear; add an adapter to it instead")
        if rotate not in ROTATE_MODES:
            raise ValueError(f"OFTLinear: rotate must be one of {ROTATE_MODES}; got {rotate!r}")
        kind = base_kind(base)
        self._adopt_base(base)
        self.base_kind = kind
        self.in_features, self.out_features = in_out_features(base, kind)
        self.rotate = rotate
        self._init_adapters()

    # ----------------------------------------------------------------------------------------------------
    # forward (adapter management, rotation_blocks, delta_weight: ``OFTAdapters``)

    def base_forward(self, x: jax.Array) -> jax.Array:
        """The base layer's own forward on these variables."""
        return self.base_type.__call__(self, x)

    def uses_weight_path(self, x_shape: tuple[int, ...], names: Sequence[str]) -> bool:
        """Whether the forward rotates the kernel (else the inputs), from static shapes."""
        if self.rotate != "auto" or not names:
            return self.rotate == "weight" and bool(names)
        if not self._weight_path_ok():
            return False
        tokens = 1
        for s in x_shape[:-1]:
            tokens *= int(s)
        # input path: tokens * d_in * b per adapter; weight path: d_in * d_out * b per adapter.
        return self.out_features < tokens

    def _weight_path_ok(self) -> bool:
        return self.base_kind != "float" or issubclass(self.base_type, nnx.Linear)

    def __call__(self, x: jax.Array) -> jax.Array:
        names = self.forward_adapters()
        if not names:
            return self.base_forward(x)
        rotations = tuple(self.rotation_blocks(n, training=True) for n in names)
        if self.uses_weight_path(x.shape, names):
            if not self._weight_path_ok():
                raise ValueError(f"rotate='weight' is not available for base type {self.base_type.__name__}")
            return self._weight_path_forward(x, rotations)
        return self.base_forward(rotate_chain(x, rotations).astype(x.dtype))

    def _weight_path_forward(self, x: jax.Array, rotations: tuple[jax.Array, ...]) -> jax.Array:
        bias = self.bias[...] if self.bias is not None else None
        if self.base_kind == "float":
            # nnx.Linear's own dtype promotion, then x @ (BD K) + bias.
            x_c, kernel, bias = self.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
            y = rotated_matmul(x_c, rotations, kernel)
            return y + bias if bias is not None else y
        cd = self.compute_dtype
        y = rotated_dequant_matmul(x.astype(cd), rotations, self.weight.get_value(), cd)
        return _finish(y, bias, cd, x.dtype)

    def dequantized_weight(self, dtype: Any = None) -> jax.Array:
        """Quantized bases: the dense ``[out, in]`` weight in the compute dtype (as the forward uses it)."""
        return quant.dequantize(self.weight.get_value(), self.compute_dtype if dtype is None else dtype)


def _finish(y: jax.Array, bias: jax.Array | None, cd: Any, out_dtype: Any) -> jax.Array:
    if bias is not None:
        y = y + bias.astype(cd)
    return y.astype(out_dtype)
