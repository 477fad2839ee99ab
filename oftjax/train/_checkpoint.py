"""Resumable training checkpoints: trainable variables, optimizer state and RNG state as safetensors.

Layout of one checkpoint (written to a temporary sibling directory, then renamed, so a directory that exists
is complete)::

    <run>/checkpoints/step_00000050/
        train_state.safetensors   # "<path>" -> array for every OFTParam, optimizer and RNG variable
        trainer.json              # {"format": 1, "step": 50, "config": {...TrainConfig...}, ...}
        adapter/                  # the PEFT adapter at this step (written by the caller's callback)

Frozen weights are not saved (they come from the model checkpoint). PRNG key arrays are stored as their raw
``key_data`` and re-wrapped with the implementation of the key they replace.

The file holds global arrays (leaves sharded over several processes are gathered first), so a checkpoint
resumes on any process count and mesh shape: the restored arrays are placed by the resuming run's own
shardings. In a multi-process run every process takes part in ``save_checkpoint`` (the gather) and process
0 alone writes; every process reads at restore (the run directory is on a shared file system).

Crash safety: a checkpoint is built in ``.step_XXXXXXXX.<random>.tmp`` (files flushed to disk, metadata
written through a temporary file) and renamed into place. A kill leaves at most a ``.tmp`` directory, which
the next ``fit`` removes (``remove_partial_checkpoints``); ``latest_checkpoint`` takes the newest directory
whose metadata parses and whose tensor file is whole, skipping any other.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from oftjax.train._distributed import barrier, host_arrays, is_primary

__all__ = [
    "latest_checkpoint",
    "remove_partial_checkpoints",
    "restore_train_state",
    "save_checkpoint",
    "saved_state_filter",
]

FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_PARTIAL_DIR = re.compile(r"^\.step_\d+\..*\.tmp$")


def saved_state_filter(wrt: Any) -> Any:
    """What a checkpoint holds: the trainable variables, optimizer state and RNG state."""
    return nnx.Any(wrt, nnx.OptState, nnx.RngState)


def _key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _raw(x: Any) -> Any:
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        return jax.random.key_data(x)
    return x


def flat_arrays(state: nnx.State) -> dict[str, np.ndarray]:
    """``{"0/model/layers/0/...": array}`` for every variable of ``state`` (host numpy), fetched at once.

    Global arrays of a multi-process run are gathered (``host_arrays``): call it on every process.
    """
    flat = nnx.to_flat_state(state)
    values = [_raw(var.get_value() if isinstance(var, nnx.Variable) else var) for _, var in flat]
    # one transfer for all; 0-d stays 0-d (np.ascontiguousarray would make it [1])
    return {_key(path): v for (path, _), v in zip(flat, host_arrays(values), strict=True)}


def _write_json_atomic(path: Path, obj: Any) -> None:
    """``path`` holds either its old content or all of ``obj``: a flushed temporary file, then a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    state: nnx.State,
    wrt: Any,
    *,
    config: Any = None,
    extra: dict | None = None,
    write_adapter: Callable[[Path], None] | None = None,
    keep: int = 3,
) -> Path:
    """Write checkpoint ``step`` under ``run_dir/checkpoints`` atomically; keep the newest ``keep``.

    In a multi-process run every process calls it (sharded leaves are gathered) and process 0 writes;
    every process returns once the checkpoint is complete. Returns the checkpoint directory.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    arrays = flat_arrays(nnx.filter_state(state, saved_state_filter(wrt)))
    if is_primary():
        meta = {"format": FORMAT, "step": step, **(extra or {})}
        if config is not None:
            meta["config"] = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
        _write_checkpoint(root, final, arrays, meta, write_adapter)
        steps = sorted(_checkpoint_steps(root))
        for old in steps[:-keep] if keep > 0 else []:
            shutil.rmtree(root / f"step_{old:08d}", ignore_errors=True)
    barrier(f"checkpoint {final.name}")
    return final


def _write_checkpoint(
    root: Path, final: Path, arrays: dict, meta: dict, write_adapter: Callable[[Path], None] | None
) -> None:
    from safetensors.numpy import save_file

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        tensors = tmp / "train_state.safetensors"
        save_file({k: np.array(v, order="C") for k, v in arrays.items()}, str(tensors))
        _fsync(tensors)
        _write_json_atomic(tmp / "trainer.json", meta)
        if write_adapter is not None:
            write_adapter(tmp / "adapter")
        _fsync(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_partial_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the ``.step_*.tmp`` directories a killed run left under ``run_dir/checkpoints``; return them.

    Run it before a new writer starts (``fit`` does, on process 0): a ``.tmp`` directory is never a
    checkpoint, only the remains of one that was being written.
    """
    root = Path(run_dir) / "checkpoints"
    removed = [p for p in root.iterdir() if _PARTIAL_DIR.match(p.name)] if root.is_dir() else []
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def _safetensors_whole(path: Path) -> bool:
    """The file's header parses and its size is exactly header + the data its tensors claim."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return False
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False
    return size == 8 + n + max(ends, default=0)


def _complete(ckpt: Path, step: int) -> bool:
    """``ckpt`` is a whole checkpoint of ``step``: its metadata parses and names it, its tensors are whole."""
    try:
        meta = json.loads((ckpt / "trainer.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("step") != step:
        return False
    return _safetensors_whole(ckpt / "train_state.safetensors")


def _checkpoint_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "trainer.json").is_file() and (p / "train_state.safetensors").is_file():
            out.append(int(m.group(1)))
    return out


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory of a run, or None.

    A directory whose ``trainer.json`` does not parse or name its step, or whose tensor file is cut short
    (a copy interrupted, a disk that filled), is skipped with a warning for the next older one.
    """
    root = Path(run_dir) / "checkpoints"
    for step in sorted(_checkpoint_steps(root), reverse=True):
        ckpt = root / f"step_{step:08d}"
        if _complete(ckpt, step):
            return ckpt
        warnings.warn(f"{ckpt}: incomplete checkpoint (metadata or tensors cut short); skipped", stacklevel=2)
    return None


