"""PEFT OFT adapter files as plain data: config keys, tensor keys, format versions (numpy only).

The one place where PEFT's external names are translated. Reference: PEFT 0.21.2
``tuners/oft/{config,layer,model}.py`` and ``utils/save_and_load.py``; the file format and its history are in
docs/peft-oft.md, "Adapter files" and "Versions of the OFT parameterization":

| PEFT        | tensors                                         | how we read it                          |
|-------------|-------------------------------------------------|-----------------------------------------|
| <= 0.13     | ``oft_r`` [r, out/r, out/r], no oft_block_size  | refused: rotates the output side        |
| 0.14-0.15   | ``oft_r`` [r, b, b] + ``oft_s`` [out, 1]        | converted exactly when ``oft_s`` == 1   |
| 0.16-0.17   | ``oft_R.weight`` [r or 1, b(b-1)/2]             | as is; Cayley-Neumann -> legacy series  |
| >= 0.18     | same, ``peft_version`` in the config            | as is                                   |
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from oftjax.config import OFTConfig

from ._io import InteropError

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Config keys that are not OFTConfig fields, each knowingly ignored, with the reason.
IGNORED_CONFIG_KEYS: dict[str, str] = {
    "auto_mapping": "names the torch model class and library PEFT imported it from; meaningless in JAX",
    "peft_type": "checked to be 'OFT' and then implied",
}
# Keys of PEFT <= 0.13 (Lycoris-based OFTConfig): only reached when refusing such an adapter.
_LEGACY_013_KEYS = frozenset({"rank_pattern", "alpha_pattern"})
# Our own OFTConfig fields that are not PEFT config keys (never read from or written to adapter_config.json).
_OURS_ONLY = frozenset({"legacy_neumann"})

# Tensor key kinds: rotation parameters and the base-layer biases PEFT saves with bias="oft_only"/"all".
ROTATION_KINDS = ("oft_R", "oft_embedding_R")
_ROT_RE = re.compile(r"^(?P<path>.+)\.(?P<kind>oft_R|oft_embedding_R)\.weight$")
_OLD_RE = re.compile(r"^(?P<path>.+)\.(?P<kind>oft_r|oft_s)$")
_BASE_BIAS_RE = re.compile(r"^(?P<path>.+)\.base_layer\.bias$")
# PEFT's save_pretrained also writes the base table of a targeted input embedding of a transformers model
# (``save_embedding_layers="auto"``: "Setting `save_embedding_layers` to `True` as embedding layers found in
# `target_modules`"), as ``<module>.base_layer.weight`` next to its ``oft_embedding_R.weight``.
_EMBED_BASE_RE = re.compile(r"^(?P<path>.+)\.base_layer\.weight$")


def config_fields() -> frozenset[str]:
    """The PEFT config keys OFTConfig handles (its dataclass fields, less our own)."""
    return frozenset(f.name for f in dataclasses.fields(OFTConfig)) - _OURS_ONLY


def precheck_config(raw: Mapping[str, Any], source: Path) -> None:
    """Refuse non-OFT and PEFT <= 0.13 configs before anything else (so the reason is the real one)."""
    peft_type = raw.get("peft_type")
    if peft_type != "OFT":
        raise InteropError(
            f"{source}: 'peft_type' is {peft_type!r}; expected 'OFT' (this reads OFT adapters only)"
        )
    if "oft_block_size" not in raw:
        raise InteropError(
            f"{source}: no 'oft_block_size' key, so this is a PEFT <= 0.13 OFT adapter. Those rotate the "
            "output side of the weight (R @ W, blocks of ceil(out/r)), which the current input-side format "
            "cannot represent; retrain the adapter with PEFT >= 0.14 or use PEFT 0.13 to run it."
        )


def config_from_json(raw: Mapping[str, Any], source: Path) -> tuple[OFTConfig, dict[str, Any]]:
    """Validate an adapter_config.json dict and build an OFTConfig (``OFTConfig.from_dict``).

    A PEFT 0.16-0.17 Cayley-Neumann adapter (``peft_version`` missing or < 0.18) gets ``legacy_neumann=True``
    and a warning (from ``from_dict``): PEFT 0.21 would evaluate it with the newer series.

    Returns:
      The config and the knowingly ignored keys' values (kept so a round trip can write them back).

    Raises:
      InteropError: not an OFT config, a <= 0.13 config, an unknown key (named) or an invalid value.
    """
    precheck_config(raw, source)
    handled = config_fields()
    unknown = sorted(k for k in raw if k not in handled and k not in IGNORED_CONFIG_KEYS)
    if unknown:
        hint = " (PEFT <= 0.13 keys)" if _LEGACY_013_KEYS & set(unknown) else ""
        raise InteropError(
            f"{source}: unknown config key(s) {unknown}{hint}; known keys: {sorted(handled)}, ignored keys: "
            f"{sorted(IGNORED_CONFIG_KEYS)}"
        )
    try:
        config = OFTConfig.from_dict(raw, source=str(source))
    except (TypeError, ValueError) as e:
        raise InteropError(f"invalid OFT config: {e}") from e
    extras = {k: raw[k] for k in IGNORED_CONFIG_KEYS if k in raw and k != "peft_type"}
    return config, extras


def config_to_json(config: OFTConfig, extras: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The adapter_config.json dict for ``config`` (``OFTConfig.to_dict``: ``peft_version`` >= 0.18, or
    0.17.1 for a legacy-series adapter so PEFT warns), with ignored keys from ``extras`` written back."""
    out = config.to_dict()
    for key, value in (extras or {}).items():
        if key in IGNORED_CONFIG_KEYS and key != "peft_type":
            out[key] = value
    return out


