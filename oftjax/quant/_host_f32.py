"""Exact float32 arithmetic on the host, immune to flush-to-zero (numpy, float64 carriers).

XLA:CPU runs its threads, ``jax.pure_callback`` bodies included, with the FTZ/DAZ flags set, so float32
subnormals become zero there (even ``np.float32(1e-38)`` does). bitsandbytes (torch) keeps them, and they
occur in real formats: an all-zero ragged 4-bit block stores absmax 1e-38 and the double-quant statistics of a
near-zero weight are subnormal. Here a float32 value is carried as the float64 holding exactly the same value
(float32 subnormals are normal float64 numbers), each operation is done in float64 and rounded back to float32
by ``r32``; one float64 +, -, *, / followed by rounding to float32 equals the float32 operation
(53 >= 2*24 + 2, so the double rounding is innocuous). The subnormal range is rounded with integer arithmetic.
"""

from __future__ import annotations

import numpy as np

_F64 = np.float64
_TWO_149 = 2.0**149
_MIN_NORMAL = 2.0**-126


def decode(a: np.ndarray) -> np.ndarray:
    """float32 array (or its uint32 bits) -> float64 array of the same values, decoded from the bits."""
    a = np.asarray(a)
    u = (a if a.dtype == np.uint32 else a.astype(np.float32, copy=False).view(np.uint32)).astype(np.int64)
    sign = np.where(u >> 31, -1.0, 1.0)
    e = (u >> 23) & 0xFF
    m = u & 0x7FFFFF
    finite = np.ldexp(np.where(e == 0, m, m | 0x800000).astype(_F64), np.where(e == 0, -149, e - 150))
    special = np.where(m == 0, np.inf, np.nan)
    return sign * np.where(e == 255, special, finite)


def r32(c: np.ndarray | float) -> np.ndarray:
    """Round float64 values to the nearest float32 value (ties to even, subnormals kept); float64 out."""
    c = np.asarray(c, _F64)
    with np.errstate(over="ignore", invalid="ignore"):
        normal = np.asarray(c, np.float32).astype(_F64)  # exact when the float32 result is normal or inf
        sub = np.rint(c * _TWO_149) / _TWO_149  # float32 subnormal grid: multiples of 2**-149, half-even
    return np.where(np.abs(c) < _MIN_NORMAL, sub, normal)


def encode(c: np.ndarray | float) -> np.ndarray:
    """float64 values that are exact float32 values -> their float32 bit patterns (uint32)."""
    c = np.asarray(c, _F64)
    with np.errstate(over="ignore", invalid="ignore"):
        sub_bits = (np.rint(np.abs(np.nan_to_num(c)) * _TWO_149)).astype(np.uint32) | np.where(
            np.signbit(c), np.uint32(0x80000000), np.uint32(0)
        )
        normal_bits = np.asarray(c, np.float32).view(np.uint32)
    return np.where(np.abs(c) < _MIN_NORMAL, sub_bits, normal_bits).astype(np.uint32)