def restore_train_state(ckpt_dir: str | os.PathLike, state: nnx.State, wrt: Any) -> tuple[nnx.State, dict]:
    """Return ``state`` with its saved variables replaced from ``ckpt_dir``, and the checkpoint's metadata.

    Raises:
      ValueError: a variable is missing from the file or has another shape/dtype (a different model,
        adapter configuration or optimizer than the run being resumed), naming it.
    """
    from safetensors.numpy import load_file

    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / "train_state.safetensors"
    try:
        saved = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: cannot read checkpoint ({e})") from e
    meta = json.loads((ckpt_dir / "trainer.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{ckpt_dir / 'trainer.json'}: checkpoint format {meta.get('format')} != {FORMAT}")
    sub = nnx.filter_state(state, saved_state_filter(wrt))
    flat = []
    for p, var in nnx.to_flat_state(sub):
        key = _key(p)
        if key not in saved:
            raise ValueError(f"{path}: missing variable {key!r}; is this checkpoint from the same setup?")
        cur = var.get_value()
        new = saved[key]
        if jax.dtypes.issubdtype(cur.dtype, jax.dtypes.prng_key):
            expect = jax.random.key_data(cur)
            new = (
                jax.random.wrap_key_data(new, impl=jax.random.key_impl(cur))
                if new.shape == expect.shape
                else None
            )
        elif new.shape != cur.shape or new.dtype != cur.dtype:
            new = None
        if new is None:
            raise ValueError(
                f"{path}: variable {key!r} has shape/dtype {saved[key].shape}/{saved[key].dtype}, "
                f"expected {cur.shape}/{cur.dtype}"
            )
        flat.append((p, var.replace(new)))
    restored = nnx.from_flat_state(flat)
    return nnx.merge_state(state, restored), meta
