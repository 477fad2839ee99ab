"""``x @ dequantize(W).T`` for a 4-bit weight on the CPU, from the packed bytes (``csrc/matmul4.cc``).

Replacement of the named operation ``dequant_matmul_4bit`` (``oftjax.nn._forward``, the 4-bit case of
``dequant_matmul``) for float32 inputs of at most ``MAX_ROWS`` rows (the product of ``x``'s leading dims):
what a decoding step multiplies. Every weight element is the product the dequantize kernel writes
(``code[nibble] * absmax``, float32); only the summation order differs from the dot of the dequantized
weight. It runs where its AVX-512 path does (``K`` and the blocksize multiples of 32); its portable scalar
loop sums in the same order and gives the same bits, but is slower than the default's dequantize and GEMM,
so other machines and shapes keep the default (``vectorize=False`` forces the loop, for tests). Larger
inputs (prefill, training) keep the default, whose matmul is compute-bound and well served by XLA's GEMM.
Derivatives, ``vmap`` and other platforms use the pure-JAX default (``oftjax.cpu_kernels._primitive``).

Why: the default writes the float32 weight (4 bytes per parameter) and reads it back for a matmul with a
few rows; the kernel reads the packed weight once, half a byte per parameter.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oftjax import _registry
from oftjax.cpu_kernels._dequant import _code_operands, _meta, _operands, _weight
from oftjax.cpu_kernels._library import Library
from oftjax.cpu_kernels._primitive import KernelOp
from oftjax.quant import FourBitWeight

_PLAIN, _NESTED = "oftjax_matmul4", "oftjax_matmul4_nested"
LIBRARY = Library(
    "_matmul4_cpu", ((_PLAIN, "OftjaxMatmul4"), (_NESTED, "OftjaxMatmul4Nested")), what="4-bit matmul"
)
# the most rows of x the kernel takes (csrc/matmul4.cc kMaxRows)
MAX_ROWS = 16


def has_avx512() -> bool:
    """Whether this machine runs the kernel's AVX-512 path (else its scalar loop, same results)."""
    lib = LIBRARY.load()[0]
    return bool(lib is not None and lib.OftjaxMatmul4HasAvx512())


def _xla(x: jax.Array, *q_ops: jax.Array, precision: Any, vectorize: bool, **meta: Any) -> tuple[jax.Array]:
    del vectorize
    fn = _registry.default("dequant_matmul_4bit")
    return (fn(x, _weight(q_ops, **meta), np.dtype(np.float32), jax.lax.dot_general, precision),)


def _cpu(x: jax.Array, *q_ops: jax.Array, precision: Any, vectorize: bool, **meta: Any) -> tuple[jax.Array]:
    del precision  # float32 on the CPU: every precision is a float32 dot
    out_features, in_features = meta["shape"]
    rows = x.reshape(-1, in_features)
    target = _NESTED if len(q_ops) == 4 else _PLAIN
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows.shape[0], out_features), np.float32))
    args = _code_operands(q_ops, out_features * in_features, meta["quant_type"])
    y = call(rows, *args, blocksize=np.int64(meta["blocksize"]), vectorize=bool(vectorize))
    return (y.reshape(*x.shape[:-1], out_features),)


MATMUL_4BIT = KernelOp("oftjax_matmul_4bit", xla=_xla, cpu=_cpu, num_results=1)


def supported(
    x: Any, q: Any, compute_dtype: Any, dot_general: Any = jax.lax.dot_general, *, vectorize: bool = True
) -> bool:
    """Whether the kernel computes ``dequant_matmul_4bit(x, q, compute_dtype, dot_general)``: a 2-D 4-bit
    weight, float32 ``x`` and compute dtype, the plain ``jax.lax.dot_general``, 1 to ``MAX_ROWS`` rows, and
    (``vectorize``) the AVX-512 path: this machine has it, ``K`` and the blocksize are multiples of 32."""
    if not (isinstance(q, FourBitWeight) and len(q.shape) == 2 and dot_general is jax.lax.dot_general):
        return False
    if np.dtype(compute_dtype) != np.float32 or jnp.result_type(x) != np.float32 or np.ndim(x) < 1:
        return False
    rows = int(np.prod(np.shape(x)[:-1], dtype=np.int64))
    if np.shape(x)[-1] != q.shape[1] or not 1 <= rows <= MAX_ROWS or LIBRARY.load()[0] is None:
        return False
    return not vectorize or (has_avx512() and q.shape[1] % 32 == 0 and q.blocksize % 32 == 0)


def dequant_matmul_4bit(
    x: jax.Array,
    q: Any,
    compute_dtype: Any,
    dot_general: Any = jax.lax.dot_general,
    precision: jax.lax.PrecisionLike = None,
    *,
    vectorize: bool = True,
) -> Any:
    """Replacement of ``oftjax.nn._forward.dequant_matmul_4bit``: the kernel where ``supported``.

    ``vectorize=False`` runs the portable scalar loop, for any ``K`` and blocksize and even where AVX-512 is
    available (tests compare the paths).
    """
    if not supported(x, q, compute_dtype, dot_general, vectorize=vectorize):
        return NotImplemented
    operands = _operands(q)
    return MATMUL_4BIT(x, *operands, precision=precision, vectorize=bool(vectorize), **_meta(q))[0]


OPERATIONS = {"dequant_matmul_4bit": dequant_matmul_4bit}
