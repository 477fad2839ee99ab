"""PEFT OFT adapter directories <-> oftjax (numpy + safetensors + json; torch is never imported here).

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.oft_R.weight`` of shape ``[r or 1, b(b-1)/2]`` (``oft_embedding_R.weight``
for embeddings; ``<module>.base_layer.bias`` with ``bias="oft_only"``). A non-default adapter is saved by PEFT
in a subfolder named after it. File format versions (``_peft_format``): PEFT >= 0.18 is read as is;
0.16-0.17 Cayley-Neumann adapters are evaluated with the series they were trained with
(``OFTConfig.legacy_neumann``), with a warning; 0.14-0.15 adapters (``oft_r`` + ``oft_s``) are converted
exactly when ``oft_s == 1`` and refused otherwise; <= 0.13 adapters are refused. Unlike PEFT 0.21, which
silently drops 0.15 weights, nothing is ever dropped without an error.

Where PEFT and we differ: PEFT ignores unknown config keys with a warning, we refuse them (naming them).

The JAX-native adapter checkpoint (``adapter_to_native`` / ``native_to_adapter``) is a directory with
``oftjax_adapter.json`` (format version, one OFTConfig dict per adapter name) and
``oftjax_adapter.safetensors`` keyed by NNX state paths: ``<module>.oft_R.<adapter>``,
``<module>.oft_embedding_R.<adapter>`` and ``<module>.bias`` (base biases saved with ``bias != "none"``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from oftjax import __version__ as _OFTJAX_VERSION
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

__all__ = [
    "InteropError",
    "adapter_to_native",
    "attach_adapter",
    "collect_adapter",
    "list_adapters",
    "load_adapter",
    "load_native",
    "native_to_adapter",
    "read_adapter",
    "read_native",
    "save_adapter",
    "save_native",
    "write_adapter",
    "write_native",
]

ADAPTER_CONFIG = fmt.ADAPTER_CONFIG
ADAPTER_WEIGHTS = fmt.ADAPTER_WEIGHTS
NATIVE_CONFIG = "oftjax_adapter.json"
NATIVE_WEIGHTS = "oftjax_adapter.safetensors"
NATIVE_FORMAT = "oftjax-adapter"
NATIVE_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------
# PEFT directories


def _adapter_dir(path: str | os.PathLike, adapter_name: str | None) -> Path:
    root = Path(path)
    if adapter_name not in (None, "default"):
        sub = root / adapter_name
        if (sub / ADAPTER_CONFIG).is_file():
            return sub
    if (root / ADAPTER_CONFIG).is_file():
        return root
    if not root.is_dir():
        raise InteropError(f"{root}: adapter directory not found")
    subs = list_adapters(root)
    where = f" (adapter_name={adapter_name!r})" if adapter_name else ""
    hint = f"; adapters found in subfolders: {subs}" if subs else ""
    raise InteropError(f"{root / ADAPTER_CONFIG}: file not found{where}{hint}")


def list_adapters(path: str | os.PathLike) -> list[str]:
    """Adapter names in a PEFT save directory: "default" for the root, then subfolders (as PEFT saves them).

    Example:
        >>> list_adapters("my_adapter")  # doctest: +SKIP
        ['default', 'other']
    """
    root = Path(path)
    names = ["default"] if (root / ADAPTER_CONFIG).is_file() else []
    if root.is_dir():
        names += sorted(p.name for p in root.iterdir() if p.is_dir() and (p / ADAPTER_CONFIG).is_file())
    return names


def _read(path: str | os.PathLike, adapter_name: str | None) -> tuple[OFTConfig, dict[str, np.ndarray], dict]:
    adir = _adapter_dir(path, adapter_name)
    config_path, weights_path = adir / ADAPTER_CONFIG, adir / ADAPTER_WEIGHTS
    raw = read_json(config_path)
    if not weights_path.is_file() and (adir / "adapter_model.bin").is_file():
        raise InteropError(
            f"{adir / 'adapter_model.bin'}: torch pickle adapters are not read (no torch on this path); "
            "re-save with save_pretrained(..., safe_serialization=True)"
        )
    fmt.precheck_config(raw, config_path)
    tensors = read_safetensors(weights_path)
    if fmt.is_v015(tensors):
        raw, tensors = fmt.convert_v015(raw, tensors, weights_path)
    config, extras = fmt.config_from_json(raw, config_path)
    fmt.check_tensors(tensors, config, weights_path)
    return config, tensors, extras


def read_adapter(
    path: str | os.PathLike, adapter_name: str | None = None
) -> tuple[OFTConfig, dict[str, np.ndarray]]:
    """Read a PEFT OFT adapter directory into an OFTConfig and its tensors (PEFT key names, numpy arrays).

    Old formats are handled as the module docstring says (0.15 tensors come back as ``oft_R.weight``).

    Args:
        path: the directory ``save_pretrained`` wrote.
        adapter_name: a non-default adapter saved in the subfolder ``path/<adapter_name>``; None or "default"
            reads ``path`` itself.

    Returns:
        ``(config, tensors)``, tensors keyed like ``base_model.model.lin0.oft_R.weight``, dtypes as stored.

    Raises:
        InteropError: missing/corrupt files, unknown config keys, unexpected tensor keys, shapes that disagree
            with the config, or an old format that cannot be converted; the message names the file and key.

    Example:
        >>> config, tensors = read_adapter("my_adapter")  # doctest: +SKIP
        >>> tensors["base_model.model.lin0.oft_R.weight"].shape  # doctest: +SKIP
        (2, 10)
    """
    config, tensors, _ = _read(path, adapter_name)
    return config, tensors


def _check_existing(target: Path, force: bool) -> None:
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if (target / name).exists() and not force:
            raise FileExistsError(f"{target / name}: exists; pass force=True (--force) to overwrite")


def write_adapter(
    path: str | os.PathLike,
    config: OFTConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    adapter_name: str = "default",
    force: bool = False,
    extras: Mapping[str, Any] | None = None,
) -> Path:
    """Write a PEFT OFT adapter directory that ``PeftModel.from_pretrained`` loads.

    Everything is validated before anything is written; files are written atomically. A non-default
    ``adapter_name`` goes to the subfolder ``path/<adapter_name>`` as PEFT's ``save_pretrained`` does.
    ``peft_version`` is written as >= 0.18 (so PEFT uses the current Cayley-Neumann series) unless the config
    is a legacy 0.16-0.17 Neumann adapter, which stays marked as such. Safetensors metadata is
    ``{"format": "pt"}`` plus ``oftjax_version``.

    Args:
        path: the output directory.
        config: the adapter's OFTConfig.
        tensors: PEFT-named tensors (as ``read_adapter`` returns them).
        adapter_name: "default" or the subfolder name.
        force: overwrite existing adapter files.
        extras: ignored config keys to write back verbatim (``auto_mapping``).

    Returns:
        The directory holding the two files.

    Raises:
        FileExistsError: the adapter files exist and ``force`` is False (nothing is written).
        InteropError: tensors that disagree with the config.

    Example:
        >>> config, tensors = read_adapter("in_dir")  # doctest: +SKIP
        >>> write_adapter("out_dir", config, tensors)  # doctest: +SKIP
    """
    root = Path(path)
    target = root if fmt.check_adapter_name(adapter_name) == "default" else root / adapter_name
    fmt.check_tensors(tensors, config, target / ADAPTER_WEIGHTS)
    _check_existing(target, force)
    raw = fmt.config_to_json(config, extras)
    metadata = {"format": "pt", "oftjax_version": _OFTJAX_VERSION}
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    if target.exists():
        atomic_save_safetensors(target / ADAPTER_WEIGHTS, arrays, metadata, force=True)
        atomic_write_json(target / ADAPTER_CONFIG, raw, force=True)
    else:
        with output_dir(target) as tmp:
            atomic_save_safetensors(tmp / ADAPTER_WEIGHTS, arrays, metadata)
            atomic_write_json(tmp / ADAPTER_CONFIG, raw)
    return target


# ----------------------------------------------------------------------------------------------------
# JAX-native adapter checkpoints


def native_key(peft_key: str, adapter_name: str, config: OFTConfig) -> str:
    """The NNX state path of a PEFT key (``base_model.model.lin0.oft_R.weight`` -> ``lin0.oft_R.default``)."""
    parsed = fmt.parse_key(peft_key, config, Path("<keys>"))
    if parsed.kind in fmt.ROTATION_KINDS:
        return f"{parsed.module}.{parsed.kind}.{adapter_name}"
    if parsed.kind in ("base_bias", "bias"):
        return f"{parsed.module}.bias"
    return f"{parsed.module}.{parsed.attr}"


def peft_key(key: str, adapter_name: str, rotated: set[str]) -> str:
    """The PEFT key of a native key (inverse of ``native_key``; ``rotated``: modules with a rotation)."""
    for kind in fmt.ROTATION_KINDS:
        suffix = f".{kind}.{adapter_name}"
        if key.endswith(suffix):
            return f"{fmt.PEFT_PREFIX}{key[: -len(suffix)]}.{kind}.weight"
    module, _, attr = key.rpartition(".")
    if attr == "bias" and module in rotated:
        return f"{fmt.PEFT_PREFIX}{module}.base_layer.bias"
    return f"{fmt.PEFT_PREFIX}{key}"


def _native_to_peft_tensors(name: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
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


def write_native(
    path: str | os.PathLike,
    adapters: Mapping[str, tuple[OFTConfig, Mapping[str, np.ndarray]]],
    *,
    extras: Mapping[str, Mapping[str, Any]] | None = None,
    force: bool = False,
) -> Path:
    """Write a JAX-native adapter checkpoint: ``{name: (config, {NNX state path: array})}``.

    Example:
        >>> write_native("ckpt", {"default": (config, {"lin0.oft_R.default": vec})})  # doctest: +SKIP
    """
    target = Path(path)
    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"format": NATIVE_FORMAT, "format_version": NATIVE_FORMAT_VERSION, "adapters": {}}
    for name, (config, arrays) in adapters.items():
        keys = sorted(arrays)
        clash = [k for k in keys if k in tensors]
        if clash:
            raise InteropError(f"{target / NATIVE_WEIGHTS}: adapter {name!r}: key(s) {clash[:5]} used twice")
        tensors.update({k: np.asarray(arrays[k]) for k in keys})
        entry = {"config": _config_dict(config), "keys": keys}
        if extras and extras.get(name):
            entry["peft_extras"] = dict(extras[name])
        meta["adapters"][name] = entry
    with output_dir(target, force=force) as tmp:
        atomic_save_safetensors(tmp / NATIVE_WEIGHTS, tensors, {"format": NATIVE_FORMAT})
        atomic_write_json(tmp / NATIVE_CONFIG, meta)
    return target


def read_native(
    path: str | os.PathLike,
) -> tuple[dict[str, tuple[OFTConfig, dict[str, np.ndarray]]], dict[str, dict[str, Any]]]:
    """Read a JAX-native adapter checkpoint -> ``({name: (config, {state path: array})}, {name: extras})``.

    Raises:
        InteropError: missing or corrupt files, a wrong format or version, keys listed but absent.

    Example:
        >>> adapters, _ = read_native("ckpt")  # doctest: +SKIP
        >>> sorted(adapters)  # doctest: +SKIP
        ['default']
    """
    root = Path(path)
    meta = read_json(root / NATIVE_CONFIG)
    source = root / NATIVE_CONFIG
    if meta.get("format") != NATIVE_FORMAT:
        raise InteropError(f"{source}: 'format' is {meta.get('format')!r}; expected {NATIVE_FORMAT!r}")
    if meta.get("format_version") != NATIVE_FORMAT_VERSION:
        raise InteropError(
            f"{source}: 'format_version' is {meta.get('format_version')!r}; this oftjax reads "
            f"{NATIVE_FORMAT_VERSION}"
        )
    entries = meta.get("adapters")
    if not isinstance(entries, dict) or not entries:
        raise InteropError(f"{source}: 'adapters' must be a non-empty object of adapter name -> entry")
    tensors = read_safetensors(root / NATIVE_WEIGHTS)
    listed = {k for e in entries.values() for k in e.get("keys", [])}
    extra_keys = sorted(set(tensors) - listed)
    if extra_keys:
        raise InteropError(f"{root / NATIVE_WEIGHTS}: tensor key(s) {extra_keys[:5]} not listed in {source}")
    adapters, extras = {}, {}
    for name, entry in entries.items():
        config = _config_from_dict(entry.get("config", {}), source, name)
        missing = [k for k in entry.get("keys", []) if k not in tensors]
        if missing:
            raise InteropError(
                f"{root / NATIVE_WEIGHTS}: adapter {name!r}: missing tensor key(s) {missing[:5]}"
            )
        adapters[name] = (config, {k: tensors[k] for k in entry.get("keys", [])})
        extras[name] = dict(entry.get("peft_extras", {}))
    return adapters, extras


def adapter_to_native(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, force: bool = False) -> Path:
    """Convert a PEFT adapter directory (root adapter and any subfolder adapters) to a JAX-native checkpoint.

    Example:
        >>> adapter_to_native("peft_adapter", "jax_adapter")  # doctest: +SKIP
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst}: exists; pass force=True (--force) to overwrite")
    names = list_adapters(src)
    if not names:
        _adapter_dir(src, None)  # raises the precise "not found" error
    adapters, extras = {}, {}
    for name in names:
        config, tensors, extra = _read(src, name)
        adapters[name] = (config, {native_key(k, name, config): v for k, v in tensors.items()})
        extras[name] = extra
    return write_native(dst, adapters, extras=extras, force=force)


