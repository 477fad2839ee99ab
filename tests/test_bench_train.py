"""benchmarks/bench_train.py's timing machinery (no framework runs here): turns between two processes,
several steps per turn with the last one timed, the environment each side starts with, and the fault
counter's warm-up.

The benchmark itself runs the torch stack and the JAX trainer for minutes; these check that what it reports is
what its flags say (benchmarks/RESULTS.md compares the designs).
"""

import importlib.util
import os
import platform
import sys
import threading
import time
from pathlib import Path

import pytest

from oftjax.cli import _malloc

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
_spec = importlib.util.spec_from_file_location("bench_train", _PATH)
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)


def _take_turns(calls: int, rounds: int) -> tuple[list[str], dict[str, list[float]]]:
    """Two threads standing for the two processes; each call logs its side and sleeps 10 ms on the last one
    of a turn only, so a timed call that is not the last shows up in the times."""
    first, second = threading.Semaphore(1), threading.Semaphore(0)
    log: list[str] = []
    times: dict[str, list[float]] = {}

    def side(name: str, turns: "bench_train.Turns") -> None:
        count = [0]

        def call() -> None:
            count[0] += 1
            log.append(name)
            if count[0] % calls == 0:
                time.sleep(0.01)

        (times[name],) = turns.time([call], rounds)

    threads = [
        threading.Thread(target=side, args=("jax", bench_train.Turns(first, second, calls))),
        threading.Thread(target=side, args=("torch", bench_train.Turns(second, first, calls))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return log, times


@pytest.mark.parametrize("calls", [1, 3])
def test_turns_alternate_and_time_the_last_call_of_each(calls):
    log, times = _take_turns(calls, rounds=4)
    assert log == (["jax"] * calls + ["torch"] * calls) * 4
    for side in ("jax", "torch"):
        assert len(times[side]) == 4
        assert all(0.009 < t < 0.5 for t in times[side]), times  # the sleeping (last) call, and only it


def test_a_call_count_overrides_the_turns_own():
    calls: list[int] = []
    turns = bench_train.Turns(threading.Semaphore(10), threading.Semaphore(0), 3)  # one side alone
    (ts,) = turns.time([lambda: calls.append(1)], 2, calls=1)
    assert len(calls) == 2 and len(ts) == 2
    (ts,) = turns.time([lambda: calls.append(1)], 2)
    assert len(calls) == 2 + 6 and len(ts) == 2


def test_fault_counter_warms_up_first():
    calls: list[int] = []
    faults = bench_train._faults_per_step(lambda: calls.append(1), n=3, warm=2)
    assert len(calls) == 5 and faults >= 0


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="the block cache is built and preloaded on glibc Linux only",
)
@pytest.mark.parametrize("keep_through_turns, seconds", [(True, "0"), (False, None)])
def test_block_cache_environment_per_design(monkeypatch, keep_through_turns, seconds):
    lib = _malloc.block_cache_library()
    assert lib is not None, "the block cache was not built: reinstall with a C compiler (`pip install -e .`)"
    monkeypatch.setenv("LD_PRELOAD", "/other.so")
    monkeypatch.delenv("OFTJAX_BLOCK_CACHE_SECONDS", raising=False)
    with bench_train._preloaded("cache", keep_through_turns):
        assert os.environ["LD_PRELOAD"] == f"{lib}:/other.so"
        assert os.environ.get("OFTJAX_BLOCK_CACHE_SECONDS") == seconds
    assert os.environ["LD_PRELOAD"] == "/other.so"
    assert "OFTJAX_BLOCK_CACHE_SECONDS" not in os.environ
    with bench_train._preloaded("default", keep_through_turns):
        assert os.environ["LD_PRELOAD"] == "/other.so"
