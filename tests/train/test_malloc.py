"""``oftjax.cli._malloc``: freed large blocks are reused instead of faulted in again.

Runs in subprocesses (the settings are process-wide and must precede other allocations; the block cache is
preloaded when a process starts). A 64 MiB buffer allocated, freed and allocated again faults ~16k pages the
second time with glibc's defaults (it is mmap'd afresh) and almost none once freed memory is kept, by glibc's
heap (``keep_freed_memory``) or by the block cache (csrc/block_cache.c).
"""

import json
import os
import platform
import subprocess
import sys

import pytest

from oftjax.cli import _malloc

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc-only settings (no-ops elsewhere, said so by their status lines)",
)

# plain malloc + memset (numpy would advise huge pages for its large arrays, which hides the faults)
_PROBE = """
import ctypes, resource, sys
from oftjax.cli._malloc import keep_freed_memory
said = keep_freed_memory() if sys.argv[1] == "keep" else "default"
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 64 << 20
p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(n); ctypes.memset(p, 1, n)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0, said)
"""


def _faults(mode: str) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    faults, said = out.stdout.strip().split(" ", 1)
    return int(faults), said


def test_freed_blocks_are_reused_without_page_faults():
    default, _ = _faults("default")
    kept, said = _faults("keep")
    assert said.startswith("glibc: one arena"), said
    assert default > 10_000, default  # 16,384 pages of 4 KiB, mapped afresh
    assert kept < 1_000, kept


def test_the_cli_applies_it_by_default():
    from oftjax.cli import build_parser
    from oftjax.cli._train import malloc_setting

    def setting(*argv: str) -> str:
        return malloc_setting(build_parser().parse_args(["train", *argv]))

    assert setting() == "default"  # the embedded model: short steps, small buffers
    assert setting("--model", "some/dir") == "cache"  # a real model's step buffers
    assert setting("--malloc", "default") == "default"
    assert setting("--model", "some/dir", "--malloc", "keep") == "keep"


def test_not_applied_once_jax_runs():
    # in-process CLI calls (tests, notebooks) must not change a running process's allocator halfway
    import jax.numpy as jnp

    from oftjax.cli._malloc import keep_freed_memory

    jnp.zeros(1).block_until_ready()
    assert keep_freed_memory() == "not applied: JAX's backends are already running in this process"


# ------------------------------------------------------------------------------------------- block cache


def _library() -> str:
    lib = _malloc.block_cache_library()
    assert lib is not None, "oftjax/cli/_block_cache*.so was not built: reinstall with `pip install -e .`"
    return lib


def _with_cache(code: str, **env: str) -> list[str]:
    """Run ``code`` in a Python process started with the block cache; its stdout lines."""
    full = {**os.environ, "LD_PRELOAD": _library(), **env}
    prelude = (
        "import ctypes, resource\n"
        "from oftjax.cli._malloc import block_cache_stats\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.malloc.restype = libc.realloc.restype = ctypes.c_void_p\n"
        "libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]\n"
        "libc.free.argtypes = libc.malloc_usable_size.argtypes = [ctypes.c_void_p]\n"
        "libc.malloc_usable_size.restype = ctypes.c_size_t\n"
        "MiB = 1 << 20\n"
    )
    out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=full)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")


def test_block_cache_reuses_a_freed_block_without_page_faults():
    lines = _with_cache(
        "n = 64 * MiB\n"
        "p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)\n"
        "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "q = libc.malloc(n); ctypes.memset(q, 2, n)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0, p == q)\n"
        "a = ctypes.c_void_p(); libc.free(q)\n"
        "assert libc.posix_memalign(ctypes.byref(a), 64, n) == 0 and a.value % 64 == 0\n"
        "print(a.value == p, block_cache_stats())\n"
    )
    faults, same = lines[0].split()
    assert int(faults) < 1_000 and same == "True", lines  # the same block, its pages still mapped
    assert lines[1].startswith("True"), lines  # posix_memalign (XLA's allocation) takes it as well
    assert "'hits': 2, 'maps': 1, 'unmaps': 0," in lines[1] and f"'min_bytes': {32 << 20}," in lines[1], lines


