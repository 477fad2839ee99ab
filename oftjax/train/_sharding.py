"""Multi-device layout with ``jax.sharding``: a ("data", "fsdp") mesh and NNX partitioning metadata.

Rules (``state_shardings``):
  * A variable annotated with NNX partitioning metadata (``nnx.with_partitioning(init, ("fsdp", None))``),
    stored as ``out_sharding``/``sharding``/``sharding_names``, is sharded by those names; a name that is not
    a mesh axis (e.g. "tensor"), or whose axis size does not divide that dimension, is replicated there.
  * Leaves of a frozen quantized weight (``Int8Weight``/``FourBitWeight`` inside a ``QuantWeight``) are
    sharded along their first axis over "fsdp" when it divides: the packed bytes ``[n/2, 1]``,
    ``CB [out, in]``, absmax ``[nb]``; leaves it does not divide (SCB, nested absmax, scalars) are replicated.
  * Everything else (OFT rotations, optimizer moments, RNG state, norms) is replicated.
  * Batches are split over ("data", "fsdp") together: FSDP is data parallelism with sharded parameters.

In a multi-process run (``oftjax.train.initialize``) the mesh spans every process's devices and each
process places only the batch rows its own devices hold (``global_batch``). The rules apply to abstract
states too (``jax.ShapeDtypeStruct`` leaves, as ``nnx.eval_shape`` builds them): the memory planner lays
out a model it never materializes.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["batch_sharding", "global_batch", "make_mesh", "shard_batch", "state_shardings"]

_META_KEYS = ("out_sharding", "sharding", "sharding_names")


def make_mesh(data: int | None = None, fsdp: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over ``devices`` (default: all); ``data`` defaults to ``len(devices) // fsdp``.

    Example:
      >>> mesh = make_mesh(fsdp=1)
      >>> mesh.axis_names
      ('data', 'fsdp')
    """
    devices = list(jax.devices() if devices is None else devices)
    if jax.process_count() > 1 and data is not None and data * fsdp != len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} must use all {len(devices)} devices of a "
            f"{jax.process_count()}-process run (every process takes part in every step)"
        )
    if data is None:
        if len(devices) % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {len(devices)} devices")
        data = len(devices) // fsdp
    if data * fsdp > len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, have {len(devices)}")
    grid = np.asarray(devices[: data * fsdp], dtype=object).reshape(data, fsdp)
    return Mesh(grid, ("data", "fsdp"))


def _axis_size(mesh: Mesh, name) -> int:
    names = name if isinstance(name, tuple) else (name,)
    return int(np.prod([mesh.shape[n] for n in names]))


def _spec_from_names(names, shape, mesh: Mesh) -> P:
    out = []
    for dim, name in zip(shape, tuple(names) + (None,) * (len(shape) - len(names)), strict=False):
        parts = name if isinstance(name, tuple) else (name,)
        if name is None or any(p not in mesh.axis_names for p in parts) or dim % _axis_size(mesh, name):
            out.append(None)
        else:
            out.append(name)
    return P(*out)


def _first_axis_spec(x, mesh: Mesh) -> P:
    n = mesh.shape["fsdp"]
    if n > 1 and getattr(x, "ndim", 0) >= 1 and x.shape[0] % n == 0:
        return P("fsdp")
    return P()


def _variable_shardings(var: nnx.Variable, mesh: Mesh):
    value = var.get_value() if hasattr(var, "get_value") else var.value
    meta = var.get_metadata()
    names = next((meta[k] for k in _META_KEYS if meta.get(k)), None)
    if isinstance(value, jax.Array | np.ndarray | jax.ShapeDtypeStruct) or np.isscalar(value):
        if names is not None and getattr(value, "ndim", 0) >= 1:
            spec = _spec_from_names(names, value.shape, mesh)
        else:
            spec = P()
        return var.replace(NamedSharding(mesh, spec))
    # A pytree value: a quantized weight dataclass (packed bytes first-axis sharded over fsdp).
    return var.replace(jax.tree.map(lambda x: NamedSharding(mesh, _first_axis_spec(x, mesh)), value))


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """``NamedSharding`` for every leaf of an NNX ``state`` (same structure), by the rules of this module."""
    return jax.tree.map(
        lambda v: _variable_shardings(v, mesh), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def batch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
    """Rows over ("data", "fsdp") when the batch divides the mesh, else over "data" alone, else replicated."""
    if batch_size % mesh.size == 0:
        return NamedSharding(mesh, P(("data", "fsdp")))
    if batch_size % mesh.shape["data"] == 0:
        return NamedSharding(mesh, P("data"))
    return NamedSharding(mesh, P())


def global_batch(data, step: int, batch_size: int, *, seed: int, mesh: Mesh | None) -> dict:
    """The batch of global step ``step`` of ``data`` (a ``PackedData``), placed for the step.

    One process: ``batch_at``'s host arrays (the step places them). Several processes: global arrays built
    with ``jax.make_array_from_callback``, each process reading only the rows its devices hold; every
    process computes the same row indices (``batch_rows``), so the batch is the same at any process count.
    """
    from oftjax.train._batches import batch_at, batch_rows

    if mesh is None or jax.process_count() == 1:
        return batch_at(data, step, batch_size, seed=seed)
    rows = batch_rows(len(data), step, batch_size, seed=seed)
    sharding = batch_sharding(mesh, batch_size)
    width = data.width(rows)
    arrays = {k: a[:, :width] for k, a in data.arrays().items()}

    def rows_of(array: np.ndarray):
        return lambda index: array[rows[index[0]]][(slice(None), *index[1:])]

    return {
        k: jax.make_array_from_callback((batch_size, *a.shape[1:]), sharding, rows_of(a))
        for k, a in arrays.items()
    }


def shard_batch(batch: dict, mesh: Mesh | None) -> dict:
    """Place a host batch (dict of ``[B, ...]`` arrays) on the mesh (or the default device)."""
    if mesh is None:
        return {k: jax.device_put(v) for k, v in batch.items()}
    b = next(iter(batch.values())).shape[0]
    sharding = batch_sharding(mesh, b)
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}
