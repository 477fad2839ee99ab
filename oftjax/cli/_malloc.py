"""Process-level glibc malloc settings for CPU training: keep freed memory mapped between train steps.

XLA:CPU allocates each execution's temporary buffer (hundreds of MB for a train step) with
``posix_memalign`` from one of its worker threads. glibc serves an allocation that large from a per-thread
arena with a fresh ``mmap`` and returns it with ``munmap`` when the step ends, so every step faults the whole
buffer in again, one 4 KiB page at a time, and spends kernel time doing it. With one arena, no ``mmap`` for
large blocks and no trimming, the buffer stays in the heap and the next step reuses it without page faults
(the figures: benchmarks/RESULTS.md, "Train step").

The price: memory freed by the process stays mapped (its peak resident set is kept until exit) and all threads
allocate from one arena (XLA allocates a few large blocks per step, so there is no contention to speak of).
That is a choice for a training process, not for a library, so it lives in the application: ``oftjax train``
and the benchmarks call ``keep_freed_memory()`` before JAX starts (``--malloc default`` turns it off).
"""

from __future__ import annotations

import ctypes
import platform
import sys

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_memory() -> str:
    """Make glibc keep freed memory for reuse (one arena, no mmap'd blocks, no trimming); say what was done.

    Call it before the first JAX computation (the XLA:CPU worker threads pick their malloc arena on their
    first allocation). Does nothing, and says why, where the C library is not glibc or where JAX has already
    started its backends in this process (e.g. a CLI call from a test session: the setting would apply to
    the rest of that process only halfway).

    Returns:
      A one-line description: ``"glibc: ..."`` when applied, else the reason it was not.

    Example:
      >>> from oftjax.cli import keep_freed_memory
      >>> keep_freed_memory().split(":")[0] in ("glibc", "not applied")
      True
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        libc = platform.libc_ver()[0] or "no libc"
        return f"not applied: needs glibc on Linux (this is {sys.platform}, {libc})"
    jax_bridge = sys.modules.get("jax._src.xla_bridge")
    if jax_bridge is not None and jax_bridge.backends_are_initialized():
        return "not applied: JAX's backends are already running in this process"
    libc = ctypes.CDLL(None)
    ok = (
        libc.mallopt(_M_ARENA_MAX, 1) == 1
        and libc.mallopt(_M_MMAP_MAX, 0) == 1
        and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    )
    if not ok:
        return "not applied: glibc mallopt refused a setting"
    return "glibc: one arena, no mmap'd blocks, no trimming (freed memory is reused, not returned)"
