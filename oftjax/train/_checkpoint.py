"""Resumable training checkpoints: trainable variables, optimizer state and RNG state as safetensors.

Layout of one checkpoint (written to a temporary sibling directory, then renamed, so a directory that exists
is complete)::

    <run>/checkpoints/step_00000050/
        train_state.safetensors   # "<path>" -> array for every OFTParam, optimizer and RNG variable
        trainer.json              # {"format": 1, "step": 50, "config": {...TrainConfig...}, ...}
        adapter/                  # the PEFT adapter at this step (written by the caller's callback)

Frozen weights are not saved (they come from the model checkpoint). PRNG key arrays are stored as their raw
``key_data`` and re-wrapped with the implementation of the key they replace.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

__all__ = ["latest_checkpoint", "restore_train_state", "save_checkpoint", "saved_state_filter"]

FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


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
    """``{"0/model/layers/0/...": array}`` for every variable of ``state`` (host numpy), fetched at once."""
    flat = nnx.to_flat_state(state)
    values = [_raw(var.get_value() if isinstance(var, nnx.Variable) else var) for _, var in flat]
    # one transfer for all; 0-d stays 0-d (np.ascontiguousarray would make it [1])
    return {_key(path): np.asarray(v) for (path, _), v in zip(flat, jax.device_get(values), strict=True)}


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

    Returns the checkpoint directory.
    """
    from safetensors.numpy import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        arrays = flat_arrays(nnx.filter_state(state, saved_state_filter(wrt)))
        save_file(
            {k: np.array(v, order="C") for k, v in arrays.items()}, str(tmp / "train_state.safetensors")
        )
        meta = {"format": FORMAT, "step": step, **(extra or {})}
        if config is not None:
            meta["config"] = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if write_adapter is not None:
            write_adapter(tmp / "adapter")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    steps = sorted(_checkpoint_steps(root))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(root / f"step_{old:08d}", ignore_errors=True)
    return final


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
    """The newest complete checkpoint directory of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    steps = _checkpoint_steps(root)
    return root / f"step_{max(steps):08d}" if steps else None


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
