"""PEFT OFT adapter directories on disk: find, read and write them (numpy + safetensors + json, no torch).

A directory written by PEFT's ``save_pretrained`` holds ``adapter_config.json`` and
``adapter_model.safetensors``; a non-default adapter is saved in a subfolder named after it. What the keys and
tensors mean, and how old PEFT versions are read, is ``interop._peft_format``'s business; this module adds the
files around it: locating an adapter, refusing torch pickles, validating before writing, atomic writes.
Every file is untrusted (``interop._paths``): adapter names are plain folder names, checked before anything
is read, and links are followed only with ``allow_symlinks`` and only inside the save directory.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from oftjax import __version__ as _OFTJAX_VERSION
from oftjax.config import OFTConfig

from . import _peft_format as fmt
from ._io import InteropError, atomic_write_json, output_dir, read_json
from ._paths import Root
from ._safetensors import atomic_save_safetensors, read_safetensors

ADAPTER_CONFIG = fmt.ADAPTER_CONFIG
ADAPTER_WEIGHTS = fmt.ADAPTER_WEIGHTS
_TORCH_PICKLE = "adapter_model.bin"


def _adapter_files(
    path: str | os.PathLike, adapter_name: str | None, allow_symlinks: bool = False
) -> tuple[Root, str]:
    """The save directory as a ``Root`` and the prefix of adapter ``adapter_name``'s files in it (``""`` or
    ``"<name>/"``); the name is checked before anything is read.

    Raises:
        InteropError: an invalid name, or no adapter there (the message lists the subfolders' adapters).
    """
    root = Root(path, allow_symlinks=allow_symlinks)
    if adapter_name not in (None, "default"):
        fmt.check_adapter_name(adapter_name)
        if root.dir(adapter_name) is not None:
            _check_has_config(root, f"{adapter_name}/")
            return root, f"{adapter_name}/"
    if root.path.is_dir() and root.exists(ADAPTER_CONFIG):
        return root, ""
    if root.path.is_dir():
        _check_has_config(root, "")
    if not root.path.is_dir():
        raise InteropError(f"{root.path}: adapter directory not found")
    subs = list_adapters(root.path, allow_symlinks=allow_symlinks)
    where = f" (adapter_name={adapter_name!r})" if adapter_name else ""
    hint = f"; adapters found in subfolders: {subs}" if subs else ""
    raise InteropError(f"{root.path / ADAPTER_CONFIG}: file not found{where}{hint}")


def _check_has_config(root: Root, prefix: str) -> None:
    """An adapter's weights without its config are an incomplete adapter: an error, never skipped (another
    adapter of the directory would be read in its place, or the adapter silently left out)."""
    if not root.exists(prefix + ADAPTER_CONFIG):
        for weights in (ADAPTER_WEIGHTS, _TORCH_PICKLE):
            if root.exists(prefix + weights):
                raise InteropError(
                    f"{root.path / prefix / weights}: an adapter's weights without its adapter_config.json"
                )


def adapter_dir(path: str | os.PathLike, adapter_name: str | None, *, allow_symlinks: bool = False) -> Path:
    """The directory holding adapter ``adapter_name`` of the save directory ``path`` (a subfolder or itself).

    Raises:
        InteropError: an invalid name, or no adapter there (the message lists the subfolders' adapters).
    """
    root, prefix = _adapter_files(path, adapter_name, allow_symlinks)
    return root.path / prefix if prefix else root.path


def list_adapters(path: str | os.PathLike, *, allow_symlinks: bool = False) -> list[str]:
    """Adapter names in a PEFT save directory: "default" for the root, then subfolders (as PEFT saves them).

    A subfolder that is a symbolic link is an adapter only with ``allow_symlinks`` and when it stays inside
    ``path``; otherwise it is an error naming it (never silently skipped, never read).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     for sub in ("", "other"):
        ...         (Path(tmp) / sub).mkdir(exist_ok=True)
        ...         _ = (Path(tmp) / sub / ADAPTER_CONFIG).write_text("{}")
        ...     list_adapters(tmp)
        ['default', 'other']
    """
    root = Root(path, allow_symlinks=allow_symlinks)
    if not root.path.is_dir():
        return []
    _check_has_config(root, "")
    names = ["default"] if root.exists(ADAPTER_CONFIG) else []
    for name, mode, is_link in root.entries():
        if stat.S_ISDIR(mode):
            _check_has_config(root, f"{name}/")
            if root.exists(f"{name}/{ADAPTER_CONFIG}"):
                names.append(name)
        elif is_link and os.path.isdir(root.path / name):
            root.dir(name, where=f"{root.path}: adapter subfolder {name!r}")  # raises: a link not followed
    return names


def read_adapter_with_extras(
    path: str | os.PathLike, adapter_name: str | None = None, *, allow_symlinks: bool = False
) -> tuple[OFTConfig, dict[str, np.ndarray], dict[str, Any]]:
    """``read_adapter`` plus the knowingly ignored config keys (``auto_mapping``), to write back on a round
    trip."""
    root, prefix = _adapter_files(path, adapter_name, allow_symlinks)
    config_path = root.file(prefix + ADAPTER_CONFIG)
    raw = read_json(config_path)
    if not root.exists(prefix + ADAPTER_WEIGHTS) and root.exists(prefix + _TORCH_PICKLE):
        raise InteropError(
            f"{root.path / prefix / _TORCH_PICKLE}: torch pickle adapters are not read (no torch on this "
            "path); re-save with save_pretrained(..., safe_serialization=True)"
        )
    weights_path = root.file(prefix + ADAPTER_WEIGHTS)
    fmt.precheck_config(raw, config_path)
    tensors = read_safetensors(weights_path)
    if fmt.is_v015(tensors, weights_path):
        raw, tensors = fmt.convert_v015(raw, tensors, weights_path)
    config, extras = fmt.config_from_json(raw, config_path)
    fmt.check_tensors(tensors, config, weights_path)
    return config, tensors, extras


def read_adapter(
    path: str | os.PathLike, adapter_name: str | None = None, *, allow_symlinks: bool = False
) -> tuple[OFTConfig, dict[str, np.ndarray]]:
    """Read a PEFT OFT adapter directory into an OFTConfig and its tensors (PEFT key names, numpy arrays).

    Old formats are handled as ``interop.peft`` says (0.15 tensors come back as ``oft_R.weight``).

    Args:
        path: the directory ``save_pretrained`` wrote.
        adapter_name: a non-default adapter saved in the subfolder ``path/<adapter_name>``; None or "default"
            reads ``path`` itself.
        allow_symlinks: follow symbolic links that stay inside ``path`` (by default a link is an error).

    Returns:
        ``(config, tensors)``, tensors keyed like ``base_model.model.lin0.oft_R.weight``, dtypes as stored.

    Raises:
        InteropError: missing/corrupt files, unknown config keys, unexpected tensor keys, shapes that disagree
            with the config, or an old format that cannot be converted; the message names the file and key.

    Example:
        >>> import tempfile
        >>> config = OFTConfig(r=2, oft_block_size=0, target_modules=["lin0"])
        >>> vec = np.zeros((2, 10), np.float32)  # 2 blocks of 5x5 (10 = 5*4/2 entries each): in_features 10
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = write_adapter(tmp, config, {"base_model.model.lin0.oft_R.weight": vec})
        ...     config, tensors = read_adapter(tmp)
        >>> config.r, tensors["base_model.model.lin0.oft_R.weight"].shape
        (2, (2, 10))
    """
    config, tensors, _ = read_adapter_with_extras(path, adapter_name, allow_symlinks=allow_symlinks)
    return config, tensors


def _check_existing(target: Path, force: bool) -> None:
    """Without ``force``, ``target`` may hold only other adapters of the same save (PEFT's subfolders)."""
    if force or not os.path.lexists(target):
        return
    if not target.is_dir():
        raise FileExistsError(f"{target}: exists and is not a directory; pass force=True (--force)")
    for entry in sorted(target.iterdir()):
        if entry.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            raise FileExistsError(f"{entry}: exists; pass force=True (--force) to overwrite")
        if entry.is_dir() and not entry.is_symlink() and (entry / ADAPTER_CONFIG).is_file():
            continue  # another adapter of the same save directory
        raise FileExistsError(
            f"{target}: exists and is not empty ({entry.name}); pass force=True (--force) to write into it"
        )


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
        FileExistsError: the adapter files, or other files than other adapters' subfolders, exist and
            ``force`` is False (nothing is written); an empty directory is fine.
        InteropError: tensors that disagree with the config.

    Example:
        >>> import tempfile
        >>> tensors = {"base_model.model.lin0.oft_R.weight": np.zeros((1, 6), np.float32)}  # one 4x4 block
        >>> config = OFTConfig(r=0, oft_block_size=4, target_modules=["lin0"])
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     target = write_adapter(tmp, config, tensors, adapter_name="second")
        ...     target.name, sorted(p.name for p in target.iterdir())
        ('second', ['adapter_config.json', 'adapter_model.safetensors'])
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
