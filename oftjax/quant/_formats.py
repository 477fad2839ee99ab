"""bitsandbytes' quantized weight formats as frozen JAX pytrees.

Layouts follow bitsandbytes 0.50.2 (``bitsandbytes/functional.py``: ``QuantState``, ``quantize_4bit``,
``int8_vectorwise_quant``) exactly, so that a checkpoint tensor maps to a leaf with no conversion:
see docs/bitsandbytes-formats.md, "Code tables" and "Serialized layout".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """LLM.int8 row-wise quantized weight (bnb ``Int8Params``, "row" format).

    Invariants:
      * ``CB``: int8 ``[out, in]``, row-major; ``CB[i, j] = rne(W16[i, j] * fl32(fl32(1/SCB[i]) * 127))``
        where ``W16`` is the weight cast to float16 first.
      * ``SCB``: float32 ``[out]``, the row absmax of the fp16-cast weight (exactly representable in fp16;
        ``inf`` for a row holding |w| > 65504, 0 for an all-zero row).
      * ``dtype`` (static): the dtype of the original weight; ``dequantize`` returns it by default.
    """

    CB: jax.Array
    SCB: jax.Array
    dtype: np.dtype = dataclasses.field(default=np.dtype("float32"), metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.CB.shape)  # type: ignore[return-value]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FourBitWeight:
    """NF4 / FP4 blockwise quantized weight (bnb ``Params4bit`` + ``QuantState``).

    Invariants (n = prod(shape), nb = ceil(n / blocksize)):
      * ``packed``: the packed bytes exactly as bnb stores them, in the quant_storage dtype, shape
        ``[ceil(n/2) / itemsize, 1]``. Viewed as uint8 and flattened (C order), byte k holds element 2k in its
        high nibble and element 2k+1 in its low nibble; for odd n the last low nibble is padding (code of
        0.0).
      * ``absmax``: float32 ``[nb]`` without double quantization; uint8 ``[nb]`` (8-bit dynamic-map codes of
        ``absmax - offset``) with it.
      * ``nested_absmax``: float32 ``[ceil(nb / 256)]`` or None; ``offset``: float32 scalar or None. Both are
        present exactly when the statistics are compressed (double quantization).
      * static: ``shape`` (the true weight shape), ``dtype`` (original weight dtype, the default output dtype
        of ``dequantize``), ``blocksize`` (one of BLOCKSIZES), ``quant_type`` ("nf4" or "fp4").
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None = None
    offset: jax.Array | None = None
    shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    dtype: np.dtype = dataclasses.field(default=np.dtype("float32"), metadata=dict(static=True))
    blocksize: int = dataclasses.field(default=64, metadata=dict(static=True))
    quant_type: str = dataclasses.field(default="nf4", metadata=dict(static=True))

    @property
    def compress_statistics(self) -> bool:
        return self.nested_absmax is not None

    @property
    def quant_storage(self) -> Any:
        return self.packed.dtype

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))