@dataclasses.dataclass(frozen=True)
class ParsedKey:
    """One adapter tensor key, split: ``module`` path (PEFT names, no prefix) and what it holds."""

    module: str
    # "oft_R" | "oft_embedding_R" | "base_bias" | "bias" | "embedding_base" | "oft_r" | "oft_s" |
    # "module_to_save"
    kind: str
    attr: str = ""  # for "module_to_save": the parameter name (weight, bias, ...)


def parse_key(key: str, config: OFTConfig | None, source: Path) -> ParsedKey:
    """Split a file key ``base_model.model.<module>.<what>``; an unknown key is an InteropError naming it.

    Example:
        >>> parse_key("base_model.model.model.layers.0.mlp.up_proj.oft_R.weight", None, Path("adapter"))
        ParsedKey(module='model.layers.0.mlp.up_proj', kind='oft_R', attr='')
    """
    if not key.startswith(PEFT_PREFIX):
        raise InteropError(f"{source}: tensor key {key!r} does not start with {PEFT_PREFIX!r}")
    rest = key[len(PEFT_PREFIX) :]
    if m := _ROT_RE.match(rest):
        return ParsedKey(m["path"], m["kind"])
    if m := _OLD_RE.match(rest):
        return ParsedKey(m["path"], m["kind"])
    if m := _BASE_BIAS_RE.match(rest):
        return ParsedKey(m["path"], "base_bias")
    if m := _EMBED_BASE_RE.match(rest):
        return ParsedKey(m["path"], "embedding_base")
    module, _, attr = rest.rpartition(".")
    saved = getattr(config, "modules_to_save", None) or ()
    if module and any(module == s or module.endswith("." + s) for s in saved):
        return ParsedKey(module, "module_to_save", attr)
    bias_mode = getattr(config, "bias", "none")
    if attr == "bias" and module and bias_mode == "all":
        return ParsedKey(module, "bias")
    raise InteropError(
        f"{source}: unexpected tensor key {key!r}: expected '<module>.oft_R.weight', "
        f"'<module>.oft_embedding_R.weight' (with its '<module>.base_layer.weight') or (bias={bias_mode!r}) "
        "'<module>.base_layer.bias'"
    )


