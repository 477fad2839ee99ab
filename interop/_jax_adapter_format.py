"""The JAX adapter format: one directory, several adapters, keyed by NNX state paths (numpy only).

``oftjax_adapter.json``: ``{"format": "oftjax-adapter", "format_version": 1, "adapters": {name: {"config":
<every OFTConfig field, legacy_neumann included>, "keys": [...], "peft_extras": {"auto_mapping": ...}}}}``;
``oftjax_adapter.safetensors``: the tensors under the NNX state paths of ``oftjax.nn.OFTLinear``/``OFTEmbed``:
``<module>.oft_R.<adapter>`` (``oftjax.nn.OFTParam`` ``[R, b(b-1)/2]``),
``<module>.oft_embedding_R.<adapter>``, ``<module>.bias`` (base biases saved with ``bias != "none"``; at
most one adapter may carry them, as in PEFT) and ``<module>.embedding`` (the base table PEFT saves next to a
targeted input embedding, its ``<module>.base_layer.weight``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from oftjax.config import OFTConfig

from . import _peft_format as fmt
from ._io import (
    InteropError,
    atomic_save_safetensors,
    atomic_write_json,
    output_dir,
    read_json,
    read_safetensors,
)

CONFIG_FILE = "oftjax_adapter.json"
WEIGHTS_FILE = "oftjax_adapter.safetensors"
FORMAT = "oftjax-adapter"
FORMAT_VERSION = 1


def state_key(peft_key: str, adapter_name: str, config: OFTConfig) -> str:
    """The NNX state path of a PEFT key (``base_model.model.lin0.oft_R.weight`` -> ``lin0.oft_R.default``).

    Example:
        >>> from oftjax.config import OFTConfig
        >>> state_key("base_model.model.lin0.oft_R.weight", "default", OFTConfig(target_modules=["lin0"]))
        'lin0.oft_R.default'
    """
    parsed = fmt.parse_key(peft_key, config, Path("<keys>"))
    if parsed.kind in fmt.ROTATION_KINDS:
        return f"{parsed.module}.{parsed.kind}.{adapter_name}"
    if parsed.kind in ("base_bias", "bias"):
        return f"{parsed.module}.bias"
    if parsed.kind == "embedding_base":  # the base table, under nnx.Embed's state name
        return f"{parsed.module}.embedding"
    return f"{parsed.module}.{parsed.attr}"


def peft_key(key: str, adapter_name: str, rotated: set[str]) -> str:
    """The PEFT key of an NNX state path (inverse of ``state_key``; ``rotated``: modules with a rotation).

    Example:
        >>> peft_key("lin0.bias", "default", {"lin0"})
        'base_model.model.lin0.base_layer.bias'
    """
    for kind in fmt.ROTATION_KINDS:
        suffix = f".{kind}.{adapter_name}"
        if key.endswith(suffix):
            return f"{fmt.PEFT_PREFIX}{key[: -len(suffix)]}.{kind}.weight"
    module, _, attr = key.rpartition(".")
    if attr == "bias" and module in rotated:
        return f"{fmt.PEFT_PREFIX}{module}.base_layer.bias"
    if attr == "embedding" and module in rotated:
        return f"{fmt.PEFT_PREFIX}{module}.base_layer.weight"
    return f"{fmt.PEFT_PREFIX}{key}"


def peft_tensors(name: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    rotated = {
        k[: -len(f".{kind}.{name}")]
        for k in arrays
        for kind in fmt.ROTATION_KINDS
        if k.endswith(f".{kind}.{name}")
    }
    return {peft_key(k, name, rotated): v for k, v in arrays.items()}


def _config_dict(config: OFTConfig) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _config_from_dict(d: Mapping[str, Any], source: Path, name: str) -> OFTConfig:
    known = {f.name for f in dataclasses.fields(OFTConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise InteropError(f"{source}: adapter {name!r}: unknown config key(s) {unknown}")
    try:
        return OFTConfig(**d)
    except (TypeError, ValueError) as e:
        raise InteropError(f"{source}: adapter {name!r}: invalid OFT config ({e})") from e


def write_jax_adapter(
    path: str | os.PathLike,
    adapters: Mapping[str, tuple[OFTConfig, Mapping[str, np.ndarray]]],
    *,
    extras: Mapping[str, Mapping[str, Any]] | None = None,
    force: bool = False,
) -> Path:
    """Write a JAX adapter directory: ``{name: (config, {NNX state path: array})}``.

    Example:
        >>> write_jax_adapter("ckpt", {"default": (config, {"lin0.oft_R.default": vec})})  # doctest: +SKIP
    """
    target = Path(path)
    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "adapters": {}}
    for name, (config, arrays) in adapters.items():
        keys = sorted(arrays)
        # A base embedding table saved with several adapters is one tensor (listed by each adapter).
        clash = [
            k
            for k in keys
            if k in tensors and not (k.endswith(".embedding") and np.array_equal(tensors[k], arrays[k]))
        ]
        if clash:
            raise InteropError(f"{target / WEIGHTS_FILE}: adapter {name!r}: key(s) {clash[:5]} used twice")
        tensors.update({k: np.asarray(arrays[k]) for k in keys})
        entry = {"config": _config_dict(config), "keys": keys}
        if extras and extras.get(name):
            entry["peft_extras"] = dict(extras[name])
        meta["adapters"][name] = entry
    with output_dir(target, force=force) as tmp:
        atomic_save_safetensors(tmp / WEIGHTS_FILE, tensors, {"format": FORMAT})
        atomic_write_json(tmp / CONFIG_FILE, meta)
    return target


def read_jax_adapter(
    path: str | os.PathLike,
) -> tuple[dict[str, tuple[OFTConfig, dict[str, np.ndarray]]], dict[str, dict[str, Any]]]:
    """Read a JAX adapter directory -> ``({name: (config, {state path: array})}, {name: extras})``.

    Raises:
        InteropError: missing or corrupt files, a wrong format or version, keys listed but absent.

    Example:
        >>> adapters, _ = read_jax_adapter("ckpt")  # doctest: +SKIP
        >>> sorted(adapters)  # doctest: +SKIP
        ['default']
    """
    root = Path(path)
    meta = read_json(root / CONFIG_FILE)
    source = root / CONFIG_FILE
    if meta.get("format") != FORMAT:
        raise InteropError(f"{source}: 'format' is {meta.get('format')!r}; expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise InteropError(
            f"{source}: 'format_version' is {meta.get('format_version')!r}; this oftjax reads "
            f"{FORMAT_VERSION}"
        )
    entries = meta.get("adapters")
    if not isinstance(entries, dict) or not entries:
        raise InteropError(f"{source}: 'adapters' must be a non-empty object of adapter name -> entry")
    tensors = read_safetensors(root / WEIGHTS_FILE)
    listed = {k for e in entries.values() for k in e.get("keys", [])}
    extra_keys = sorted(set(tensors) - listed)
    if extra_keys:
        raise InteropError(f"{root / WEIGHTS_FILE}: tensor key(s) {extra_keys[:5]} not listed in {source}")
    adapters, extras = {}, {}
    for name, entry in entries.items():
        config = _config_from_dict(entry.get("config", {}), source, name)
        missing = [k for k in entry.get("keys", []) if k not in tensors]
        if missing:
            raise InteropError(
                f"{root / WEIGHTS_FILE}: adapter {name!r}: missing tensor key(s) {missing[:5]}"
            )
        adapters[name] = (config, {k: tensors[k] for k in entry.get("keys", [])})
        extras[name] = dict(entry.get("peft_extras", {}))
    return adapters, extras
