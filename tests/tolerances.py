"""The one table of numerical tolerances used by the tests, each with its reason.

Exact comparisons (bits) do not appear here: they use ``np.testing.assert_array_equal`` on bit views.
"""

from __future__ import annotations

from typing import NamedTuple


class Tol(NamedTuple):
    rtol: float
    atol: float
    reason: str


TOL: dict[str, Tol] = {
    "fp32_forward": Tol(1e-5, 1e-6, "fp32 matmul accumulation order differs between XLA and torch (~1e-6 rel)"),
    "fp32_grad": Tol(1e-4, 1e-6, "gradients pass through two matmuls and a solve/series; order-of-ops noise"),
    "bf16_forward": Tol(1e-2, 1e-2, "1-2 bf16 ulps (2^-8) from accumulation order on O(1) outputs"),
    "fp16_forward": Tol(2e-3, 2e-3, "1-2 fp16 ulps (2^-11) from accumulation order on O(1) outputs"),
}