def check_adapter_name(name: str) -> str:
    """An adapter name is a subfolder name for PEFT: refuse empty names and path tricks."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise InteropError(f"invalid adapter name {name!r}: expected a plain folder name such as 'default'")
    return name


def block_size_of(n: int) -> int | None:
    """``b`` with ``b(b-1)/2 == n`` (b >= 2), or None.

    Example:
        >>> block_size_of(120), block_size_of(121)
        (16, None)
    """
    b = (1 + math.isqrt(1 + 8 * n)) // 2
    return b if b >= 2 and b * (b - 1) // 2 == n else None


def check_rotation(key: str, array: np.ndarray, config: OFTConfig, source: Path) -> tuple[int, int]:
    """Check an ``oft_R`` tensor against the config; return ``(stored_blocks, block_size)``.

    The tensor is the source of truth for the per-layer block size (PEFT adjusts it per layer), but it must be
    one the config could have produced: block_share stores one block; a configured block size or r must be the
    one PEFT's adjustment rule picks for ``d = stored_blocks * b``.
    """
    from oftjax.oft import adjust_oft_parameters

    if array.ndim != 2:
        raise InteropError(f"{source}: {key!r} has shape {list(array.shape)}; expected [r or 1, b(b-1)/2]")
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
        raise InteropError(f"{source}: {key!r} has dtype {array.dtype}; expected a float dtype")
    rows, n = (int(s) for s in array.shape)
    b = block_size_of(n)
    if b is None or rows < 1:
        raise InteropError(
            f"{source}: {key!r} has shape {[rows, n]}: {n} is not b(b-1)/2 for a block size b >= 2"
        )
    if config.block_share:
        if rows != 1:
            raise InteropError(
                f"{source}: {key!r} has {rows} blocks but the config has block_share=true (1 block)"
            )
        return rows, b
    d = rows * b
    if config.oft_block_size and config.r == 0:
        want_b = config.oft_block_size
        if d % want_b != 0 or want_b > d:
            want_b = adjust_oft_parameters(d, want_b)
        if want_b != b:
            raise InteropError(
                f"{source}: {key!r} has block size {b} (shape {[rows, n]}) but oft_block_size="
                f"{config.oft_block_size} gives block size {want_b} for in_features {d}"
            )
    elif config.r:
        want_r = config.r
        if d % want_r != 0 or want_r > d:
            want_r = adjust_oft_parameters(d, want_r)
        if want_r != rows:
            raise InteropError(
                f"{source}: {key!r} has {rows} blocks (shape {[rows, n]}) but r={config.r} gives {want_r} "
                "blocks "
                f"for in_features {d}"
            )
    return rows, b


def _old_keys(tensors: Mapping[str, np.ndarray]) -> list[ParsedKey]:
    matches = (_OLD_RE.match(k[len(PEFT_PREFIX) :]) for k in tensors if k.startswith(PEFT_PREFIX))
    return [ParsedKey(m["path"], m["kind"]) for m in matches if m]


def is_v015(tensors: Mapping[str, np.ndarray], source: Path = Path("<tensors>")) -> bool:
    """Whether the tensors use the PEFT 0.14-0.15 keys (``oft_r`` / ``oft_s``) only.

    Raises:
      InteropError: 0.14-0.15 keys among current-format ones: one file never holds both, and reading it as
        either would drop tensors.
    """
    old = [k for k in tensors if k.startswith(PEFT_PREFIX) and _OLD_RE.match(k[len(PEFT_PREFIX) :])]
    current = [k for k in tensors if k.startswith(PEFT_PREFIX) and _ROT_RE.match(k[len(PEFT_PREFIX) :])]
    if old and current:
        raise InteropError(
            f"{source}: {old[0]!r} is a PEFT 0.14-0.15 key (oft_r/oft_s) but the file also holds "
            f"current-format keys such as {current[0]!r}; one adapter file holds one format"
        )
    return bool(old)


def _check_unit_scale(key: str, array: np.ndarray, source: Path) -> None:
    """A 0.14-0.15 ``oft_s`` converts only when it is all ones (the current format has no output scale)."""
    deviation = np.abs(np.asarray(array, dtype=np.float64) - 1.0)
    if np.any(deviation != 0):
        raise InteropError(
            f"{source}: {key!r}: PEFT 0.14-0.15 output scale oft_s differs from 1 "
            f"(max |s-1| = {float(np.max(deviation)):.3g}); "
            "the current OFT format has no per-output scale, so this adapter cannot be converted "
            "exactly. Use PEFT <= 0.15.2 to run it, or merge it into the base weights there."
        )


def _vec_of_v015(key: str, array: np.ndarray, source: Path) -> np.ndarray:
    """The current ``[r, b(b-1)/2]`` vector of a 0.14-0.15 ``oft_r`` ``[r, b, b]``: ``Q = (D - D^T)/2`` above
    its diagonal, in ``triu_indices`` order."""
    if array.ndim != 3 or array.shape[1] != array.shape[2]:
        raise InteropError(f"{source}: {key!r} has shape {list(array.shape)}; expected [r, b, b] (PEFT 0.15)")
    D = np.asarray(array, dtype=np.float64)
    Q = 0.5 * (D - np.swapaxes(D, 1, 2))
    rows, cols = np.triu_indices(array.shape[1], 1)
    return Q[:, rows, cols].astype(array.dtype)


def convert_v015(
    config_raw: Mapping[str, Any], tensors: Mapping[str, np.ndarray], source: Path
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Convert a PEFT 0.14-0.15 adapter (``oft_r`` [r, b, b] + ``oft_s`` [out, 1]) to the current format.

    v0.15 computes ``W' = diag(s) W BD(R)^T`` with the exact Cayley ``R = (I-Q)(I+Q)^-1`` of
    ``Q = 0.5 (D - D^T)`` (``_cayley_batch``). With ``s == 1`` this is the current exact-Cayley OFT with
    ``vec = Q[triu]``, so the conversion is exact. ``s != 1`` scales output rows, which the current format has
    no parameter for, and v0.15's COFT projected the raw ``D`` with ``eps * ceil(out/r)^2``; both are refused.

    Raises:
      InteropError: oft_s is not all ones, coft was on, or the tensors are malformed; the message says why.
    """
    if config_raw.get("coft", False):
        raise InteropError(
            f"{source}: PEFT 0.14-0.15 adapter with coft=true cannot be converted exactly: v0.15 projected "
            "the raw oft_r with eps * ceil(out/r)^2 per layer, the current COFT projects the skew part "
            "with eps; retrain or export it with PEFT <= 0.15.2"
        )
    out: dict[str, np.ndarray] = {}
    seen_s: set[str] = set()
    for key, array in tensors.items():
        rest = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        m = _OLD_RE.match(rest)
        if m is None:
            out[key] = array
        elif m["kind"] == "oft_s":
            _check_unit_scale(key, array, source)
            seen_s.add(m["path"])
        else:
            out[f"{PEFT_PREFIX}{m['path']}.oft_R.weight"] = _vec_of_v015(key, array, source)
    rotated = {parse.module for parse in _old_keys(tensors) if parse.kind == "oft_r"}
    missing_s = sorted(rotated - seen_s)
    if missing_s:
        raise InteropError(f"{source}: PEFT 0.15 adapter lacks oft_s for module(s) {missing_s[:5]}")
    stray_s = sorted(seen_s - rotated)
    if stray_s:
        raise InteropError(f"{source}: PEFT 0.15 oft_s without its oft_r for module(s) {stray_s[:5]}")
    raw = dict(config_raw)
    # v0.15 used the exact Cayley transform; the current default is Cayley-Neumann.
    raw["use_cayley_neumann"] = False
    raw.setdefault("num_cayley_neumann_terms", 5)
    warnings.warn(
        f"{source}: converted a PEFT 0.14-0.15 adapter (oft_r/oft_s, oft_s == 1) to the current format with "
        "use_cayley_neumann=false; the conversion is exact. (PEFT 0.21 would silently drop these weights.)",
        stacklevel=3,
    )
    return raw, out


