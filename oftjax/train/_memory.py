"""Per-device memory of a training step, from XLA's compiled memory analysis of abstract shapes.

``plan_memory(build, cfg, mesh)`` builds the model and its optimizer with ``nnx.eval_shape`` (every array a
``jax.ShapeDtypeStruct``: no weights loaded, no device memory), lays them out with the training rules
(``state_shardings``, ``batch_sharding``), lowers the very step ``Trainer`` runs (``jit_train_step``) and
compiles it ahead of time for ``mesh``'s devices. XLA's ``memory_analysis()`` of the compiled step gives,
per device, the argument bytes (the donated training state and the batch), the temporary allocation (every
buffer the step creates, packed by XLA's buffer assignment at its peak) and the outputs not written in place.

The breakdown:
  * frozen packed weights, frozen float weights (embeddings, lm_head, norms, biases), rotations (the
    trainable variables), optimizer state, the batch: each variable's shard size under its sharding,
    which adds up to XLA's argument size;
  * activations: the residuals JAX's autodiff saves for the backward pass (``jax.vjp`` of the loss with
    respect to the trainable variables, outside the arguments), divided over the batch's shards: what
    ``remat`` shrinks;
  * temporaries: the rest of XLA's temporary allocation (dequantized weights, a chunk of logits and its loss
    (``head_loss_sum``), the gradients, working buffers of the backward pass).

The total per device is arguments + temporaries + outputs not aliased to the arguments: the peak of the
step's own buffers. The figures are those of the backend that compiled: a CPU compile (``oftjax plan`` on a
host without the accelerators it plans for simulates the devices with ``--xla_force_host_platform_device_
count``) has the same arguments as any backend, and the temporaries of XLA:CPU's schedule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.extend.core import Literal
from jax.sharding import Mesh

from oftjax.train._config import TrainConfig, make_optimizer
from oftjax.train._sharding import batch_sharding, state_shardings
from oftjax.train._step import batch_loss_sum, default_wrt, jit_train_step

__all__ = ["MemoryPlan", "plan_memory"]

# The parts of a plan, in the order they are shown.
PARTS = (
    "frozen_packed",
    "frozen_float",
    "rotations",
    "optimizer",
    "batch",
    "activations",
    "temporaries",
)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one training step (see the module docstring for what each part holds).

    ``xla`` keeps XLA's own figures (``argument``, ``output``, ``alias``, ``temp``); ``devices`` and
    ``platform`` say what the step was compiled for.
    """

    frozen_packed: int
    frozen_float: int
    rotations: int
    optimizer: int
    batch: int
    activations: int
    temporaries: int
    xla: dict[str, int]
    devices: int
    platform: str

    @property
    def total(self) -> int:
        """Peak bytes per device: arguments + temporaries + outputs not written in place."""
        x = self.xla
        return x["argument"] + x["temp"] + x["output"] - x["alias"]

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": self.total}


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return math.prod(shape) * jnp.dtype(x.dtype).itemsize


def _state_parts(abstract: nnx.State, wrt: Any) -> dict[str, int]:
    """Per-device bytes of the (model, optimizer) state by part."""
    from oftjax.nn import QuantWeight

    parts = dict.fromkeys(("frozen_packed", "frozen_float", "rotations", "optimizer"), 0)
    for path, var in nnx.to_flat_state(abstract):
        size = sum(_shard_bytes(x) for x in jax.tree.leaves(var.get_value()))
        if path[0] == 1:
            parts["optimizer"] += size
        elif isinstance(var, QuantWeight):
            parts["frozen_packed"] += size
        elif nnx.filterlib.to_predicate(wrt)(path, var):
            parts["rotations"] += size
        else:
            parts["frozen_float"] += size  # float weights, norms, biases, RNG counters
    return parts