def test_block_cache_leaves_small_blocks_to_glibc():
    lines = _with_cache("p = libc.malloc(MiB); libc.free(p); print(block_cache_stats())")
    assert lines[0].startswith("{'hits': 0, 'maps': 0, 'unmaps': 0, 'free_bytes': 0,"), lines


def test_a_larger_request_returns_the_smaller_free_blocks():
    # the free blocks never add up to more than the process used at once: a 40 MiB block freed, then a
    # 100 MiB request, leaves one 100 MiB mapping, which serves a later 50 MiB request
    lines = _with_cache(
        "p = libc.malloc(40 * MiB); libc.free(p)\n"
        "q = libc.malloc(100 * MiB); libc.free(q); print(block_cache_stats())\n"
        "r = libc.malloc(50 * MiB); print(r == q, block_cache_stats())\n"
    )
    assert lines[0].startswith(f"{{'hits': 0, 'maps': 2, 'unmaps': 1, 'free_bytes': {100 << 20},"), lines
    assert lines[1].startswith("True {'hits': 1, 'maps': 2, 'unmaps': 1, 'free_bytes': 0,"), lines


def test_blocks_stay_within_the_most_ever_in_use():
    # a small request never takes a block more than twice its size; before it maps its own, free blocks go
    # until the mapped bytes fit in the most ever in use at once: 200 MiB free, then 40 MiB asked for
    lines = _with_cache(
        "p = libc.malloc(200 * MiB); libc.free(p)\n"
        "q = libc.malloc(40 * MiB); print(q != p, block_cache_stats())\n"
        # 40 + 100 MiB in use at once fit in the 200 MiB once in use: both stay when freed, and serve again
        "r = libc.malloc(100 * MiB); libc.free(r); libc.free(q); print(block_cache_stats())\n"
        "q2 = libc.malloc(40 * MiB); r2 = libc.malloc(100 * MiB)\n"
        "print(q2 == q, r2 == r, block_cache_stats())\n"
    )
    assert lines[0].startswith("True {'hits': 0, 'maps': 2, 'unmaps': 1, 'free_bytes': 0,"), lines
    assert lines[1].startswith(f"{{'hits': 0, 'maps': 3, 'unmaps': 1, 'free_bytes': {140 << 20},"), lines
    assert lines[2].startswith("True True {'hits': 2, 'maps': 3, 'unmaps': 1, 'free_bytes': 0,"), lines


def test_block_cache_max_returns_what_it_cannot_keep():
    code = "p = libc.malloc(40 * MiB); libc.free(p); print(block_cache_stats())"
    lines = _with_cache(code, OFTJAX_BLOCK_CACHE_MAX="0")
    assert lines[0].startswith("{'hits': 0, 'maps': 1, 'unmaps': 1, 'free_bytes': 0,"), lines


def test_a_block_free_for_long_is_returned():
    # steps reuse their buffer within milliseconds; one left free past OFTJAX_BLOCK_CACHE_SECONDS is unmapped
    code = (
        "import time\n"
        "p = libc.malloc(40 * MiB); libc.free(p); print(block_cache_stats()['free_bytes'])\n"
        "time.sleep(1.0); print(block_cache_stats())\n"
    )
    lines = _with_cache(code, OFTJAX_BLOCK_CACHE_SECONDS="0.2")
    assert lines[0] == str(40 << 20), lines
    assert lines[1].startswith("{'hits': 0, 'maps': 1, 'unmaps': 1, 'free_bytes': 0,"), lines