def check_tensors(tensors: Mapping[str, np.ndarray], config: OFTConfig, source: Path) -> dict[str, ParsedKey]:
    """Check every tensor key and shape against the config; return the parsed keys.

    Raises:
      InteropError: no rotation tensors, an unexpected key, or a shape the config cannot produce (named).
    """
    parsed: dict[str, ParsedKey] = {}
    for key, array in tensors.items():
        p = parse_key(key, config, source)
        if p.kind in ("oft_r", "oft_s"):
            raise InteropError(f"{source}: {key!r} is a PEFT 0.14-0.15 key mixed with current-format keys")
        if p.kind in ROTATION_KINDS:
            check_rotation(key, np.asarray(array), config, source)
        elif p.kind in ("base_bias", "bias") and np.ndim(array) != 1:
            raise InteropError(f"{source}: {key!r} has shape {list(np.shape(array))}; a bias is 1-D")
        elif p.kind == "embedding_base" and np.ndim(array) != 2:
            raise InteropError(
                f"{source}: {key!r} has shape {list(np.shape(array))}; an embedding table is 2-D"
            )
        parsed[key] = p
    embedded = {p.module for p in parsed.values() if p.kind == "oft_embedding_R"}
    for key, p in parsed.items():
        if p.kind == "embedding_base" and p.module not in embedded:
            raise InteropError(
                f"{source}: unexpected tensor key {key!r}: a base table is saved only next to "
                f"'{PEFT_PREFIX}{p.module}.oft_embedding_R.weight', which the file lacks"
            )
    if not any(p.kind in ROTATION_KINDS for p in parsed.values()):
        raise InteropError(
            f"{source}: no OFT tensors ('<module>.oft_R.weight' or '.oft_embedding_R.weight') among "
            f"{len(tensors)} key(s) {sorted(tensors)[:5]}"
        )
    return parsed
