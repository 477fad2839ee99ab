"""The torch side of parity: transformers + PEFT + bitsandbytes, with the CPU oracle traps disarmed.

torch, bitsandbytes, peft and transformers are imported lazily here and nowhere else in the library; a missing
package raises ``OracleUnavailable`` naming it (tests then fail, they never skip).

Traps handled (../shared/DESIGN.md "The oracle on a CPU"; notes/bitsandbytes-formats.md §7-§8):
  * bnb's AVX512-BF16 repacking of ``Linear4bit`` on the first eval forward: ``disable_cpu_repacking``.
  * bnb's CPU 4-bit dequantize bug when K % 16 == 0 and K % blocksize != 0: ``use_default_cpu_dequant``
    re-registers the pure-torch default kernel for the CPU.
"""

from __future__ import annotations

import importlib
from typing import Any


class OracleUnavailable(ImportError):
    """The torch oracle stack (torch, bitsandbytes, peft, transformers) is not installed."""


def require(module: str) -> Any:
    """Import ``module`` from the oracle stack or raise a clear ``OracleUnavailable``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - exercised only without the oracle extra
        raise OracleUnavailable(
            f"the torch oracle needs {module!r}; install it with: pip install -e '.[oracle]' ({e})"
        ) from e


_DEQUANT_FIXED = False


def use_default_cpu_dequant() -> None:
    """Route bnb's CPU ``dequantize_4bit`` to its pure-torch default kernel (idempotent).

    bitsandbytes 0.50.2's AVX512 CPU kernel indexes absmax as ``row*(K/bs) + k/bs`` and is wrong whenever
    blocks cross rows with K % 16 == 0 (notes §8.1, bnb PR #2072). The default kernel is the reference.
    """
    global _DEQUANT_FIXED
    if _DEQUANT_FIXED:
        return
    require("torch")
    bnb = require("bitsandbytes")  # noqa: F841 - registers the bnb ops
    from bitsandbytes._ops import register_kernel
    from bitsandbytes.backends.default import ops as default_ops
    from bitsandbytes.backends.utils import _get_4bit_code

    compute = getattr(default_ops._dequantize_4bit_compute, "__wrapped__", default_ops._dequantize_4bit_compute)
    torch = require("torch")

    @register_kernel("bitsandbytes::dequantize_4bit", "cpu")
    def _(A, absmax, blocksize, quant_type, shape, dtype):  # noqa: ANN001 - torch op signature
        if A.dtype != torch.uint8:
            A = A.view(torch.uint8)
        code = _get_4bit_code(quant_type, A.device)
        return compute(A.reshape(-1), absmax, code, blocksize, shape, dtype)

    _DEQUANT_FIXED = True


def disable_cpu_repacking(model: Any) -> Any:
    """Set ``support_avx512bf16_for_cpu = False`` on every bnb ``Linear4bit`` in ``model``; return it.

    Must run before the first forward: otherwise bnb repacks the weight in place, computes in bf16, breaks
    merges, drops gradients and corrupts later saves (notes §7.1, §8.2-8.3).
    """
    bnb = require("bitsandbytes")
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model