def native_to_adapter(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, force: bool = False) -> Path:
    """Convert a JAX-native adapter checkpoint back to a PEFT adapter directory (non-default in subfolders).

    Example:
        >>> native_to_adapter("jax_adapter", "peft_adapter")  # doctest: +SKIP
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst}: exists; pass force=True (--force) to overwrite")
    adapters, extras = read_native(src)
    converted = {}
    for name, (config, arrays) in adapters.items():
        tensors = _native_to_peft_tensors(name, arrays)
        fmt.check_tensors(tensors, config, src / NATIVE_WEIGHTS)
        converted[name] = (config, tensors)
    with output_dir(dst, force=force) as tmp:
        for name, (config, tensors) in converted.items():
            write_adapter(tmp, config, tensors, adapter_name=name, force=True, extras=extras.get(name))
    return dst


# ----------------------------------------------------------------------------------------------------
# NNX models


def attach_adapter(
    model: Any,
    config: OFTConfig,
    tensors: Mapping[str, np.ndarray],
    adapter_name: str = "default",
    **kwargs: Any,
) -> list[str]:
    """Attach an in-memory adapter (``read_adapter``'s output) to an NNX model; see ``load_adapter``."""
    from ._peft_attach import attach_adapter as _attach

    return _attach(model, config, tensors, adapter_name, **kwargs)


def collect_adapter(
    model: Any, adapter_name: str = "default", config: OFTConfig | None = None
) -> tuple[OFTConfig, dict[str, np.ndarray]]:
    """One adapter of an NNX model as ``(config, PEFT-named tensors)``; see ``save_adapter``."""
    from ._peft_attach import collect_adapter as _collect

    return _collect(model, adapter_name, config)


def load_adapter(
    model: Any, path: str | os.PathLike, adapter_name: str = "default", **kwargs: Any
) -> list[str]:
    """Attach a PEFT OFT adapter to an NNX model whose module paths match PEFT's module names.

    See ``interop._peft_attach.load_adapter``.
    """
    from ._peft_attach import load_adapter as _load

    return _load(model, path, adapter_name=adapter_name, **kwargs)


def save_adapter(
    model: Any, path: str | os.PathLike, adapter_name: str = "default", force: bool = False, **kwargs: Any
) -> Path:
    """Save one adapter of an NNX model as a PEFT adapter directory; see ``interop._peft_attach``."""
    from ._peft_attach import save_adapter as _save

    return _save(model, path, adapter_name=adapter_name, force=force, **kwargs)


def save_native(
    model: Any,
    path: str | os.PathLike,
    adapter_names: list[str] | None = None,
    *,
    configs: Mapping[str, OFTConfig] | None = None,
    force: bool = False,
) -> Path:
    """Save adapters of an NNX model (default: all of them) as one JAX-native adapter checkpoint.

    Example:
        >>> save_native(model, "jax_adapter")  # doctest: +SKIP
    """
    from oftjax.nn import OFTLinear

    from ._peft_attach import module_table

    if adapter_names is None:
        found = [n for _, m in module_table(model).values() if isinstance(m, OFTLinear) for n in m.adapters]
        adapter_names = list(dict.fromkeys(found))
    adapters = {}
    for name in adapter_names:
        config, tensors = collect_adapter(model, name, (configs or {}).get(name))
        adapters[name] = (config, {native_key(k, name, config): v for k, v in tensors.items()})
    return write_native(path, adapters, force=force)


def load_native(
    model: Any, path: str | os.PathLike, adapter_names: list[str] | None = None, **kwargs: Any
) -> list[str]:
    """Attach adapters from a JAX-native adapter checkpoint (default: all) to an NNX model; returns the paths.

    Example:
        >>> load_native(model, "jax_adapter")  # doctest: +SKIP
        ['lin0', 'lin1']
    """
    adapters, _ = read_native(path)
    names = list(adapters) if adapter_names is None else adapter_names
    missing = [n for n in names if n not in adapters]
    if missing:
        raise InteropError(
            f"{Path(path) / NATIVE_CONFIG}: no adapter(s) {missing}; it holds {sorted(adapters)}"
        )
    paths: set[str] = set()
    for name in names:
        config, arrays = adapters[name]
        tensors = _native_to_peft_tensors(name, arrays)
        paths.update(
            attach_adapter(model, config, tensors, name, source=Path(path) / NATIVE_WEIGHTS, **kwargs)
        )
    return sorted(paths)
