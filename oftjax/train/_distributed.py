"""Multi-process runs over ``jax.distributed``: joining, the one process that writes, and a dead peer.

JAX is the distributed engine. ``initialize`` joins the processes (``jax.distributed.initialize``, from
explicit arguments or from what JAX detects: SLURM, Open MPI, TPU pod slices); from then on every process
sees the global device list, one ("data", "fsdp") mesh spans all of them (``oftjax.train.make_mesh``), and
every process runs the same jitted step on its own devices. The step's collectives (gradient all-reduce,
FSDP all-gathers) cross processes through XLA: NCCL on GPUs, ICI/DCN on TPUs, gloo between CPU processes.

Division of work:
  * every process computes the same global batch indices and reads only the rows its devices hold
    (``global_batch``), so a run is deterministic whatever the process count;
  * metrics are replicated scalars, read by every process; process 0 alone (``is_primary``) writes
    ``metrics.jsonl``, the plot, checkpoints and the adapter, and shows progress;
  * a checkpoint holds global arrays (sharded leaves are gathered first, ``host_arrays``), so any process
    count and mesh shape can resume it; the run directory must be on a file system all processes read.

A process that dies: the coordination service misses its heartbeats for ``heartbeat_timeout`` seconds and
terminates every other process (XLA prints "the JAX distributed service detected fatal errors ... another
task died" and aborts); a process blocked in a collective with the dead one fails sooner, with a
``jax.errors.JaxRuntimeError`` from the transport (``peer_failure_message`` words it for a user). No
process waits longer than the heartbeat timeout.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

__all__ = [
    "barrier",
    "exit_on_peer_failure",
    "host_arrays",
    "initialize",
    "is_primary",
    "multi_process",
    "peer_failure_message",
    "primary_flag",
]

# Seconds without a heartbeat after which a process counts as dead and the others are terminated.
DEFAULT_HEARTBEAT_TIMEOUT = 60


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT,
    initialization_timeout: int = 300,
    local_device_ids: int | Sequence[int] | None = None,
) -> None:
    """Join a multi-process run (``jax.distributed.initialize``); nothing when already joined.

    Must run before anything touches a JAX device. Arguments left None come from the cluster environment
    JAX detects (SLURM, Open MPI, TPU pods); with none given and none detected, JAX raises. CPU processes
    exchange their collectives over gloo (``jax_cpu_collectives_implementation``).

    Args:
      coordinator: ``HOST:PORT`` of process 0's coordination service (every process passes the same).
      num_processes: how many processes take part.
      process_id: this process's index, 0 .. num_processes - 1.
      heartbeat_timeout: seconds without a heartbeat after which a process counts as dead and the others
        exit (the bound on how long a run outlives one of its processes).
      initialization_timeout: seconds to wait for every process to join.
      local_device_ids: the local devices this process uses (default: all it sees).

    Example:
      >>> initialize("10.0.0.1:1234", 2, 0)  # doctest: +SKIP
    """
    if jax.distributed.is_initialized():
        return
    if heartbeat_timeout < 1:
        raise ValueError(f"heartbeat_timeout must be >= 1 second, got {heartbeat_timeout}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator,
        num_processes,
        process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout,
    )


def multi_process() -> bool:
    """More than one process takes part in this run."""
    return jax.process_count() > 1


def is_primary() -> bool:
    """This is process 0: the one that writes files and shows progress."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (nothing on one process)."""
    if multi_process():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def primary_flag(flag: bool) -> bool:
    """Process 0's ``flag``, on every process (e.g. "process 0 failed to prepare the run directory")."""
    if not multi_process():
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def host_arrays(values: Sequence[Any]) -> list[np.ndarray]:
    """Host numpy copies of ``values`` (global arrays included): one transfer, one gather at most.

    Arrays this process holds entirely (every leaf on one process; replicated leaves on many) are fetched
    with ``jax.device_get``; arrays sharded over several processes are gathered with
    ``multihost_utils.process_allgather``, which every process must call: call this on all processes.
    """
    values = list(values)
    spread = [
        i
        for i, v in enumerate(values)
        if isinstance(v, jax.Array) and not v.is_fully_addressable and not v.is_fully_replicated
    ]
    out = list(jax.device_get([None if i in set(spread) else v for i, v in enumerate(values)]))
    if spread:
        from jax.experimental import multihost_utils

        gathered = multihost_utils.process_allgather([values[i] for i in spread], tiled=True)
        for i, g in zip(spread, gathered, strict=True):
            out[i] = g
    return [np.asarray(v) for v in out]


def peer_failure_message(error: BaseException) -> str:
    """One line for a collective that failed because another process stopped (its log says why)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"process {jax.process_index()} of {jax.process_count()}: a collective with the other processes "
        f"failed, most likely because another process of this run stopped (see its log): {first}"
    )


@contextlib.contextmanager
def exit_on_peer_failure(prefix: str = "oftjax") -> Iterator[None]:
    """In a multi-process run, turn a failed collective into one line on stderr and exit status 1.

    For applications (``oftjax train`` uses it): the process ends at once with ``os._exit``, since a normal
    exit would wait in ``jax.distributed``'s shutdown barrier for the process that is gone. On one process
    errors pass through unchanged.
    """
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if not multi_process():
            raise
        print(f"{prefix}: error: {peer_failure_message(e)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
