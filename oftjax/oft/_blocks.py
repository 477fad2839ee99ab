"""Block-diagonal rotations: build them from parameters, apply them to inputs, merge them into weights.

Reference: PEFT 0.21.2 ``OFTRotationModule.forward`` / ``get_weight`` and ``oft.layer.Linear.merge`` /
``unmerge`` (``src/peft/tuners/oft/layer.py``). OFTv2 is input-centric: ``y = base(x BD(R))`` with
``BD(R) = block_diag(R_1, ..., R_r)``; merging writes ``W' = W BD^T`` (``W`` in torch layout ``[out, in]``).
Everything here works block by block; the dense ``d x d`` matrix is only built by ``block_diag``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from oftjax._registry import operation

from ._cayley import cayley, cayley_neumann
from ._skew import block_size_from_param_shape, skew_from_vec

__all__ = [
    "block_diag",
    "cayley_neumann_blocks",
    "dropout_blocks",
    "inverse_blocks",
    "merge_rotation",
    "merge_rotation_kernel",
    "rotate_blocks",
    "rotate_input",
    "rotation_blocks",
    "unmerge_rotation",
    "unmerge_rotation_kernel",
]


def _check_blocks(R_blocks: jax.Array, where: str) -> tuple[int, int]:
    if R_blocks.ndim != 3 or R_blocks.shape[-1] != R_blocks.shape[-2]:
        raise ValueError(f"{where}: expected rotation blocks [r, b, b]; got shape {R_blocks.shape}")
    return int(R_blocks.shape[0]), int(R_blocks.shape[1])


def rotation_blocks(
    vec: jax.Array,
    *,
    block_size: int,
    num_blocks: int,
    use_cayley_neumann: bool,
    num_terms: int,
    legacy: bool = False,
    block_share: bool = False,
) -> jax.Array:
    """Rotation blocks ``[num_blocks, b, b]`` from OFT parameters (PEFT's ``_cayley_batch`` + repeat).

    Args:
        vec: ``[num_blocks, b(b-1)/2]``, or ``[1, b(b-1)/2]`` with ``block_share``.
        block_size: ``b``.
        num_blocks: ``r = in_features // b`` (the number of blocks applied, also with ``block_share``).
        use_cayley_neumann: Neumann series (approximates exact Cayley *transposed*) instead of exact Cayley.
        num_terms: ``num_cayley_neumann_terms`` (ignored for exact Cayley).
        legacy: PEFT 0.16-0.17 Neumann series.
        block_share: one stored block used for all ``num_blocks`` blocks.

    Returns:
        ``[num_blocks, b, b]`` in ``vec.dtype`` (PEFT casts the Cayley result back to the parameter dtype).

    Example:
        >>> import jax.numpy as jnp
        >>> from oftjax.oft import rotation_blocks
        >>> R = rotation_blocks(
        ...     jnp.zeros((4, 6)), block_size=4, num_blocks=4, use_cayley_neumann=True, num_terms=5
        ... )
        >>> R.shape, bool((R == jnp.eye(4)).all())
        ((4, 4, 4), True)
    """
    vec = jnp.asarray(vec)
    if not jnp.issubdtype(vec.dtype, jnp.floating):
        raise TypeError(f"rotation_blocks: expected floating OFT parameters; got dtype {vec.dtype}")
    stored = 1 if block_share else num_blocks
    if vec.ndim != 2 or vec.shape[0] != stored:
        raise ValueError(
            f"rotation_blocks: expected parameters [{stored}, {block_size * (block_size - 1) // 2}] "
            f"(num_blocks={num_blocks}, block_share={block_share}); got shape {vec.shape}"
        )
    if block_size_from_param_shape(vec.shape) != block_size:
        raise ValueError(
            f"rotation_blocks: parameter shape {vec.shape} holds blocks of size "
            f"{block_size_from_param_shape(vec.shape)}, not block_size={block_size}"
        )
    if use_cayley_neumann:
        R = cayley_neumann_blocks(vec, block_size, int(num_terms), bool(legacy))
    else:
        R = cayley(skew_from_vec(vec, block_size))
    R = R.astype(vec.dtype)
    if block_share:
        R = jnp.broadcast_to(R, (num_blocks, block_size, block_size))
    return R


@operation("cayley_neumann_blocks")
def cayley_neumann_blocks(vec: jax.Array, block_size: int, num_terms: int, legacy: bool) -> jax.Array:
    """``cayley_neumann(skew_from_vec(vec, block_size), num_terms, legacy)``: blocks ``[n, b, b]`` from
    parameters ``[n, b(b-1)/2]`` (a named operation: kernels may replace it, see ``oftjax._registry``)."""
    return cayley_neumann(skew_from_vec(vec, block_size), num_terms, legacy=legacy)


def rotate_input(
    x: jax.Array,
    R_blocks: jax.Array,
    *,
    out_dtype: jnp.dtype | None = None,
    precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
    """Rotate inputs block by block: ``x BD(R)`` without building ``BD`` (PEFT's OFT forward).

    ``x[..., r*b]`` is viewed as ``[..., r, b]`` and each row-vector block multiplies its block
    (``rotate_blocks``). As PEFT does, ``x`` is cast to the rotation dtype first.

    Args:
        x: ``[..., r*b]`` inputs.
        R_blocks: ``[r, b, b]``.
        out_dtype: result dtype; default ``x.dtype`` (PEFT casts back to the input dtype before the base
            layer). Pass ``R_blocks.dtype`` when chaining adapters: PEFT keeps that dtype between them.
        precision: matmul precision (``jax.lax.Precision.HIGHEST`` forces full fp32 on TPU/GPU).

    Returns:
        ``[..., r*b]``.

    Example:
        >>> import jax.numpy as jnp
        >>> from oftjax.oft import block_diag, rotate_input
        >>> R = jnp.stack([jnp.array([[0.0, 1.0], [-1.0, 0.0]])] * 2)
        >>> x = jnp.arange(4.0)
        >>> bool(jnp.allclose(rotate_input(x, R), x @ block_diag(R)))
        True
    """
    R_blocks = jnp.asarray(R_blocks)
    r, b = _check_blocks(R_blocks, "rotate_input")
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != r * b:
        raise ValueError(
            f"rotate_input: {r} blocks of size {b} need x[..., {r * b}]; got x with shape {x.shape}"
        )
    out_dtype = x.dtype if out_dtype is None else out_dtype
    return rotate_blocks(x.astype(R_blocks.dtype), R_blocks, precision).astype(out_dtype)


@operation("rotate_blocks")
def rotate_blocks(x: jax.Array, R_blocks: jax.Array, precision: jax.lax.PrecisionLike = None) -> jax.Array:
    """``x BD(R)`` for ``x [..., r*b]`` in ``R``'s dtype (``rotate_input`` without its checks and casts).

    A named operation (kernels may replace it, see ``oftjax._registry``). ``x`` is viewed as
    ``[tokens, r, b]`` and transposed to ``[r, tokens, b]`` so that the block index is the leading batch
    dimension of one batched matmul: the products and sums of ``einsum("...rk,rkc->...rc")``, in the layout
    XLA runs fastest on the CPU (the einsum form makes XLA:CPU transpose the operands itself, slower).
    """
    r, b = int(R_blocks.shape[0]), int(R_blocks.shape[1])
    tokens = math.prod(x.shape[:-1])
    xb = x.reshape(tokens, r, b).transpose(1, 0, 2)
    y = jnp.matmul(xb, R_blocks, precision=precision)
    return y.transpose(1, 0, 2).reshape(x.shape)


def block_diag(R_blocks: jax.Array) -> jax.Array:
    """Dense block-diagonal matrix ``[r*b, r*b]`` from ``[r, b, b]`` blocks (PEFT's ``get_delta_weight``).

    Off-diagonal entries are exact zeros. Uses ``O(d^2)`` memory: prefer the blockwise functions.

    Example:
        >>> import jax.numpy as jnp
        >>> from oftjax.oft import block_diag
        >>> block_diag(jnp.ones((2, 1, 1))).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    R_blocks = jnp.asarray(R_blocks)
    r, b = _check_blocks(R_blocks, "block_diag")
    idx = jnp.arange(r)
    dense = jnp.zeros((r, b, r, b), dtype=R_blocks.dtype).at[idx, :, idx, :].set(R_blocks)
    return dense.reshape(r * b, r * b)


def _check_weight(W: jax.Array, r: int, b: int, axis: int, where: str, layout: str) -> None:
    if W.ndim != 2 or W.shape[axis] != r * b:
        raise ValueError(
            f"{where}: {r} blocks of size {b} need a weight {layout} with in_features={r * b}; "
            f"got shape {W.shape}"
        )


def merge_rotation(
    W: jax.Array, R_blocks: jax.Array, *, precision: jax.lax.PrecisionLike = None
) -> jax.Array:
    """Merge a rotation into a torch-layout weight: ``W' = W BD(R)^T``, block by block.

    Then ``x W'^T = (x BD) W^T``, the OFT forward. As PEFT, the product is computed in the rotation dtype
    and cast back to ``W.dtype``.

    Args:
        W: ``[out, in]`` weight (torch / bnb layout).
        R_blocks: ``[r, b, b]`` with ``r*b == in``.
        precision: matmul precision.

    Returns:
        ``[out, in]`` in ``W.dtype``.

    Example:
        >>> import jax.numpy as jnp
        >>> from oftjax.oft import block_diag, merge_rotation
        >>> W, R = jnp.ones((3, 4)), jnp.stack([jnp.array([[0.0, 1.0], [-1.0, 0.0]])] * 2)
        >>> bool(jnp.allclose(merge_rotation(W, R), W @ block_diag(R).T))
        True
    """
    R_blocks = jnp.asarray(R_blocks)
    r, b = _check_blocks(R_blocks, "merge_rotation")
    W = jnp.asarray(W)
    _check_weight(W, r, b, 1, "merge_rotation", "[out, in]")
    Wb = W.astype(R_blocks.dtype).reshape(W.shape[0], r, b)
    out = jnp.einsum("ork,rck->orc", Wb, R_blocks, precision=precision)
    return out.reshape(W.shape).astype(W.dtype)


def merge_rotation_kernel(
    kernel: jax.Array, R_blocks: jax.Array, *, precision: jax.lax.PrecisionLike = None
) -> jax.Array:
    """Merge a rotation into a flax-layout kernel ``[in, out]``: ``K' = BD(R) K`` (so ``x K' = (x BD) K``).

    The transpose of ``merge_rotation``: ``merge_rotation_kernel(W.T, R) == merge_rotation(W, R).T``.

    Example:
        >>> import jax.numpy as jnp
        >>> from oftjax.oft import block_diag, merge_rotation_kernel
        >>> K, R = jnp.ones((4, 3)), jnp.stack([jnp.array([[0.0, 1.0], [-1.0, 0.0]])] * 2)
        >>> bool(jnp.allclose(merge_rotation_kernel(K, R), block_diag(R) @ K))
        True
    """
    R_blocks = jnp.asarray(R_blocks)
    r, b = _check_blocks(R_blocks, "merge_rotation_kernel")
    kernel = jnp.asarray(kernel)
    _check_weight(kernel, r, b, 0, "merge_rotation_kernel", "kernel [in, out]")
    Kb = kernel.astype(R_blocks.dtype).reshape(r, b, kernel.shape[1])
    out = jnp.einsum("rkc,rco->rko", R_blocks, Kb, precision=precision)
    return out.reshape(kernel.shape).astype(kernel.dtype)


def inverse_blocks(R_blocks: jax.Array) -> jax.Array:
    """Blockwise true inverse, computed in fp32 and cast back (PEFT >= 0.18's ``linalg.inv`` in fp32).

    ``BD(R)^-1 == BD(R^-1)``; the Neumann series is not exactly orthogonal, so the transpose is not its
    inverse.

    Example:
        >>> import jax.numpy as jnp
        >>> from oftjax.oft import inverse_blocks
        >>> inverse_blocks(2 * jnp.ones((1, 1, 1))).tolist()
        [[[0.5]]]
    """
    R_blocks = jnp.asarray(R_blocks)
    _check_blocks(R_blocks, "inverse_blocks")
    dtype = R_blocks.dtype if jnp.dtype(R_blocks.dtype).itemsize >= 4 else jnp.dtype(jnp.float32)
    return jnp.linalg.inv(R_blocks.astype(dtype)).astype(R_blocks.dtype)


def unmerge_rotation(
    W: jax.Array, R_blocks: jax.Array, *, precision: jax.lax.PrecisionLike = None
) -> jax.Array:
    """Undo ``merge_rotation``: ``W = W' (BD(R)^-1)^T`` with a true inverse (PEFT >= 0.18 unmerge).

    Example:
        >>> import jax.numpy as jnp
        >>> from oftjax.oft import merge_rotation, unmerge_rotation
        >>> W, R = jnp.ones((3, 4)), jnp.stack([jnp.array([[1.0, 0.5], [0.0, 1.0]])] * 2)
        >>> bool(jnp.allclose(unmerge_rotation(merge_rotation(W, R), R), W))
        True
    """
    return merge_rotation(W, inverse_blocks(R_blocks), precision=precision)


def unmerge_rotation_kernel(
    kernel: jax.Array, R_blocks: jax.Array, *, precision: jax.lax.PrecisionLike = None
) -> jax.Array:
    """Undo ``merge_rotation_kernel``: ``K = BD(R)^-1 K'`` (true inverse in fp32).

    Example:
        >>> import jax.numpy as jnp
        >>> from oftjax.oft import merge_rotation_kernel, unmerge_rotation_kernel
        >>> K, R = jnp.ones((4, 3)), jnp.stack([jnp.array([[1.0, 0.5], [0.0, 1.0]])] * 2)
        >>> bool(jnp.allclose(unmerge_rotation_kernel(merge_rotation_kernel(K, R), R), K))
        True
    """
    return merge_rotation_kernel(kernel, inverse_blocks(R_blocks), precision=precision)


def dropout_blocks(R_blocks: jax.Array, p: float, key: jax.Array, *, block_share: bool = False) -> jax.Array:
    """Multiplicative block dropout: ``int(p * r)`` randomly chosen blocks become the identity.

    PEFT's ``MultiplicativeDropoutLayer`` semantics (no rescaling; a single shared block is never dropped).
    PEFT builds this layer but has not called it since 0.16, so its ``module_dropout`` is a no-op; we apply it
    in training. Call it only in training mode.

    Args:
        R_blocks: ``[r, b, b]`` rotation blocks.
        p: ``module_dropout`` probability in ``[0, 1]``.
        key: PRNG key.
        block_share: the blocks are one shared block repeated; PEFT skips dropout then (its ``D == 1`` case).

    Returns:
        ``[r, b, b]``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from oftjax.oft import dropout_blocks
        >>> R = dropout_blocks(jnp.zeros((4, 2, 2)), 0.5, jax.random.key(0))
        >>> int((R == jnp.eye(2)).all(axis=(1, 2)).sum())
        2
    """
    R_blocks = jnp.asarray(R_blocks)
    r, b = _check_blocks(R_blocks, "dropout_blocks")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout_blocks: p (module_dropout) must be in [0, 1]; got {p}")
    num_to_replace = int(p * r)
    if block_share or r == 1 or num_to_replace == 0:
        return R_blocks
    # PEFT: mask = cat(ones(n), zeros(r - n))[randperm(r)], so block i is dropped iff perm[i] < n.
    perm = jax.random.permutation(key, r)
    drop = (perm < num_to_replace)[:, None, None]
    return jnp.where(drop, jnp.eye(b, dtype=R_blocks.dtype), R_blocks)
