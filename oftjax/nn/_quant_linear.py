"""Frozen linear layers over bitsandbytes int8 and NF4/FP4 weights.

Both keep the weight packed in a ``QuantWeight`` (attribute ``weight``, torch layout ``[out, in]``) and
dequantize inside the traced computation, so nothing holds a float copy:

* ``Linear8bit``: two forwards, as bnb's ``Linear8bitLt`` (docs/bitsandbytes-formats.md, "int8 paths"):
  dequantize-then-matmul (bnb's training path on the CPU, ``MatMul8bitFp``) and LLM.int8 (bnb's eval path,
  ``MatMul8bitLt``: row-wise int8 activations, int32 accumulation, outlier columns above ``threshold`` in
  float; ``oftjax.quant.llm_int8_matmul``). ``int8_matmul`` picks one: "dequantize", "llm_int8", or "auto"
  (default), which follows the layer's inference flag ``deterministic`` as nnx sets it: ``model.eval()``
  (LLM.int8) / ``model.train()`` (dequantize), or per call ``nnx.view(model, deterministic=True)``.
* ``Linear4bit``: ``y = x.astype(cd) @ RNE_cd(code[q] * absmax_fp32).T + bias.astype(cd)`` then cast back to
  ``x.dtype`` (bnb ``Linear4bit.forward`` with the CPU repacking disabled; docs/bitsandbytes-formats.md,
  "What the forward passes compute"): the weight is dequantized straight into the compute dtype, not
  through the original weight dtype.

In training the dense weight lives only inside the forward matmul and again inside the backward one
(``dequant_matmul``'s custom VJP keeps the packed weight as its residual and dequantizes it a second time, as
bnb's ``MatMul4Bit`` backward does): no float copy of a frozen weight survives from the forward to the
backward pass, so activation memory does not grow by 4 bytes per frozen parameter.

Both implement ``oftjax.nn.LinearBase`` (the weight an OFT layer merges into, and the matmul with a rotated
weight), so ``OFTLinear`` wraps them like any other base.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from oftjax import quant
from oftjax.nn._forward import DotGeneral, dequant_matmul, rotated_dequant_matmul
from oftjax.nn._variables import QuantWeight

INT8_MATMULS = ("auto", "dequantize", "llm_int8")


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
        return self._finish(y, x.dtype)

    def _finish(self, y: jax.Array, out_dtype: Any) -> jax.Array:
        if self.bias is not None:
            y = y + self.bias[...].astype(self.compute_dtype)
        return y.astype(out_dtype)

    # ``oftjax.nn.LinearBase``: what an OFT layer needs from its base

    def dense_weight(self, dtype: Any = None) -> jax.Array:
        """The dequantized ``[out, in]`` weight; default dtype: what merges start from (int8: fp32, as
        PEFT's ``int8_vectorwise_dequant``; 4-bit: the original weight dtype, as ``dequantize_4bit``)."""
        q = self.weight.get_value()
        if dtype is None:
            dtype = jnp.float32 if isinstance(q, quant.Int8Weight) else q.dtype
        return quant.dequantize(q, dtype)

    def set_dense_weight(self, w: jax.Array) -> None:
        """Requantize ``w`` ``[out, in]`` with this layer's format options and store it."""
        self.weight.set_value(requantize(self.weight.get_value(), w))

    def rotated_forward(self, x: jax.Array, rotations: tuple[jax.Array, ...]) -> jax.Array:
        """The forward for inputs ``x BD(R_1) ... BD(R_n)``, rotating the dequantized weight instead.

        Raises ValueError for a layer whose forward quantizes its input (``Linear8bit`` in LLM.int8 mode):
        rotating its weight would compute something else; rotate the input.
        """
        if getattr(self, "quantizes_input", False):
            raise ValueError(
                f"{type(self).__name__}: the LLM.int8 forward quantizes its input, so it cannot be computed "
                "by rotating the weight; rotate the input and call the layer (OFTLinear does)"
            )
        cd = self.compute_dtype
        y = rotated_dequant_matmul(x.astype(cd), rotations, self.weight.get_value(), cd)
        return self._finish(y, x.dtype)


def requantize(q: Any, w: jax.Array) -> Any:
    """Quantize ``w`` ``[out, in]`` with the same format options as ``q`` (bnb ``Int8Params``/``Params4bit``).

    The merged weight is cast to the dtype bnb would hand to its quantizer
    (``set_base_weight(w.to(orig_dtype))``): fp32 for int8 (PEFT's dequantized dtype), ``q.dtype`` for 4-bit.

    Example:
      >>> import jax.numpy as jnp
      >>> q = quant.quantize_int8(jnp.eye(4))
      >>> requantize(q, jnp.eye(4) * 2).SCB.tolist()
      [2.0, 2.0, 2.0, 2.0]
    """
    if isinstance(q, quant.Int8Weight):
        out = quant.quantize_int8(w.astype(jnp.float32))
        # The int8 codes do not depend on the float dtype they came from beyond bnb's fp16 cast; keep the
        # layer's original dtype as the default dequantize dtype.
        return out if out.dtype == q.dtype else quant.Int8Weight(out.CB, out.SCB, dtype=q.dtype)
    return quant.quantize_4bit(
        w.astype(q.dtype),
        quant_type=q.quant_type,
        blocksize=q.blocksize,
        compress_statistics=q.compress_statistics,
        quant_storage=q.quant_storage,
    )


class _OutlierRows(nnx.Variable):
    """The rows of a ``Linear8bit``'s input that choose LLM.int8's outlier columns (not trained or saved)."""


class Linear8bit(_QuantLinear):
    """Frozen int8 linear (bnb ``Linear8bitLt``): dequantize-then-matmul or LLM.int8, in ``compute_dtype``.

    Args:
      q: the ``Int8Weight`` ``[out, in]``.
      bias: ``[out]`` or None.
      compute_dtype: the dtype ``x`` is cast to (bnb computes in the input's dtype: give the activation
        dtype); the output is cast back to ``x.dtype``.
      threshold: ``llm_int8_threshold``: LLM.int8 keeps the input columns holding a value ``>= threshold``
        in float; 0 quantizes every column. Default 6.0, transformers' (bnb ``Linear8bitLt``'s own is 0).
      int8_matmul: "auto" (LLM.int8 when ``deterministic``, as bnb in eval mode), "dequantize" or
        "llm_int8" (always that forward).
      rounding: "cpu" (bnb's CPU kernels, bit-exact) or "cuda" (the CUDA kernels' rules) for LLM.int8.

    Attributes: ``weight`` (``QuantWeight`` holding an ``Int8Weight``), ``bias`` (``nnx.Param`` or None),
    ``in_features``, ``out_features``, ``compute_dtype``, ``threshold``, ``int8_matmul``, ``rounding``,
    ``deterministic`` (the inference flag: ``model.eval()`` sets it, ``model.train()`` clears it).

    In LLM.int8 mode the gradient is the straight-through one (that of dequantize-then-matmul), as bnb's
    ``MatMul8bitLt.backward``; and an OFT layer over it rotates its inputs, never its weight.

    Example:
      >>> import jax.numpy as jnp
      >>> layer = Linear8bit.from_float(jnp.ones((4, 8)) / 8)
      >>> layer(jnp.ones((2, 8))).shape
      (2, 4)
      >>> layer.eval()
      >>> layer.uses_llm_int8
      True
    """

    _format = quant.Int8Weight

    def __init__(
        self,
        q: Any,
        bias: Any = None,
        *,
        compute_dtype: Any = jnp.float32,
        threshold: float = 6.0,
        int8_matmul: str = "auto",
        rounding: str = "cpu",
        dot_general: DotGeneral = jax.lax.dot_general,
        precision: jax.lax.PrecisionLike = None,
    ):
        super().__init__(q, bias, compute_dtype=compute_dtype, dot_general=dot_general, precision=precision)
        _check_threshold(threshold)
        self.threshold = float(threshold)
        self.int8_matmul = _checked_mode(int8_matmul)
        if rounding not in quant.ROUNDINGS:
            raise ValueError(f"Linear8bit: rounding must be one of {quant.ROUNDINGS}; got {rounding!r}")
        self.rounding = rounding
        self.deterministic = False
        self.outlier_rows = nnx.data(None)

    @property
    def uses_llm_int8(self) -> bool:
        """Whether the forward is LLM.int8 (from ``int8_matmul`` and, for "auto", ``deterministic``)."""
        mode = _checked_mode(self.int8_matmul)
        return mode == "llm_int8" or (mode == "auto" and bool(self.deterministic))

    @property
    def quantizes_input(self) -> bool:
        """``oftjax.nn.LinearBase``: True in LLM.int8 mode, where the output is not ``x W^T + b`` for the
        dequantized ``W``, so rotating the weight instead of the input would compute something else."""
        return self.uses_llm_int8

    def set_view(self, deterministic: bool | None = None, int8_matmul: str | None = None) -> None:
        """``nnx.view(model, deterministic=..., int8_matmul=...)``: the forward of one call (or model copy).

        Args:
          deterministic: True runs inference (LLM.int8 under ``int8_matmul="auto"``), False training.
          int8_matmul: "auto", "dequantize" or "llm_int8".
        """
        if deterministic is not None:
            self.deterministic = deterministic
        if int8_matmul is not None:
            self.int8_matmul = _checked_mode(int8_matmul)

    def count_outliers_in(self, rows: jax.Array | None) -> None:
        """LLM.int8 from now on chooses its outlier columns from the rows of ``x`` marked True in ``rows``
        (bool, ``x.shape[:-1]``), or from every row (None, the default, as bnb). An input of another shape
        (``lm_head`` on the last position only) uses every row. ``oftjax.generate`` marks the prompts'
        rows in prefill, leaving out the left padding it adds beyond the longest prompt.
        """
        self.outlier_rows = nnx.data(None) if rows is None else _OutlierRows(jnp.asarray(rows, jnp.bool_))

    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.uses_llm_int8:
            return super().__call__(x)
        cd = self.compute_dtype
        # bnb's Linear8bitLt casts the bias to the input dtype before MatMul8bitLt adds it
        bias = None if self.bias is None else self.bias[...].astype(cd)
        rows = None if self.outlier_rows is None else self.outlier_rows[...]
        y = quant.llm_int8_matmul(
            x.astype(cd),
            self.weight.get_value(),
            bias,
            threshold=self.threshold,
            rounding=self.rounding,
            outlier_rows=rows if rows is not None and rows.shape == x.shape[:-1] else None,
        )
        return y.astype(x.dtype)

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
        """Quantize a torch-layout ``[out, in]`` float weight as bnb ``Int8Params`` does, then wrap it
        (``rounding`` applies to the weight and to LLM.int8)."""
        return cls(
            quant.quantize_int8(jnp.asarray(weight), rounding=rounding),
            bias,
            compute_dtype=compute_dtype,
            rounding=rounding,
            **kwargs,
        )


def _checked_mode(mode: Any) -> str:
    if mode not in INT8_MATMULS:
        raise ValueError(f"Linear8bit: int8_matmul must be one of {INT8_MATMULS}; got {mode!r}")
    return mode


def _check_threshold(threshold: Any) -> None:
    ok = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
    if not ok or not (0.0 <= float(threshold) < float("inf")):
        raise ValueError(f"Linear8bit: threshold must be a finite number >= 0; got {threshold!r}")


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
