"""Variable types that make training select-by-type (flax NNX ``LoRAParam`` pattern).

* ``OFTParam`` holds the OFT rotation parameters (PEFT's ``oft_R.weight``, ``[R, b(b-1)/2]``). It is an
  ``nnx.Param``, so ``nnx.Optimizer(model, tx, wrt=OFTParam)`` trains exactly the rotations.
* ``OFTBias`` is an ``OFTParam`` used for base-layer biases that PEFT's ``bias="all" | "oft_only"`` marks
  trainable (PEFT sets ``requires_grad``; here the bias changes variable type, keeping its name and value).
* ``QuantWeight`` holds a frozen ``Int8Weight`` / ``FourBitWeight`` pytree. It is NOT a ``Param``: no default
  filter (``nnx.Param``, ``OFTParam``) ever differentiates or updates its integer arrays.
"""

from __future__ import annotations

from flax import nnx


class OFTParam(nnx.Param):
    """Trainable OFT rotation parameters ``[R, b(b-1)/2]`` (``triu_indices`` order, as PEFT stores them).

    Example:
      >>> import jax.numpy as jnp
      >>> p = OFTParam(jnp.zeros((4, 6)))
      >>> isinstance(p, nnx.Param)
      True
    """


class OFTBias(OFTParam):
    """A base bias made trainable by ``OFTConfig.bias`` ("all" / "oft_only"); selected by ``OFTParam``."""


class QuantWeight(nnx.Variable):
    """A frozen quantized weight (``oftjax.quant.Int8Weight`` or ``FourBitWeight``); never a ``Param``.

    Read it with ``get_value()`` (the value is a pytree dataclass, not an array).

    Example:
      >>> import jax.numpy as jnp
      >>> from oftjax.quant import Int8Weight
      >>> w = QuantWeight(Int8Weight(jnp.zeros((2, 3), jnp.int8), jnp.ones((2,), jnp.float32)))
      >>> w.get_value().shape
      (2, 3)
    """
