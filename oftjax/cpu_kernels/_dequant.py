"""4-bit dequantization on the CPU (``csrc/dequant4.cc``), alone and fused with a rotation of the rows.

Replacements of the named operations ``dequantize_4bit`` (``oftjax.quant``) and ``dequantize_rotate``
(``oftjax.nn._forward``). The dequantize kernel gives the bits of the pure-JAX formulation, except float32
subnormal products, which it keeps as bitsandbytes does (XLA:CPU flushes them to zero); it writes float32,
float16 and bfloat16, with an AVX-512 path and a portable scalar loop giving the same results. The fused
kernel writes float32 ``dequantize(W) BD(R)`` row by row for rotation blocks the rotation kernels support
(``oftjax.cpu_kernels._rotate``), with the bits of dequantizing and then rotating with those kernels: the
float32 weight is never written out and read back. Derivatives (in the quantization statistics, which
training never needs) come from the pure-JAX formulation.

``OFTJAX_HUGEPAGES=0`` (read when a computation is traced) stops the kernel from advising transparent huge
pages for large outputs (csrc/dequant4.cc ``AdviseHugePages`` says why it does).

Why: XLA:CPU stores the two interleaved nibble halves of the output one element at a time; the kernel
permutes 32 outputs per instruction (benchmarks/RESULTS.md has the figures).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oftjax import _registry
from oftjax.cpu_kernels import _rotate
from oftjax.cpu_kernels._library import Library
from oftjax.cpu_kernels._primitive import KernelOp
from oftjax.quant import DYNAMIC, FourBitWeight, code_table
from oftjax.quant._dequant import packed_bytes_for

_PLAIN, _NESTED = "oftjax_dequant4", "oftjax_dequant4_nested"
_PLAIN_ROTATE, _NESTED_ROTATE = "oftjax_dequant4_rotate", "oftjax_dequant4_nested_rotate"
# what the kernel writes (others, e.g. float64 under x64, keep the pure-JAX default)
OUT_DTYPES = (np.dtype(np.float32), np.dtype(jnp.float16), np.dtype(jnp.bfloat16))
LIBRARY = Library(
    "_dequant4_cpu",
    (
        (_PLAIN, "OftjaxDequant4"),
        (_NESTED, "OftjaxDequant4Nested"),
        (_PLAIN_ROTATE, "OftjaxDequant4Rotate"),
        (_NESTED_ROTATE, "OftjaxDequant4NestedRotate"),
    ),
    what="dequantize",
    supports_symbol="OftjaxDequant4RotateSupports",
)


def has_avx512() -> bool:
    """Whether this machine runs the kernel's AVX-512 path (else its scalar loop, same results)."""
    lib = LIBRARY.load()[0]
    return bool(lib is not None and lib.OftjaxDequant4HasAvx512())


def _weight(operands: tuple[jax.Array, ...], *, shape, orig_dtype, blocksize, quant_type) -> FourBitWeight:
    packed, absmax, *nested = operands
    return FourBitWeight(
        packed,
        absmax,
        *(nested or (None, None)),
        shape=shape,
        dtype=orig_dtype,
        blocksize=blocksize,
        quant_type=quant_type,
    )


def _attrs(blocksize: int, vectorize: bool) -> dict[str, Any]:
    return {"blocksize": np.int64(blocksize), "vectorize": bool(vectorize)}


def _code_operands(operands: tuple[jax.Array, ...], n: int, quant_type: str) -> list[jax.Array]:
    """The kernel's operands: packed bytes, then the statistics (float32), then the code table(s)."""
    packed, absmax, *nested = operands
    b = packed_bytes_for(packed, n)
    code = jnp.asarray(code_table(quant_type))
    if nested:
        nested_absmax, offset = nested
        stats = [absmax, nested_absmax.astype(jnp.float32), jnp.asarray(offset, jnp.float32)]
        return [b, *stats, jnp.asarray(DYNAMIC), code]
    return [b, absmax.astype(jnp.float32), code]


# --- dequantize


def _dequant_xla(*operands: jax.Array, dtype: Any, vectorize: bool, **meta: Any) -> tuple[jax.Array]:
    del vectorize
    return (_registry.default("dequantize_4bit")(_weight(operands, **meta), dtype),)


