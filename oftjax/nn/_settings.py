"""``AdapterSettings``: the static settings of one OFT adapter on one layer."""

from __future__ import annotations

import dataclasses
from typing import Any

from oftjax import oft

__all__ = ["AdapterSettings"]


@dataclasses.dataclass(frozen=True)
class AdapterSettings:
    """Static settings of one adapter on one layer (hashable: part of the module's graph definition).

    Attributes:
      r: number of rotation blocks applied, ``in_features // block_size`` (also with ``block_share``).
      block_size: ``b``.
      coft, eps: COFT projection (``eps / sqrt(#stored blocks)`` radius per block).
      block_share: one stored block shared by all ``r`` blocks.
      use_cayley_neumann, num_cayley_neumann_terms: Neumann series instead of exact Cayley.
      legacy_neumann: PEFT 0.16-0.17 Neumann series (adapters saved before PEFT 0.18).
      module_dropout: block dropout probability in training.

    Example:
      >>> AdapterSettings(r=2, block_size=4).param_shape
      (2, 6)
    """

    r: int
    block_size: int
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    legacy_neumann: bool = False
    module_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.r < 1 or self.block_size < 1:
            raise ValueError(
                f"AdapterSettings: r and block_size must be >= 1; got r={self.r}, b={self.block_size}"
            )
        if not 0.0 <= self.module_dropout <= 1.0:
            raise ValueError(f"AdapterSettings: module_dropout must be in [0, 1]; got {self.module_dropout}")

    @property
    def num_stored(self) -> int:
        """Rows of the parameter: 1 with block_share, else r."""
        return 1 if self.block_share else self.r

    @property
    def param_shape(self) -> tuple[int, int]:
        """``[R, b(b-1)/2]``, PEFT's ``oft_R.weight`` shape."""
        return (self.num_stored, self.block_size * (self.block_size - 1) // 2)

    @classmethod
    def from_config(cls, config: Any, in_features: int) -> AdapterSettings:
        """Settings for a layer with ``in_features`` inputs from an ``OFTConfig`` (PEFT's per-layer r/b rule).

        A block size (or r) that does not divide ``in_features`` is adjusted with PEFT's warning.
        """
        r, b = oft.resolve_block_size(in_features, config.r, config.oft_block_size)
        return cls(
            r=r,
            block_size=b,
            coft=bool(config.coft),
            eps=float(config.eps),
            block_share=bool(config.block_share),
            use_cayley_neumann=bool(config.use_cayley_neumann),
            num_cayley_neumann_terms=int(config.num_cayley_neumann_terms),
            legacy_neumann=bool(getattr(config, "legacy_neumann", False)),
            module_dropout=float(config.module_dropout),
        )
