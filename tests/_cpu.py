"""What this machine's CPU has, for the native-kernel tests (which paths must run here)."""

from __future__ import annotations

import os
import subprocess
import sys


def cpu_flags() -> set[str]:
    """The ``flags`` of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def has_avx512f() -> bool:
    return "avx512f" in cpu_flags()


def run_without_native(code: str) -> bytes:
    """Run ``code`` in a fresh interpreter with the native kernels off (``OFTJAX_NATIVE=0``); its stdout."""
    env = dict(os.environ, OFTJAX_NATIVE="0", XLA_FLAGS="")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True).stdout
