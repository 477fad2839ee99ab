"""Merge OFT adapters into the base weights of a model, and undo it.

Per layer (``oftjax.nn._merge``): float bases merge ``W BD^T`` in fp32; quantized bases dequantize, rotate and
requantize with the same format options (byte-identical to bitsandbytes quantizing the same float weight) and
report the requantization error; unmerge uses the true inverse, which is lossy on quantized bases (every
merge/unmerge requantizes). Several adapters merge in forward order (PEFT merges them in the reverse order,
which is wrong once block size >= 4). A merged layer's forward skips the merged rotations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from flax import nnx

from oftjax.nn._merge import LayerMergeReport, merge_layer, unmerge_layer
from oftjax.surgery import oft_layers

__all__ = ["LayerMergeReport", "MergeReport", "merge", "unmerge"]


@dataclasses.dataclass(frozen=True)
class MergeReport:
    """Per-layer results of ``merge`` / ``unmerge``: ``layers`` maps dotted path -> ``LayerMergeReport``."""

    layers: dict[str, LayerMergeReport]

    @property
    def max_requant_rel_error(self) -> float:
        """The worst relative Frobenius requantization error over the layers (0.0 for float bases)."""
        return max((r.requant_rel_error for r in self.layers.values()), default=0.0)

    def __str__(self) -> str:
        rows = [f"{'layer':<48} {'kind':<5} {'adapters':<20} {'requant rel':>11} {'max abs':>9}"]
        for path, r in self.layers.items():
            rows.append(
                f"{path:<48} {r.kind:<5} {','.join(r.adapters):<20} {r.requant_rel_error:>11.3e} "
                f"{r.requant_max_abs_error:>9.2e}"
            )
        return "\n".join(rows)


def merge(
    model: nnx.Module, adapter_names: Sequence[str] | None = None, safe_merge: bool = False
) -> MergeReport:
    """Merge adapters (default: each layer's active ones) into the base weights, in forward order.

    Already merged adapters are skipped with PEFT's warnings; ``safe_merge`` raises PEFT's
    ``ValueError("NaNs detected in the merged weights. The adapter {name} seems to be broken")``.

    Returns:
      A ``MergeReport`` (layers that had nothing to merge are left out).

    Example:
      >>> from flax import nnx
      >>> from oftjax.config import OFTConfig
      >>> from oftjax.surgery import apply_oft
      >>> class M(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.lin = nnx.Linear(4, 2, rngs=rngs)
      >>> m = M(nnx.Rngs(0))
      >>> _ = apply_oft(m, OFTConfig(oft_block_size=2, target_modules=["lin"]))
      >>> list(merge(m).layers)
      ['lin']
    """
    layers = list(oft_layers(model))
    if isinstance(adapter_names, str):
        raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
    if adapter_names is not None:
        known = {n for _, layer in layers for n in layer.adapters}
        unknown = [n for n in adapter_names if n not in known]
        if unknown:
            raise ValueError(f"cannot merge unknown adapter(s) {unknown}; the model has {sorted(known)}")
    reports = {}
    for path, layer in layers:
        report = merge_layer(layer, adapter_names, safe_merge=safe_merge)
        if report is not None:
            reports[path] = report
    return MergeReport(reports)


def unmerge(model: nnx.Module) -> MergeReport:
    """Undo every merge with the true inverse (lossy on quantized bases: the weight is requantized)."""
    reports = {}
    for path, layer in oft_layers(model):
        if layer.merged_adapters:
            reports[path] = unmerge_layer(layer)
    return MergeReport(reports)
