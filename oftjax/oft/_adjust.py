"""Per-layer choice of ``r`` and block size, with PEFT's adjustment rule and warning text.

Reference: PEFT 0.21.2 ``OFTLayer.adjust_oft_parameters`` and ``OFTLayer.update_layer``
(``src/peft/tuners/oft/layer.py``).
"""

from __future__ import annotations

import warnings

__all__ = ["adjust_oft_parameters", "resolve_block_size"]


def adjust_oft_parameters(in_features: int, params: int) -> int:
    """PEFT's rule to make ``params`` (a block size or ``r``) divide ``in_features``.

    If ``params >= in_features`` return ``in_features``; otherwise take the nearest divisor above and the
    nearest divisor below ``params`` and return the closer one (ties go to the lower one).

    Example:
        >>> from oftjax.oft import adjust_oft_parameters
        >>> adjust_oft_parameters(64, 24)
        16
    """
    if params < in_features:
        higher_params = params
        while higher_params <= in_features and in_features % higher_params != 0:
            higher_params += 1
    else:
        return in_features

    lower_params = params
    while lower_params > 1 and in_features % lower_params != 0:
        lower_params -= 1

    if (params - lower_params) <= (higher_params - params):
        return lower_params
    return higher_params


def resolve_block_size(in_features: int, r: int, oft_block_size: int) -> tuple[int, int]:
    """The ``(r, block_size)`` PEFT uses for a layer with ``in_features`` inputs.

    Exactly one of ``r`` and ``oft_block_size`` must be non-zero (as in ``OFTConfig``). An invalid value
    is adjusted with ``adjust_oft_parameters`` and PEFT's warning, e.g.
    ``Invalid `oft_block_size` (24)! Adjusted `oft_block_size` to (16).``

    Args:
        in_features: the rotated dimension ``d``.
        r: number of blocks, or 0.
        oft_block_size: block size, or 0.

    Returns:
        ``(r, block_size)`` with ``r * block_size == in_features``.

    Example:
        >>> from oftjax.oft import resolve_block_size
        >>> resolve_block_size(64, 0, 16)
        (4, 16)
    """
    if in_features < 1:
        raise ValueError(f"resolve_block_size: in_features must be >= 1; got {in_features}")
    if r < 0 or oft_block_size < 0:
        raise ValueError(
            f"resolve_block_size: r and oft_block_size must be >= 0; got r={r}, b={oft_block_size}"
        )
    if r == 0 and oft_block_size != 0:
        if in_features % oft_block_size != 0 or oft_block_size > in_features:
            old = oft_block_size
            oft_block_size = adjust_oft_parameters(in_features, oft_block_size)
            warnings.warn(
                f"Invalid `oft_block_size` ({old})! Adjusted `oft_block_size` to ({oft_block_size}).",
                stacklevel=2,
            )
        r = in_features // oft_block_size
    elif r != 0 and oft_block_size == 0:
        if in_features % r != 0 or r > in_features:
            old = r
            r = adjust_oft_parameters(in_features, r)
            warnings.warn(f"Invalid `r` ({old})! Adjusted `r` to ({r}).", stacklevel=2)
        oft_block_size = in_features // r
    else:
        raise ValueError(
            f"Specify exactly one of r ({r}) and oft_block_size ({oft_block_size}) as non-zero; "
            "set the other to 0."
        )
    return r, oft_block_size
