"""Skew-symmetric matrices from OFT parameter vectors and back.

Follows PEFT's ``OFTRotationModule._pytorch_skew_symmetric`` / ``_pytorch_skew_symmetric_inv``
(peft 0.21.2, ``src/peft/tuners/oft/layer.py``): a block of size ``b`` is stored as the
``b(b-1)/2`` entries strictly above the diagonal, in ``torch.triu_indices(b, b, 1)`` order, which is
row-major: (0,1), (0,2), ..., (0,b-1), (1,2), ...
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["block_size_from_param_shape", "num_elements", "skew_from_vec", "triu_indices", "vec_from_skew"]


def num_elements(block_size: int) -> int:
    """Number of stored parameters per block, ``b(b-1)/2``.

    Example:
        >>> from oftjax.oft import num_elements
        >>> num_elements(4)
        6
    """
    return block_size * (block_size - 1) // 2


def triu_indices(block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices strictly above the diagonal, in ``torch.triu_indices(b, b, 1)`` order.

    numpy's ``triu_indices(b, 1)`` enumerates the upper triangle row by row exactly as torch does.

    Example:
        >>> from oftjax.oft import triu_indices
        >>> rows, cols = triu_indices(3)
        >>> rows.tolist(), cols.tolist()
        ([0, 0, 1], [1, 2, 2])
    """
    rows, cols = np.triu_indices(block_size, 1)
    return rows.astype(np.int32), cols.astype(np.int32)


def block_size_from_param_shape(shape: tuple[int, ...]) -> int:
    """Block size ``b`` from an ``oft_R`` parameter shape ``[..., b(b-1)/2]``.

    PEFT adjusts the block size per layer, so the tensor, not the config, is the source of truth.

    Args:
        shape: the parameter shape; only the last entry ``n`` is used.

    Returns:
        ``b`` with ``b(b-1)/2 == n``.

    Raises:
        ValueError: if ``n`` is not a triangular number ``b(b-1)/2`` with ``b >= 2``.

    Example:
        >>> from oftjax.oft import block_size_from_param_shape
        >>> block_size_from_param_shape((4, 496))
        32
    """
    if len(shape) == 0:
        raise ValueError(
            "an OFT parameter needs at least one dimension [..., b(b-1)/2]; got a scalar shape ()"
        )
    n = int(shape[-1])
    b = (1 + math.isqrt(1 + 8 * n)) // 2
    if n < 1 or num_elements(b) != n:
        raise ValueError(
            f"OFT parameter shape {tuple(shape)}: last dimension {n} is not b(b-1)/2 "
            "for any block size b >= 2 "
            "(expected 1, 3, 6, 10, 15, ...)"
        )
    return b


def skew_from_vec(vec: jax.Array, block_size: int) -> jax.Array:
    """Skew-symmetric blocks ``Q`` from parameter vectors (PEFT's ``_pytorch_skew_symmetric``).

    ``Q[..., rows, cols] = vec`` and then ``Q = Q - Q^T``, computed in that order so that the values
    match torch bit for bit.

    Args:
        vec: ``[..., b(b-1)/2]`` parameters in ``triu_indices`` order.
        block_size: ``b``.

    Returns:
        ``[..., b, b]`` skew-symmetric matrices in ``vec.dtype``.

    Example:
        >>> from oftjax.oft import skew_from_vec
        >>> Q = skew_from_vec(jnp.array([1.0, 2.0, 3.0]), 3)
        >>> Q.tolist()
        [[0.0, 1.0, 2.0], [-1.0, 0.0, 3.0], [-2.0, -3.0, 0.0]]
    """
    vec = jnp.asarray(vec)
    n = num_elements(block_size)
    if vec.ndim < 1 or vec.shape[-1] != n:
        raise ValueError(
            f"skew_from_vec: block_size {block_size} needs vec[..., {n}] (b(b-1)/2 entries); "
            f"got shape {vec.shape}"
        )
    rows, cols = triu_indices(block_size)
    Q = jnp.zeros((*vec.shape[:-1], block_size, block_size), dtype=vec.dtype)
    Q = Q.at[..., rows, cols].set(vec)
    return Q - jnp.swapaxes(Q, -1, -2)


def vec_from_skew(Q: jax.Array) -> jax.Array:
    """Parameter vectors from skew-symmetric blocks (PEFT's ``_pytorch_skew_symmetric_inv``).

    Reads the strict upper triangle in ``triu_indices`` order; the lower triangle is ignored.

    Args:
        Q: ``[..., b, b]``.

    Returns:
        ``[..., b(b-1)/2]``.

    Example:
        >>> from oftjax.oft import skew_from_vec, vec_from_skew
        >>> vec_from_skew(skew_from_vec(jnp.array([1.0, 2.0, 3.0]), 3)).tolist()
        [1.0, 2.0, 3.0]
    """
    Q = jnp.asarray(Q)
    if Q.ndim < 2 or Q.shape[-1] != Q.shape[-2]:
        raise ValueError(f"vec_from_skew: expected square blocks [..., b, b]; got shape {Q.shape}")
    rows, cols = triu_indices(Q.shape[-1])
    return Q[..., rows, cols]
