"""Merge OFT rotations into one layer's base weight and back (PEFT's ``Linear.merge`` / ``unmerge``).

* Float bases: ``W' = W BD^T`` in fp32, cast back to the kernel dtype (nnx layout: ``kernel' = BD kernel``).
* Quantized bases: dequantize (int8: fp32 as PEFT's ``int8_vectorwise_dequant``; 4-bit: the original weight
  dtype), rotate in fp32, cast to that dtype and requantize with the same format options. The packed result is
  byte-identical to what bitsandbytes produces from the same float weight (``oftjax.quant`` is bit-exact with
  bnb's CPU quantizers). The requantization error is reported.
* Unmerge uses the true inverse ``W = W' (BD^-1)^T`` (fp32 ``inv``, PEFT >= 0.18). On quantized bases it is
  lossy: each merge and each unmerge requantizes, so a merge/unmerge round trip does not restore the original
  bytes (PEFT has the same limitation).
* Several adapters merge in forward order: the forward computes ``x BD_a BD_b W^T``, so the merged weight is
  ``W (BD_a BD_b)^T = W BD_b^T BD_a^T``. PEFT merges ``W BD_a^T BD_b^T`` (wrong once blocks do not commute,
  i.e. block size >= 4); we do not reproduce that.
* Embeddings (``OFTEmbed``, PEFT's ``Embedding``) rotate the output rows: ``W' = W BD_a BD_b`` (the table
  ``[num_embeddings, d]``, fp32, cast back), unmerge ``W' BD_b^-1 BD_a^-1``; PEFT gets this order right.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from oftjax import oft
from oftjax.nn._base import base_ops
from oftjax.nn._forward import rotation_from_vec
from oftjax.nn._settings import AdapterSettings

if TYPE_CHECKING:  # the layers call into this module (disable_adapters unmerges), not the other way round
    from oftjax.nn._adapters import OFTAdapters

__all__ = ["LayerMergeReport", "adapters_to_merge", "merge_layer", "merged_weight", "unmerge_layer"]


@dataclasses.dataclass(frozen=True)
class LayerMergeReport:
    """What merging (or unmerging) did to one layer.

    Attributes:
      adapters: the adapters merged (or unmerged) by this call, in the order applied to the weight.
      kind: the base layer's type name ("Linear", "Linear8bit", "Linear4bit", "Embed").
      requant_rel_error: ``||dequant(requant(W')) - W'||_F / ||W'||_F`` for quantized bases (0.0 for float):
        what requantizing the rotated weight cost.
      requant_max_abs_error: the largest absolute element error of that requantization.
    """

    adapters: tuple[str, ...]
    kind: str
    requant_rel_error: float = 0.0
    requant_max_abs_error: float = 0.0


def adapters_to_merge(layer: OFTAdapters, adapter_names: Sequence[str] | None) -> list[str]:
    """PEFT's ``check_adapters_to_merge``: already merged adapters are skipped with PEFT's warnings."""
    if adapter_names is None:
        adapter_names = layer.active_adapters
    if isinstance(adapter_names, str):
        raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
    # As PEFT's merge loop (``if active_adapter in self.oft_R``): names this layer lacks are skipped.
    names = [n for n in adapter_names if n in layer.adapters]
    if layer.merged_adapters:
        names = [n for n in names if n not in layer.merged_adapters]
        if names:
            warnings.warn(
                f"Already following adapters were merged {','.join(layer.merged_adapters)}. "
                f"You are now additionally merging {','.join(names)}.",
                stacklevel=3,
            )
        else:
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=3)
    return names


@functools.partial(jax.jit, static_argnames=("settings", "inverse", "rotates_output"))
def _rotate_weight(
    W0: jax.Array,
    vecs: tuple[jax.Array, ...],
    *,
    settings: tuple[AdapterSettings, ...],
    inverse: bool,
    rotates_output: bool,
) -> tuple[jax.Array, tuple[jax.Array, ...], jax.Array]:
    """Jitted merge math: (rotated weight in ``W0``'s dtype, COFT-projected vecs, finiteness per step)."""
    W = W0.astype(jnp.float32)
    projected, finite = [], []
    for vec, s in zip(vecs, settings, strict=True):
        vec = oft.coft_project(vec, s.eps) if s.coft else vec
        projected.append(vec)
        R = rotation_from_vec(vec, s).astype(jnp.float32)
        if rotates_output:  # W BD (merge) / W BD^-1 (unmerge), rows rotated as the forward's outputs
            W = oft.rotate_input(W, oft.inverse_blocks(R) if inverse else R)
        else:
            W = oft.unmerge_rotation(W, R) if inverse else oft.merge_rotation(W, R)
        finite.append(jnp.isfinite(W).all())
    return W.astype(W0.dtype), tuple(projected), jnp.stack(finite)


def _rotated(layer: OFTAdapters, names: Sequence[str], *, inverse: bool) -> tuple[jax.Array, jax.Array]:
    settings = tuple(layer.adapters[n] for n in names)
    vecs = tuple(layer.rotation_params[n][...] for n in names)
    W, projected, finite = _rotate_weight(
        base_ops(layer.base_layer).dense_weight(),
        vecs,
        settings=settings,
        inverse=inverse,
        rotates_output=layer.ROTATES_OUTPUT,
    )
    for n, s, v in zip(names, settings, projected, strict=True):
        if s.coft:  # PEFT's get_delta_weight projects in place too
            layer.rotation_params[n][...] = v
    return W, finite


def _application_order(layer: OFTAdapters, names: Sequence[str]) -> list[str]:
    """The order the rotations are applied to the weight so the merged layer computes the forward."""
    if layer.ROTATES_OUTPUT:
        return list(names)  # W BD_a BD_b: the first adapter first
    # Input side: forward order a, b means W (BD_a BD_b)^T = (W BD_b^T) BD_a^T: the last adapter first.
    return list(reversed(names))


def merged_weight(layer: OFTAdapters, names: Sequence[str], *, safe_merge: bool = False) -> jax.Array:
    """The float weight ``[out, in]`` that merging ``names`` (forward order) writes, before requantization.

    ``W (BD_1 ... BD_n)^T`` computed in fp32 from the current base weight, cast to the dtype merges start from
    (``BaseLayer.dense_weight``: float: its dtype; int8: fp32; 4-bit: the original weight dtype), i.e. the
    tensor bitsandbytes would be handed to quantize.
    """
    order = _application_order(layer, names)
    W, finite = _rotated(layer, order, inverse=False)
    if safe_merge:
        for name, ok in zip(order, np.asarray(finite), strict=True):
            if not ok:
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {name} seems to be broken"
                )
    return W


def _store(layer: OFTAdapters, target: jax.Array, adapters: tuple[str, ...]) -> LayerMergeReport:
    """Write ``target`` into the base and report what storing it cost (the requantization error)."""
    ops = base_ops(layer.base_layer)
    ops.set_dense_weight(target)
    got = np.asarray(ops.dense_weight(jnp.float32))
    want = np.asarray(target, np.float32)
    diff = got - want
    denom = float(np.linalg.norm(want)) or 1.0
    rel, mx = float(np.linalg.norm(diff)) / denom, float(np.abs(diff).max(initial=0.0))
    return LayerMergeReport(adapters, type(layer.base_layer).__name__, rel, mx)


def merge_layer(
    layer: OFTAdapters, adapter_names: Sequence[str] | None = None, *, safe_merge: bool = False
) -> LayerMergeReport | None:
    """Merge adapters (default: the active ones) into the base weight; None when there is nothing to merge.

    Args:
      layer: the OFT layer.
      adapter_names: adapters to merge, in forward order; default the active adapters.
      safe_merge: check the merged weight for non-finite values before writing it (PEFT's ValueError).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from oftjax.nn import AdapterSettings, OFTLinear
      >>> layer = OFTLinear(nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
      >>> layer.add_adapter("a", AdapterSettings(r=2, block_size=2), init_weights=False, rngs=nnx.Rngs(1))
      >>> y = layer(jnp.ones((1, 4)))
      >>> merge_layer(layer).adapters
      ('a',)
      >>> bool(jnp.allclose(layer(jnp.ones((1, 4))), y, atol=1e-6))
      True
    """
    names = adapters_to_merge(layer, adapter_names)
    if not names:
        return None
    target = merged_weight(layer, names, safe_merge=safe_merge)
    applied = tuple(_application_order(layer, names))
    report = _store(layer, target, applied)
    layer.merged_adapters = (*layer.merged_adapters, *applied)
    return report


def unmerge_layer(layer: OFTAdapters) -> LayerMergeReport | None:
    """Undo every merge on the layer with the true inverse (lossy on quantized bases: it requantizes).

    Returns None (with PEFT's "Already unmerged. Nothing to do." warning) when nothing is merged.
    """
    if not layer.merged_adapters:
        warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
        return None
    undone = tuple(reversed(layer.merged_adapters))
    target, _ = _rotated(layer, undone, inverse=True)
    report = _store(layer, target, undone)
    layer.merged_adapters = ()
    return report