def _dequant_cpu(*operands: jax.Array, dtype: Any, vectorize: bool, **meta: Any) -> tuple[jax.Array]:
    n = int(np.prod(meta["shape"], dtype=np.int64))
    target = _NESTED if len(operands) == 4 else _PLAIN
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((n,), dtype))
    hugepages = os.environ.get("OFTJAX_HUGEPAGES", "1") != "0"
    args = _code_operands(operands, n, meta["quant_type"])
    out = call(*args, **_attrs(meta["blocksize"], vectorize), hugepages=hugepages)
    return (out.reshape(meta["shape"]),)


DEQUANTIZE = KernelOp("oftjax_dequantize_4bit", xla=_dequant_xla, cpu=_dequant_cpu, num_results=1)


def _meta(q: FourBitWeight) -> dict[str, Any]:
    return {
        "shape": tuple(q.shape),
        "orig_dtype": np.dtype(q.dtype),
        "blocksize": int(q.blocksize),
        "quant_type": q.quant_type,
    }


def _operands(q: FourBitWeight) -> tuple[jax.Array, ...]:
    if q.compress_statistics:
        return (q.packed, q.absmax, q.nested_absmax, q.offset)
    return (q.packed, q.absmax)


def dequantize_4bit(q: FourBitWeight, dtype: Any, *, vectorize: bool = True) -> Any:
    """Replacement of ``oftjax.quant``'s ``dequantize_4bit``: the kernel for float32/16 and bfloat16 outputs.

    ``vectorize=False`` runs the portable scalar loop even where AVX-512 is available (tests compare them).
    """
    if np.dtype(dtype) not in OUT_DTYPES or LIBRARY.load()[0] is None:
        return NotImplemented
    return DEQUANTIZE(*_operands(q), dtype=np.dtype(dtype), vectorize=bool(vectorize), **_meta(q))[0]


# --- dequantize, then rotate the rows (the 4-bit weight path of an OFT layer)


def _fused_xla(*operands: jax.Array, vectorize: bool, **meta: Any) -> tuple[jax.Array]:
    del vectorize
    *q_ops, Rt = operands
    fn = _registry.default("dequantize_rotate")
    return (fn(_weight(tuple(q_ops), **meta), Rt, np.dtype(np.float32)),)


def _fused_cpu(*operands: jax.Array, vectorize: bool, **meta: Any) -> tuple[jax.Array]:
    *q_ops, Rt = operands
    n = int(np.prod(meta["shape"], dtype=np.int64))
    target = _NESTED_ROTATE if len(q_ops) == 4 else _PLAIN_ROTATE
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(tuple(meta["shape"]), np.float32))
    return (
        call(
            *_code_operands(tuple(q_ops), n, meta["quant_type"]), Rt, **_attrs(meta["blocksize"], vectorize)
        ),
    )


DEQUANTIZE_ROTATE = KernelOp("oftjax_dequantize_rotate", xla=_fused_xla, cpu=_fused_cpu, num_results=1)


def fused_supported(q: Any, Rt: jax.Array, dtype: Any) -> bool:
    """Whether the fused kernel computes ``dequantize_rotate(q, Rt, dtype)``: a 2-D 4-bit weight, float32
    output and blocks, blocks of a size the rotation kernels run, ``r * b`` the weight's row length."""
    return (
        isinstance(q, FourBitWeight)
        and len(q.shape) == 2
        and np.dtype(dtype) == np.float32
        and Rt.ndim == 3
        and Rt.shape[0] * Rt.shape[1] == q.shape[1]
        and _rotate.supports(int(Rt.shape[1]), Rt.dtype)
        and LIBRARY.supports(int(Rt.shape[1]))
    )


def dequantize_rotate(q: Any, Rt: jax.Array, dtype: Any, *, vectorize: bool = True) -> Any:
    """Replacement of ``oftjax.nn._forward.dequantize_rotate``: one kernel pass where ``fused_supported``."""
    if not fused_supported(q, Rt, dtype):
        return NotImplemented
    return DEQUANTIZE_ROTATE(*_operands(q), Rt, vectorize=bool(vectorize), **_meta(q))[0]


OPERATIONS = {"dequantize_4bit": dequantize_4bit, "dequantize_rotate": dequantize_rotate}