def _residual_bytes(model: nnx.Module, wrt: Any, batch: dict) -> int:
    """Bytes of the residuals the backward pass keeps (global shapes; not the step's arguments)."""
    graphdef, trainable, rest = nnx.split(model, wrt, ...)

    def loss(t, r, b):
        # fresh Variables at this trace level (nnx.remat writes the layer state back into them)
        m = nnx.merge(graphdef, t, jax.tree.map(lambda x: x, r))
        return batch_loss_sum(m, b)[0]

    def residuals(t, r, b):
        return jax.vjp(lambda t_: loss(t_, r, b), t)[1]

    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731 - shapes only
    args = jax.tree.map(spec, (trainable, rest, batch))
    jaxpr = jax.make_jaxpr(residuals)(*args).jaxpr
    seen = set(map(id, jaxpr.invars))  # the arguments: counted as state, not as activations
    total = 0
    for v in jaxpr.outvars:
        if isinstance(v, Literal) or id(v) in seen or not hasattr(v.aval, "shape"):
            continue
        seen.add(id(v))
        total += math.prod(v.aval.shape) * jnp.dtype(v.aval.dtype).itemsize
    return total


def _batch_shards(mesh: Mesh, batch_size: int) -> int:
    spec = batch_sharding(mesh, batch_size).spec
    if not spec or spec[0] is None:
        return 1
    names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    return math.prod(mesh.shape[n] for n in names)


def plan_memory(
    build: Callable[[], nnx.Module],
    cfg: TrainConfig,
    mesh: Mesh,
    *,
    wrt: Any = None,
    tx: optax.GradientTransformation | None = None,
    compiler_options: dict[str, Any] | None = None,
) -> MemoryPlan:
    """Compile ``Trainer``'s step for ``build()``'s model on ``mesh`` from abstract shapes; its memory plan.

    Args:
      build: makes the model to train (quantized, adapted) from nothing; traced by ``nnx.eval_shape``, so
        its arrays are never allocated.
      cfg: the run (``batch_size``, ``seq_len``, ``grad_accum``, optimizer).
      mesh: a ("data", "fsdp") mesh (``make_mesh``) over the devices to compile for.
      wrt: the trainable-variable filter (default ``OFTParam``).
      tx: the optimizer (default ``make_optimizer(cfg)``).
      compiler_options: XLA options for the compile (e.g. a lower backend optimization level: the buffer
        assignment, and so the plan, does not depend on it).

    Example:
      >>> plan = plan_memory(build_model, TrainConfig(batch_size=8), make_mesh(1, 8))  # doctest: +SKIP
      >>> plan.total / 2**30                                                          # doctest: +SKIP
    """
    wrt = default_wrt() if wrt is None else wrt
    tx = tx if tx is not None else make_optimizer(cfg)

    def model_and_optimizer():
        model = build()
        return model, nnx.Optimizer(model, tx, wrt=wrt)

    model, optimizer = nnx.eval_shape(model_and_optimizer)
    graphdef, state = nnx.split((model, optimizer))
    shardings = state_shardings(state, mesh)
    abstract = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), state, shardings)
    rows = batch_sharding(mesh, cfg.batch_size)
    batch = {
        "input_ids": jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32, sharding=rows),
        "loss_mask": jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.bool_, sharding=rows),
    }
    lowered = jit_train_step(graphdef, wrt, cfg, shardings).lower(abstract, batch)
    stats = lowered.compile(compiler_options or {}).memory_analysis()
    xla = {
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),
        "temp": int(stats.temp_size_in_bytes),
    }
    micro = {k: jax.ShapeDtypeStruct((cfg.batch_size // cfg.grad_accum, cfg.seq_len), v.dtype)
             for k, v in batch.items()}  # fmt: skip
    activations = _residual_bytes(model, wrt, micro) // _batch_shards(mesh, cfg.batch_size // cfg.grad_accum)
    return MemoryPlan(
        **_state_parts(abstract, wrt),
        batch=sum(_shard_bytes(x) for x in batch.values()),
        activations=min(activations, xla["temp"]),
        temporaries=max(xla["temp"] - activations, 0),
        xla=xla,
        devices=mesh.size,
        platform=mesh.devices.flat[0].platform,
    )
