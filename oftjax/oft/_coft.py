"""COFT (constrained OFT) projection of the rotation parameters.

Reference: PEFT 0.21.2 ``OFTRotationModule._project_batch`` (copied there from Zeju1997/oft,
``oft-control/oft.py`` L52). PEFT projects the parameter *in place* under ``no_grad`` before every forward,
so its gradient is the gradient of the rotation evaluated at the projected point. ``coft_project``
reproduces that as a pure function: its value is the projection and its derivative is the identity
(straight-through); the caller writes the projected value back into its state, as PEFT does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ._skew import block_size_from_param_shape, skew_from_vec, vec_from_skew

__all__ = ["coft_eps", "coft_project"]


def coft_eps(eps: float, num_stored_blocks: int) -> np.float32:
    """PEFT's per-block radius ``eps / sqrt(R)``, rounded as torch computes it (in fp32).

    PEFT: ``eps * 1 / torch.sqrt(torch.tensor(R))``; the int tensor's sqrt is fp32 and the Python float
    is rounded to fp32 before the division.

    Example:
        >>> from oftjax.oft import coft_eps
        >>> float(coft_eps(1e-2, 4))
        0.004999999888241291
    """
    return np.float32(eps) / np.sqrt(np.float32(num_stored_blocks))


def _project(vec: jax.Array, eps: float) -> jax.Array:
    b = block_size_from_param_shape(vec.shape)
    Q = skew_from_vec(vec, b)
    # eps' is an fp32 0-dim tensor in torch; against a bf16/fp16 parameter torch computes in the
    # parameter's dtype, so cast it.
    eps_r = jnp.asarray(coft_eps(eps, vec.shape[0]), dtype=vec.dtype)
    # PEFT: diff = Q - 0; norm = torch.norm(diff, dim=(1, 2)) (Frobenius of the full skew matrix).
    norm = jnp.sqrt(jnp.sum(Q * Q, axis=(-2, -1), keepdims=True))
    inside = norm <= eps_r
    # Guard the division so the unselected branch is finite (norm == 0 is always "inside").
    safe_norm = jnp.where(inside, jnp.ones_like(norm), norm)
    out = jnp.where(inside, Q, eps_r * (Q / safe_norm))
    return vec_from_skew(out)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _project_straight_through(vec: jax.Array, eps: float) -> jax.Array:
    return _project(vec, eps)


@_project_straight_through.defjvp
def _project_jvp(eps, primals, tangents):
    (vec,) = primals
    (vec_dot,) = tangents
    # PEFT projects under no_grad and copies into the parameter: the projection is invisible to autograd.
    return _project(vec, eps), vec_dot


def coft_project(vec: jax.Array, eps: float) -> jax.Array:
    """Project OFT parameters onto COFT's constraint set (PEFT's ``_project_batch``).

    For each stored block ``k``: ``Q_k = skew(vec[k])``, ``eps' = eps / sqrt(R)`` with ``R = vec.shape[0]``
    stored blocks, ``nu_k = ||Q_k||_F`` (the full skew matrix, i.e. ``sqrt(2) * ||vec[k]||``); if
    ``nu_k > eps'`` then ``Q_k <- eps' * Q_k / nu_k``. Blocks inside the ball are unchanged (bitwise).

    The derivative is the identity (straight-through), matching PEFT's in-place ``no_grad`` projection:
    differentiate ``f(coft_project(v))`` and you get ``f'`` evaluated at the projected point.

    Args:
        vec: ``[R, b(b-1)/2]`` parameters (``R = r``, or 1 with block_share).
        eps: COFT's ``eps`` (config value, before the ``1/sqrt(R)`` scaling).

    Returns:
        The projected parameters, same shape and dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> from oftjax.oft import coft_project
        >>> v = coft_project(jnp.ones((2, 6)), 1e-2)
        >>> round(float(jnp.sqrt(2 * jnp.sum(v[0] ** 2))), 6)  # ||Q_0|| == eps / sqrt(2)
        0.007071
    """
    vec = jnp.asarray(vec)
    if vec.ndim != 2:
        raise ValueError(f"coft_project: expected parameters [R, b(b-1)/2]; got shape {vec.shape}")
    if not jnp.issubdtype(vec.dtype, jnp.floating):
        raise TypeError(f"coft_project: expected a floating parameter array; got dtype {vec.dtype}")
    if eps < 0:
        raise ValueError(f"coft_project: eps must be >= 0; got {eps}")
    return _project_straight_through(vec, float(eps))
