"""What an OFT layer needs from the layer it wraps: a small protocol, and adapters for flax's own layers.

An OFT layer holds its frozen base as a child module (``base_layer``, as flax's ``LoRA`` holds
``base_module``) and calls it for the forward. Beyond calling it, merging needs the base's dense weight and a
way to write a merged one back, and the rotate-the-weight forward needs its matmul with a rotated weight.
That is the protocol (PEFT's ``dispatch_bnb_8bit`` / ``dispatch_bnb_4bit`` pick the same per base type):

* ``BaseLayer``: ``in_features``, ``out_features``, ``dense_weight(dtype)`` (torch layout ``[out, in]``) and
  ``set_dense_weight(w)``.
* ``LinearBase``: a ``BaseLayer`` that also computes ``rotated_forward(x, rotations)``, the base's output for
  inputs rotated by the chain of blocks, by rotating its weight instead. Optionally ``quantizes_input``
  (read with ``quantizes_input(module)``): True while the base's forward is not ``x W^T + b`` for its dense
  weight (``Linear8bit`` in LLM.int8 mode quantizes ``x`` row-wise), so the weight path would compute
  something else and an OFT layer rotates the input.

``oftjax.nn.Linear8bit`` / ``Linear4bit`` implement ``LinearBase`` themselves. ``nnx.Linear`` and
``nnx.Embed`` cannot, so ``base_ops`` wraps them in ``FloatLinearOps`` / ``EmbedOps``, chosen by type
(``BASE_OPS``); any other module that implements the protocol is used as is.

Example:
  >>> from flax import nnx
  >>> ops = base_ops(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  >>> type(ops).__name__, ops.dense_weight().shape
  ('FloatLinearOps', (3, 4))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import jax
from flax import nnx

from oftjax.nn._forward import rotated_matmul

__all__ = [
    "BASE_OPS",
    "BaseLayer",
    "EmbedOps",
    "FloatLinearOps",
    "LinearBase",
    "base_ops",
    "is_linear_base",
    "quantizes_input",
]


@runtime_checkable
class BaseLayer(Protocol):
    """A frozen layer whose weight OFT rotates and merges into.

    Attributes:
      in_features: the dimension the adapters rotate (an embedding's ``features``: it rotates its output).
      out_features: the output dimension.
    """

    in_features: int
    out_features: int

    def dense_weight(self, dtype: Any = None) -> jax.Array:
        """The weight in torch layout (``[out, in]``; an embedding's table ``[num_embeddings, d]``).

        ``dtype=None`` gives the dtype merges start from (what PEFT dequantizes to): a float weight's own
        dtype, int8 fp32 (``int8_vectorwise_dequant``), 4-bit the original weight dtype
        (``dequantize_4bit``).
        """
        ...

    def set_dense_weight(self, w: jax.Array) -> None:
        """Store a merged weight (same layout as ``dense_weight``): cast a float weight to its dtype,
        requantize a quantized one with its own format options (bit-exact with bitsandbytes)."""
        ...


@runtime_checkable
class LinearBase(BaseLayer, Protocol):
    """A ``BaseLayer`` computing ``y = x W^T + b``, which OFTLinear may rotate on the weight side."""

    def rotated_forward(self, x: jax.Array, rotations: tuple[jax.Array, ...]) -> jax.Array:
        """The layer's output for ``x BD(R_1) ... BD(R_n)``, computed by rotating the weight
        (``oftjax.nn._forward.rotated_matmul``: the gradient flows back the input-centric way)."""
        ...


@dataclasses.dataclass(frozen=True)
class FloatLinearOps:
    """``LinearBase`` for an ``nnx.Linear`` (kernel ``[in, out]``, optional bias)."""

    module: nnx.Linear

    @property
    def in_features(self) -> int:
        return int(self.module.kernel[...].shape[0])

    @property
    def out_features(self) -> int:
        return int(self.module.kernel[...].shape[1])

    def dense_weight(self, dtype: Any = None) -> jax.Array:
        w = self.module.kernel[...].T
        return w if dtype is None else w.astype(dtype)

    def set_dense_weight(self, w: jax.Array) -> None:
        kernel = self.module.kernel
        kernel[...] = w.T.astype(kernel[...].dtype)

    def rotated_forward(self, x: jax.Array, rotations: tuple[jax.Array, ...]) -> jax.Array:
        # nnx.Linear's own dtype promotion, then x @ (BD K) + bias.
        m = self.module
        bias = m.bias[...] if m.bias is not None else None
        x, kernel, bias = m.promote_dtype((x, m.kernel[...], bias), dtype=m.dtype)
        y = rotated_matmul(x, rotations, kernel)
        return y + bias if bias is not None else y


@dataclasses.dataclass(frozen=True)
class EmbedOps:
    """``BaseLayer`` for an ``nnx.Embed``: the table ``[num_embeddings, d]`` is already torch's layout, and
    the adapters rotate the output (``in_features = out_features = d``)."""

    module: nnx.Embed

    @property
    def in_features(self) -> int:
        return int(self.module.features)

    @property
    def out_features(self) -> int:
        return int(self.module.features)

    def dense_weight(self, dtype: Any = None) -> jax.Array:
        w = self.module.embedding[...]
        return w if dtype is None else w.astype(dtype)

    def set_dense_weight(self, w: jax.Array) -> None:
        table = self.module.embedding
        table[...] = w.astype(table[...].dtype)


# flax layer type -> the object implementing the protocol for it (subclasses included).
BASE_OPS: dict[type, type] = {nnx.Linear: FloatLinearOps, nnx.Embed: EmbedOps}


def base_ops(module: Any) -> BaseLayer:
    """The protocol object for ``module``: itself when it implements ``BaseLayer``, else its adapter.

    Raises:
      TypeError: the module is neither a ``BaseLayer`` nor of a type in ``BASE_OPS``.
    """
    for cls in type(module).__mro__:
        if cls in BASE_OPS:
            return BASE_OPS[cls](module)
    if isinstance(module, BaseLayer):
        return module
    raise TypeError(
        f"OFT supports nnx.Linear, nnx.Embed, oftjax.nn.Linear8bit, oftjax.nn.Linear4bit and layers "
        f"implementing oftjax.nn.BaseLayer; got {type(module).__name__}"
    )


def is_linear_base(module: Any) -> bool:
    """Whether OFTLinear can wrap ``module`` (a ``LinearBase``, directly or through ``BASE_OPS``).

    Example:
      >>> from flax import nnx
      >>> rngs = nnx.Rngs(0)
      >>> is_linear_base(nnx.Linear(2, 3, rngs=rngs)), is_linear_base(nnx.Embed(4, 2, rngs=rngs))
      (True, False)
    """
    try:
        return isinstance(base_ops(module), LinearBase)
    except TypeError:
        return False


def quantizes_input(ops: Any) -> bool:
    """Whether a ``LinearBase``'s forward quantizes its input (its optional ``quantizes_input``, default
    False): the rotate-the-weight path does not compute its forward then.

    Example:
      >>> from flax import nnx
      >>> quantizes_input(base_ops(nnx.Linear(2, 3, rngs=nnx.Rngs(0))))
      False
    """
    return bool(getattr(ops, "quantizes_input", False))
