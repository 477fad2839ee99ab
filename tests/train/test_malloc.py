"""``oftjax.cli._malloc.keep_freed_memory``: freed large blocks are reused instead of faulted in again.

Runs in subprocesses (the setting is process-wide and must precede other allocations). A 64 MiB buffer
allocated, freed and allocated again faults ~16k pages the second time with glibc's defaults (it is mmap'd
afresh) and almost none once the setting keeps freed memory in the heap.
"""

import platform
import subprocess
import sys

import pytest

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


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc-only setting (a no-op elsewhere)")
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

    assert setting() == "keep"  # the embedded model
    assert setting("--model", "some/dir") == "default"  # a real model: see malloc_setting
    assert setting("--malloc", "default") == "default"
    assert setting("--model", "some/dir", "--malloc", "keep") == "keep"


def test_not_applied_once_jax_runs():
    # in-process CLI calls (tests, notebooks) must not change a running process's allocator halfway
    import jax.numpy as jnp

    from oftjax.cli._malloc import keep_freed_memory

    jnp.zeros(1).block_until_ready()
    assert keep_freed_memory() == "not applied: JAX's backends are already running in this process"