def test_a_forked_child_allocates_and_frees_blocks():
    # the cache's lock is held across fork(), so the child never inherits it taken
    code = (
        "import os, threading\n"
        "stop = False\n"
        "def churn():\n"
        "    while not stop:\n"
        "        libc.free(libc.malloc(40 * MiB))\n"
        "t = threading.Thread(target=churn); t.start()\n"
        "for _ in range(20):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        libc.free(libc.malloc(50 * MiB)); os._exit(0)\n"
        "    assert os.waitpid(pid, 0)[1] == 0\n"
        "stop = True; t.join(); print('ok')\n"
    )
    assert _with_cache(code)[0] == "ok"


def test_realloc_and_usable_size_know_the_blocks():
    lines = _with_cache(
        "p = libc.malloc(40 * MiB); ctypes.memset(p, 7, 40 * MiB)\n"
        "print(libc.malloc_usable_size(p) >= 40 * MiB)\n"
        "q = libc.realloc(p, 90 * MiB)\n"  # grows into a new block, contents kept
        "tail = ctypes.string_at(q + 40 * MiB - 4, 4)\n"
        "print(tail == bytes([7] * 4), libc.malloc_usable_size(q) >= 90 * MiB)\n"
        "r = libc.realloc(q, 100)\n"  # shrinks into glibc's heap, contents kept
        "print(ctypes.string_at(r, 100) == bytes([7] * 100))\n"
        "s = libc.malloc(1000); ctypes.memset(s, 9, 1000)\n"
        "t = libc.realloc(s, 64 * MiB)\n"  # a glibc block grown into a cached one
        "print(ctypes.string_at(t, 1000) == bytes([9] * 1000), block_cache_stats()['maps'])\n"
        "libc.free(r); libc.free(t)\n"
    )
    assert lines[:4] == ["True", "True True", "True", "True 2"], lines


def test_jax_values_are_the_same_under_the_cache():
    # a jitted computation's results, bit for bit, with and without the cache (here for blocks from 1 MiB, so
    # XLA's 2-4 MiB buffers go through it); the cache served them
    code = (
        "import numpy as np, jax, jax.numpy as jnp\n"
        "x = jnp.asarray(np.random.default_rng(0).standard_normal((512, 1024), dtype=np.float32))\n"
        "f = jax.jit(lambda x, w: jnp.tanh(x @ w).sum() + (x @ w.T).std())\n"
        "w = x[:, :512].T @ x[:, :512] / 512\n"
        "w = jnp.pad(w, ((0, 512), (0, 512)))\n"
        "vals = [float(f(x, w + i)) for i in range(4)]\n"
        "print(vals); print(block_cache_stats())\n"
    )
    cached = _with_cache(code, OFTJAX_BLOCK_CACHE_MIN=str(1 << 20))
    plain_code = "from oftjax.cli._malloc import block_cache_stats\n" + code
    plain = subprocess.run([sys.executable, "-c", plain_code], capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    assert cached[0] == plain.stdout.split("\n")[0] and plain.stdout.split("\n")[1] == "None"
    assert json.loads(cached[1].replace("'", '"'))["hits"] > 0, cached


def test_status_lines_and_the_environment_given_back(monkeypatch):
    assert _malloc.block_cache_stats() is None  # this test process was not started with it
    assert _malloc.block_cache_status() == (
        "not applied: the block cache is preloaded when a process starts (run the `oftjax` command)"
    )
    monkeypatch.setenv("OFTJAX_BLOCK_CACHE_EXEC", "/x/_block_cache.so")
    assert "started with the block cache but the library did not load" in _malloc.block_cache_status()
    monkeypatch.setenv("LD_PRELOAD", "/x/_block_cache.so:/y/other.so")
    _malloc.forget_block_cache_env()
    assert os.environ["LD_PRELOAD"] == "/y/other.so" and "OFTJAX_BLOCK_CACHE_EXEC" not in os.environ
    monkeypatch.setenv("OFTJAX_BLOCK_CACHE_EXEC", "/x/_block_cache.so")
    monkeypatch.setenv("LD_PRELOAD", "/x/_block_cache.so")
    _malloc.forget_block_cache_env()
    assert "LD_PRELOAD" not in os.environ
