"""bitsandbytes' int8 and NF4/FP4 weight formats in pure JAX, bit-exact with bitsandbytes 0.50.2.

* ``quantize_int8(w)`` -> ``Int8Weight``; ``quantize_4bit(w, quant_type, blocksize, compress_statistics,
  quant_storage)`` -> ``FourBitWeight``; ``dequantize(q, dtype=None)`` for both. All jit-able; each public
  function compiles once per shape and format. ``rounding="cpu"`` (default) is bit-exact with bitsandbytes on
  the CPU, ``rounding="cuda"`` follows the CUDA kernels where they differ.
* ``llm_int8_matmul(x, q, bias, threshold=, rounding=)``: bnb's eval-mode int8 forward (LLM.int8: row-wise
  int8 activations, int32 accumulation, outlier columns in float), built from ``quantize_activations``,
  ``int8_matmul`` and ``rescale_int32``; bit-exact with bnb on the CPU up to the float outlier matmul.
* Pure JAX on every backend. ``oftjax.cpu_kernels.enable()`` replaces the 4-bit dequantize by a C++ kernel
  on the CPU with the same bits, except that it keeps float32 subnormal products as bitsandbytes does.
* Host side: the double-quantization statistics (a torch-order float32 mean and the nested 8-bit codes of the
  n / blocksize absmax values) run in numpy via ``jax.pure_callback``; everything else is XLA.
* Subnormal float32 *inputs* are flushed to zero by XLA:CPU (bitsandbytes keeps them); the subnormal values
  bnb itself produces (absmax 1e-38 of an all-zero ragged block, statistics of near-zero weights) are exact.

The numerics this package reproduces: docs/bitsandbytes-formats.md.
"""

from oftjax.quant._dequant import dequantize as dequantize
from oftjax.quant._formats import BLOCKSIZES as BLOCKSIZES
from oftjax.quant._formats import NESTED_BLOCKSIZE as NESTED_BLOCKSIZE
from oftjax.quant._formats import QUANT_TYPES as QUANT_TYPES
from oftjax.quant._formats import FourBitWeight as FourBitWeight
from oftjax.quant._formats import Int8Weight as Int8Weight
from oftjax.quant._int8_matmul import QuantizedActivations as QuantizedActivations
from oftjax.quant._int8_matmul import int8_matmul as int8_matmul
from oftjax.quant._int8_matmul import llm_int8_matmul as llm_int8_matmul
from oftjax.quant._int8_matmul import quantize_activations as quantize_activations
from oftjax.quant._int8_matmul import rescale_int32 as rescale_int32
from oftjax.quant._quant4 import QUANT_STORAGES as QUANT_STORAGES
from oftjax.quant._quant4 import ROUNDINGS as ROUNDINGS
from oftjax.quant._quant4 import quantize_4bit as quantize_4bit
from oftjax.quant._quant8 import quantize_int8 as quantize_int8
from oftjax.quant._tables import DYNAMIC as DYNAMIC
from oftjax.quant._tables import FP4 as FP4
from oftjax.quant._tables import NF4 as NF4
from oftjax.quant._tables import code_table as code_table

__all__ = [
    "BLOCKSIZES",
    "DYNAMIC",
    "FP4",
    "NESTED_BLOCKSIZE",
    "NF4",
    "QUANT_STORAGES",
    "QUANT_TYPES",
    "ROUNDINGS",
    "FourBitWeight",
    "Int8Weight",
    "QuantizedActivations",
    "code_table",
    "dequantize",
    "int8_matmul",
    "llm_int8_matmul",
    "quantize_4bit",
    "quantize_activations",
    "quantize_int8",
    "rescale_int32",
]
