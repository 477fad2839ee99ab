"""Cayley maps of skew-symmetric blocks: exact and PEFT's truncated Neumann series.

Reference: PEFT 0.21.2 ``OFTRotationModule._cayley_batch`` (``src/peft/tuners/oft/layer.py``) and the
OFTv2 paper (Qiu et al., "Orthogonal Finetuning Made Scalable", arXiv 2506.19847).

The two parameterizations are *transposes* of each other: exact Cayley is ``(I - Q)(I + Q)^-1`` while
the Neumann series approximates ``(I + Q)(I - Q)^-1 = ((I - Q)(I + Q)^-1)^T``. Loading an adapter with
``use_cayley_neumann`` flipped therefore rotates the other way; keep the flag with the adapter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["cayley", "cayley_neumann"]


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    # PEFT builds the identity with torch.eye's default dtype (fp32), so I + Q promotes a bf16/fp16
    # Q to fp32 and the solve runs in fp32; fp64 stays fp64.
    dtype = jnp.dtype(dtype)
    return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def cayley(Q: jax.Array) -> jax.Array:
    """Exact Cayley transform ``R = (I - Q)(I + Q)^-1`` of skew-symmetric blocks.

    Computed as PEFT's ``torch.linalg.solve(I + Q, I - Q, left=False)``, i.e. the ``X`` with
    ``X (I + Q) = I - Q``, solved as ``(I + Q)^T X^T = (I - Q)^T``. The solve runs in at least fp32
    (PEFT's identity is fp32) and the result is cast back to ``Q.dtype``. For skew-symmetric ``Q``
    the result is orthogonal.

    Args:
        Q: ``[..., b, b]`` skew-symmetric blocks.

    Returns:
        ``[..., b, b]`` in ``Q.dtype``.

    Example:
        >>> from oftjax.oft import cayley, skew_from_vec
        >>> R = cayley(skew_from_vec(jnp.array([0.3]), 2))
        >>> bool(jnp.allclose(R @ R.T, jnp.eye(2), atol=1e-6))
        True
    """
    Q = jnp.asarray(Q)
    if Q.ndim < 2 or Q.shape[-1] != Q.shape[-2]:
        raise ValueError(f"cayley: expected square blocks [..., b, b]; got shape {Q.shape}")
    dtype = _compute_dtype(Q.dtype)
    Qc = Q.astype(dtype)
    eye = jnp.eye(Q.shape[-1], dtype=dtype)
    A = eye + Qc
    B = eye - Qc
    X_T = jnp.linalg.solve(jnp.swapaxes(A, -1, -2), jnp.swapaxes(B, -1, -2))
    return jnp.swapaxes(X_T, -1, -2).astype(Q.dtype)


def cayley_neumann(Q: jax.Array, num_terms: int, legacy: bool = False) -> jax.Array:
    """PEFT's Cayley-Neumann series, an approximation of ``(I + Q)(I - Q)^-1`` (= exact Cayley transposed).

    PEFT >= 0.18 (``legacy=False``), ``t = num_terms``:
    ``t=1: I``; ``t=2: I + 2Q``; ``t=3, 4: I + 2Q + 2Q^2 + Q^3``;
    ``t>=5: I + 2 sum_{k=1}^{t-2} Q^k + Q^{t-1}``.

    PEFT 0.16-0.17 (``legacy=True``): ``I + 2 sum_{k=1}^{t-1} Q^k``.

    Terms are accumulated in PEFT's order (``R += 2Q``, ``R += 2Q^2``, ...; powers by right
    multiplication ``Q^k = Q^{k-1} Q``) in ``Q.dtype``, so fp32 results match torch up to matmul
    accumulation order.

    Args:
        Q: ``[..., b, b]`` skew-symmetric blocks.
        num_terms: PEFT's ``num_cayley_neumann_terms`` (>= 1).
        legacy: use the PEFT 0.16-0.17 series (adapters saved with ``peft_version`` < 0.18).

    Returns:
        ``[..., b, b]`` in ``Q.dtype``.

    Example:
        >>> from oftjax.oft import cayley_neumann, skew_from_vec
        >>> Q = skew_from_vec(jnp.array([0.1]), 2)
        >>> bool(jnp.allclose(cayley_neumann(Q, 2), jnp.eye(2) + 2 * Q))
        True
    """
    Q = jnp.asarray(Q)
    if Q.ndim < 2 or Q.shape[-1] != Q.shape[-2]:
        raise ValueError(f"cayley_neumann: expected square blocks [..., b, b]; got shape {Q.shape}")
    num_terms = int(num_terms)
    if num_terms < 1:
        raise ValueError(f"cayley_neumann: num_terms must be >= 1 (1 gives the identity); got {num_terms}")
    two = jnp.asarray(2, dtype=Q.dtype)
    R = jnp.broadcast_to(jnp.eye(Q.shape[-1], dtype=Q.dtype), Q.shape)
    if num_terms == 1:
        return R
    # 2 * X is exact, so R + 2 * X rounds once, like torch's R.add_(X, alpha=2.0).
    R = R + two * Q
    if num_terms == 2:
        return R
    Q_power = jnp.matmul(Q, Q)
    R = R + two * Q_power
    if legacy:
        # PEFT 0.16-0.17: for i in range(3, t): Q_power = Q_power @ Q; R += 2 * Q_power
        for _ in range(3, num_terms):
            Q_power = jnp.matmul(Q_power, Q)
            R = R + two * Q_power
        return R
    # PEFT >= 0.18: middle terms weighted 2, the last one weighted 1.
    for _ in range(3, num_terms - 1):
        Q_power = jnp.matmul(Q_power, Q)
        R = R + two * Q_power
    Q_power = jnp.matmul(Q_power, Q)
    return R + Q_power
