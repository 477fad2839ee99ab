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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oftjax import oft, quant
from oftjax.nn._adapters import OFTAdapters
from oftjax.nn._base import dense_from_source, set_dense_weight, weight_source
from oftjax.nn._forward import rotation_from_vec
from oftjax.nn._settings import AdapterSettings


@dataclasses.dataclass(frozen=True)
class LayerMergeReport:
    """What merging (or unmerging) did to one layer.

    Attributes:
      adapters: the adapters merged (or unmerged) by this call, in the order applied to the weight.
      kind: "float", "int8" or "4bit".
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


def _requant_error(layer: OFTAdapters, target: jax.Array) -> tuple[float, float]:
    if layer.base_kind in ("float", "embed"):
        return 0.0, 0.0
    q = layer.weight.get_value()
    got = np.asarray(quant.dequantize(q, jnp.float32))
    want = np.asarray(target, np.float32)
    diff = got - want
    denom = float(np.linalg.norm(want)) or 1.0
    return float(np.linalg.norm(diff)) / denom, float(np.abs(diff).max(initial=0.0))


@functools.partial(jax.jit, static_argnames=("kind", "settings", "inverse"))
def _rotate_weight(
    source: Any,
    vecs: tuple[jax.Array, ...],
    *,
    kind: str,
    settings: tuple[AdapterSettings, ...],
    inverse: bool,
) -> tuple[jax.Array, tuple[jax.Array, ...], jax.Array]:
    """Jitted merge math: (rotated weight in the stored dtype, COFT-projected vecs, finiteness per step)."""
    W0 = dense_from_source(source, kind)
    W = W0.astype(jnp.float32)
    projected, finite = [], []
    for vec, s in zip(vecs, settings, strict=True):
        vec = oft.coft_project(vec, s.eps) if s.coft else vec
        projected.append(vec)
        R = rotation_from_vec(vec, s).astype(jnp.float32)
        if kind == "embed":  # output rotation: W BD (merge) / W BD^-1 (unmerge), rows as the forward's
            W = oft.rotate_input(W, oft.inverse_blocks(R) if inverse else R)
        else:
            W = oft.unmerge_rotation(W, R) if inverse else oft.merge_rotation(W, R)
        finite.append(jnp.isfinite(W).all())
    return W.astype(W0.dtype), tuple(projected), jnp.stack(finite)


def _rotated(layer: OFTAdapters, names: Sequence[str], *, inverse: bool) -> tuple[jax.Array, jax.Array]:
    source = weight_source(layer, layer.base_kind)
    settings = tuple(layer.adapters[n] for n in names)
    vecs = tuple(layer.rotation_params[n][...] for n in names)
    W, projected, finite = _rotate_weight(
        source, vecs, kind=layer.base_kind, settings=settings, inverse=inverse
    )
    for n, s, v in zip(names, settings, projected, strict=True):
        if s.coft:  # PEFT's get_delta_weight projects in place too
            layer.rotation_params[n][...] = v
    return W, finite


def _application_order(layer: OFTAdapters, names: Sequence[str]) -> list[str]:
    """The order the rotations are applied to the weight so the merged layer computes the forward."""
    if layer.base_kind == "embed":
        return list(names)  # W BD_a BD_b: the first adapter first
    # Linear: forward order a, b means W (BD_a BD_b)^T = (W BD_b^T) BD_a^T: rotate by the last adapter first.
    return list(reversed(names))


def merged_weight(layer: OFTAdapters, names: Sequence[str], *, safe_merge: bool = False) -> jax.Array:
    """The float weight ``[out, in]`` that merging ``names`` (forward order) writes, before requantization.

    ``W (BD_1 ... BD_n)^T`` computed in fp32 from the current base weight, cast to the dtype the base stores
    (float: kernel dtype; int8: fp32; 4-bit: the original weight dtype), i.e. the tensor bitsandbytes would be
    handed to quantize.
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
      >>> _ = merge_layer(layer)
      >>> bool(jnp.allclose(layer(jnp.ones((1, 4))), y, atol=1e-6))
      True
    """
    names = adapters_to_merge(layer, adapter_names)
    if not names:
        return None
    target = merged_weight(layer, names, safe_merge=safe_merge)
    applied = tuple(_application_order(layer, names))
    set_dense_weight(layer, layer.base_kind, target)
    layer.merged_adapters = (*layer.merged_adapters, *applied)
    rel, mx = _requant_error(layer, target)
    return LayerMergeReport(tuple(applied), layer.base_kind, rel, mx)


def unmerge_layer(layer: OFTAdapters) -> LayerMergeReport | None:
    """Undo every merge on the layer with the true inverse (lossy on quantized bases: it requantizes).

    Returns None (with PEFT's "Already unmerged. Nothing to do." warning) when nothing is merged.
    """
    if not layer.merged_adapters:
        warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
        return None
    undone = list(reversed(layer.merged_adapters))
    target, _ = _rotated(layer, undone, inverse=True)
    set_dense_weight(layer, layer.base_kind, target)
    layer.merged_adapters = ()
    rel, mx = _requant_error(layer, target)
    return LayerMergeReport(tuple(undone), layer.base_kind, rel, mx)
