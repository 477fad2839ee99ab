"""What this machine's CPU has, for the CPU-kernel tests (which paths must run here)."""

from __future__ import annotations


def cpu_flags() -> set[str]:
    """The ``flags`` of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def has_avx512f() -> bool:
    return "avx512f" in cpu_flags()
