"""Frozen linear layers over bitsandbytes int8 and NF4/FP4 weights.

Both keep the weight packed in a ``QuantWeight`` (attribute ``weight``, torch layout ``[out, in]``) and
dequantize inside the traced computation, so nothing holds a float copy:

* ``Linear8bit``: dequantize-then-matmul, bnb's training path on CPU (``MatMul8bitFp``,
  ../shared/notes/bitsandbytes-formats.md §7.2). bnb's eval path (LLM.int8, activation quantization) is not
  reproduced; outputs differ from it by bnb's activation quantization error.
* ``Linear4bit``: ``y = x.astype(cd) @ RNE_cd(code[q] * absmax_fp32).T + bias.astype(cd)`` then cast back to
  ``x.dtype`` (bnb ``Linear4bit.forward`` with the CPU repacking disabled, notes §7.1): the weight is
  dequantized straight into the compute dtype, not through the original weight dtype.

In training the dense weight lives only inside the forward matmul and again inside the backward one
(``dequant_matmul``'s custom VJP keeps the packed weight as its residual and dequantizes it a second time, as
bnb's ``MatMul4Bit`` backward does): no float copy of a frozen weight survives from the forward to the
backward pass, so activation memory does not grow by 4 bytes per frozen parameter.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from oftjax import quant
from oftjax.nn._forward import DotGeneral, dequant_matmul
from oftjax.nn._variables import QuantWeight


def _bias_param(bias: Any, out_features: int) -> Any:
    if bias is None:
        return nnx.data(None)
    if isinstance(bias, nnx.Variable):
        value = bias[...]
    else:
        value = jnp.asarray(bias)
    if value.shape != (out_features,):
        raise ValueError(f"bias must have shape [{out_features}] (out_features); got {tuple(value.shape)}")
    return bias if isinstance(bias, nnx.Variable) else nnx.Param(value)


class _QuantLinear(nnx.Module):
    """Shared state and forward of the quantized linears (subclasses fix the weight format)."""

    _format: type = object

    def __init__(
        self,
        q: Any,
        bias: Any = None,
        *,
        compute_dtype: Any = jnp.float32,
        dot_general: DotGeneral = jax.lax.dot_general,
        precision: jax.lax.PrecisionLike = None,
    ):
        if not isinstance(q, self._format):
            raise TypeError(
                f"{type(self).__name__} expects an oftjax.quant.{self._format.__name__}; "
                f"got {type(q).__name__}"
            )
        if len(q.shape) != 2:
            raise ValueError(f"{type(self).__name__}: weight shape must be [out, in]; got {q.shape}")
        self.out_features, self.in_features = (int(s) for s in q.shape)
        self.weight = QuantWeight(q)
        self.bias = _bias_param(bias, self.out_features)
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.dot_general = dot_general
        self.precision = precision

    def dequantized_weight(self, dtype: Any = None) -> jax.Array:
        """The dense ``[out, in]`` weight as the forward uses it (default: in the compute dtype)."""
        return quant.dequantize(self.weight.get_value(), self.compute_dtype if dtype is None else dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        cd = self.compute_dtype
        y = dequant_matmul(x.astype(cd), self.weight.get_value(), cd, self.dot_general, self.precision)
        if self.bias is not None:
            y = y + self.bias[...].astype(cd)
        return y.astype(x.dtype)


class Linear8bit(_QuantLinear):
    """Frozen LLM.int8 linear (bnb ``Linear8bitLt``): dequantize-then-matmul in ``compute_dtype``.

    Attributes: ``weight`` (``QuantWeight`` holding an ``Int8Weight``), ``bias`` (``nnx.Param`` or None),
    ``in_features``, ``out_features``, ``compute_dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> layer = Linear8bit.from_float(jnp.ones((4, 8)) / 8)
      >>> layer(jnp.ones((2, 8))).shape
      (2, 4)
    """

    _format = quant.Int8Weight

    @classmethod
    def from_float(
        cls,
        weight: jax.Array,
        bias: jax.Array | None = None,
        *,
        compute_dtype: Any = jnp.float32,
        rounding: str = "cpu",
        **kwargs: Any,
    ) -> Linear8bit:
        """Quantize a torch-layout ``[out, in]`` float weight as bnb ``Int8Params`` does, then wrap it."""
        return cls(
            quant.quantize_int8(jnp.asarray(weight), rounding=rounding),
            bias,
            compute_dtype=compute_dtype,
            **kwargs,
        )


class Linear4bit(_QuantLinear):
    """Frozen NF4/FP4 linear (bnb ``Linear4bit``): ``x @ RNE_cd(code[q] * absmax).T + bias`` in ``cd``.

    Attributes: ``weight`` (``QuantWeight`` holding a ``FourBitWeight``), ``bias``, ``in_features``,
    ``out_features``, ``compute_dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> layer = Linear4bit.from_float(jnp.ones((4, 64)) / 8, quant_type="nf4")
      >>> layer(jnp.ones((2, 64))).shape
      (2, 4)
    """

    _format = quant.FourBitWeight

    @classmethod
    def from_float(
        cls,
        weight: jax.Array,
        bias: jax.Array | None = None,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        compress_statistics: bool = False,
        quant_storage: Any = jnp.uint8,
        compute_dtype: Any = jnp.float32,
        rounding: str = "cpu",
        **kwargs: Any,
    ) -> Linear4bit:
        """Quantize a torch-layout ``[out, in]`` float weight as bnb ``Params4bit`` does, then wrap it."""
        q = quant.quantize_4bit(
            jnp.asarray(weight),
            quant_type=quant_type,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
            quant_storage=quant_storage,
            rounding=rounding,
        )
        return cls(q, bias, compute_dtype=compute_dtype, **kwargs)
