"""Process-level memory settings for CPU training: keep XLA:CPU's per-step buffers mapped between steps.

XLA:CPU allocates each execution's temporary buffer (hundreds of MB to GBs for a train step) with
``posix_memalign``. glibc serves a block that large with a fresh ``mmap`` and returns it with ``munmap`` when
the step ends, so every step faults the whole buffer in again, one 4 KiB page at a time, and spends kernel
time doing it (docs/cpu-memory.md). Two ways around it, both choices for a training process, not for a
library, so they live in the application (``oftjax train --malloc``, the benchmarks):

- the block cache (``--malloc cache``, the default with ``--model``): csrc/block_cache.c, preloaded when the
  process starts (``exec_with_block_cache``), keeps freed blocks of 32 MiB and more mapped and hands them out
  again, within the most the process ever had in use at once; everything smaller stays with glibc as
  configured;
- ``keep_freed_memory`` (``--malloc keep``): glibc itself keeps all freed memory in one heap, which fragments
  (its peak grows with the batch widths a run sees).

Figures: benchmarks/RESULTS.md, "Allocator".
"""

from __future__ import annotations

import ctypes
import os
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


# The block cache (csrc/block_cache.c): a library preloaded into a fresh process that keeps freed blocks of
# 32 MiB and more mapped and hands them out again. Unlike keep_freed_memory it leaves glibc's heap as
# configured (smaller blocks are returned and trimmed as usual) and a block is kept only until a larger
# request needs a new one, so the process's peak stays what it would be without it (docs/cpu-memory.md).

_EXEC_MARK = "OFTJAX_BLOCK_CACHE_EXEC"  # set in the environment of the process started with the cache


def block_cache_library() -> str | None:
    """The built block-cache library (``oftjax/cli/_block_cache*.so``), or None where it was not built."""
    from pathlib import Path

    from oftjax.cpu_kernels._library import library_path

    path = library_path("_block_cache", Path(__file__).parent)
    return None if path is None else str(path)


def ld_preload_with(lib: str, current: str | None) -> str:
    """``LD_PRELOAD``'s value with ``lib`` loaded first, ahead of what it already names."""
    return ":".join(p for p in (lib, current or "") if p)


def block_cache_stats() -> dict[str, int] | None:
    """The block cache's counters in this process, or None where it is not loaded.

    ``hits``: requests served by a kept block; ``maps``: blocks mapped; ``unmaps``: blocks returned to the
    system; ``free_bytes``: bytes kept mapped in free blocks now; ``min_bytes``: the smallest request it
    serves (``OFTJAX_BLOCK_CACHE_MIN``); ``max_free_bytes``: the cap on free bytes kept
    (``OFTJAX_BLOCK_CACHE_MAX``).
    """
    fn = getattr(ctypes.CDLL(None), "oftjax_block_cache_stats", None)
    if fn is None:
        return None
    out = (ctypes.c_ulong * 6)()
    fn(out)
    keys = ("hits", "maps", "unmaps", "free_bytes", "min_bytes", "max_free_bytes")
    return dict(zip(keys, (int(v) for v in out), strict=True))


def block_cache_status() -> str:
    """One line: whether this process runs with the block cache, and if not, why."""
    stats = block_cache_stats()
    if stats is not None:
        least = stats["min_bytes"] / 2**20
        return f"block cache: freed blocks of {least:g} MiB and more stay mapped for reuse"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return f"not applied: the block cache needs glibc on Linux (this is {sys.platform})"
    if block_cache_library() is None:
        return "not applied: the block cache was not built (reinstall with a C compiler: `pip install -e .`)"
    if os.environ.get(_EXEC_MARK):
        return "not applied: the process was started with the block cache but the library did not load"
    return "not applied: the block cache is preloaded when a process starts (run the `oftjax` command)"


def exec_with_block_cache(argv: list[str]) -> None:
    """Start this command again as ``python -m oftjax.cli ARGV`` with the block cache preloaded; returns only
    where that cannot be done (already loaded, not built, not glibc, a path LD_PRELOAD cannot carry, or
    tried once already), and the caller goes on without it (``block_cache_status()`` says why)."""
    lib = block_cache_library()
    if (
        block_cache_stats() is not None
        or lib is None
        or not sys.executable
        or os.environ.get(_EXEC_MARK)
        or not sys.platform.startswith("linux")
        or platform.libc_ver()[0] != "glibc"
        or any(c in lib for c in " :")
    ):
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ld_preload_with(lib, env.get("LD_PRELOAD"))
    env[_EXEC_MARK] = lib
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "oftjax.cli", *argv], env)


def pair_with_block_cache() -> str:
    """Where the block cache is loaded, have JAX run CPU programs synchronously (call it before JAX's first
    computation); returns what was done, for the status line ("" where the cache is not loaded).

    With asynchronous dispatch a train step's next execution is enqueued, and its temporary buffer allocated,
    while the current one still holds its own: the cache then maps a second block of the same size, and both
    stay resident (a second buffer's worth of peak memory). Run in the caller's thread, an execution has
    freed its buffer before the next one asks, and one block serves every step. On a CPU the host work
    between steps is milliseconds against seconds of step, so nothing is lost by not overlapping it.
    """
    if block_cache_stats() is None:
        return ""
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return "; JAX runs CPU programs synchronously (one step buffer at a time)"


def forget_block_cache_env() -> None:
    """In the process started by ``exec_with_block_cache``: take the library out of ``LD_PRELOAD`` again, so
    the processes this one starts (compilers, the torch oracle) run with the allocator as configured."""
    lib = os.environ.pop(_EXEC_MARK, None)
    if lib is None:
        return
    rest = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p and p != lib]
    if rest:
        os.environ["LD_PRELOAD"] = ":".join(rest)
    else:
        os.environ.pop("LD_PRELOAD", None)
