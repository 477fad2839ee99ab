"""Jitted oftjax.quant vs bitsandbytes on the CPU: dequantize and quantize a 4096 x 4096 weight.

Usage: python benchmarks/bench_quant.py [--size 4096] [--dtype bfloat16] [--repeats 15]
       [--allocator default|fresh|keep]

bitsandbytes runs its real CPU kernels (its AVX512 4-bit dequantize included; the oracle's dequantize fix,
docs/oracle.md, is *not* installed here). "bnb/JAX" > 1 means JAX is faster. Times are medians after a
warm-up (compilation excluded). Figures: benchmarks/RESULTS.md.

What makes the comparison fair (checked, not assumed):
  * Same work and the same result: both sides start from the same packed bytes (asserted bit-equal) and
    return a freshly allocated ``[size, size]`` array of ``--dtype``, asserted equal (bit for bit; FP4 by
    value because bnb's AVX512 kernel writes -0.0 where its reference writes +0.0). For nf4+DQ both sides
    also dequantize the nested absmax (bnb's ``dequantize_4bit`` runs ``dequantize_blockwise`` on it, then
    adds the offset, on every call).
  * Synchronisation: torch on the CPU returns once the kernel has written its output; the JAX side calls
    ``block_until_ready``.
  * The machine is shared: the two sides of a row are timed in alternating rounds, so that a burst of load
    from another process hits both, and each side's median is taken over ``--repeats`` calls. Each round
    starts with an untimed call, because the thread pool of the side that just ran (XLA's or bnb's OpenMP)
    keeps spinning for a while and slows the other side's first call.
  * Page faults: a fresh 32 MiB output is an ``mmap``'d block from glibc on both sides, and the first write
    to each 4 KiB page faults into the kernel, at a cost comparable to the whole dequantize. That cost is part
    of a real call, so it is in the default table. But glibc moves its mmap threshold after frees, so whether
    a block comes back pre-faulted from the heap depends on the history of the process, and a side's median
    can move by 2x between runs (even making bnb's nf4+DQ, which does strictly more work, look faster than
    its nf4). ``--allocator`` sets glibc's ``mallopt`` for this process (both sides alike; never done by the
    library): ``fresh`` pins the threshold at glibc's initial 128 KiB, so every block of 128 KiB or more is
    mapped and faulted afresh on every call (the output on both sides, and also the JAX side's table of
    per-block values, which the default allocator reuses); ``keep`` keeps freed blocks mapped (as a
    long-running training process would), which leaves the compute alone.

With ``--cpu-kernels on`` (the default) the JAX 4-bit dequantize runs oftjax's CPU kernel (csrc/dequant4.cc,
an XLA FFI custom call: AVX-512 permutes, the double-quant absmax computed per block in the same pass, XLA's
intra-op thread pool, huge-page advice for its output, non-temporal stores for large outputs); with ``off``
the pure-JAX formulation that GPUs and TPUs run; the printed header says which. XLA:CPU compiler options
tried on the pure-JAX formulation did not help, so none is set here or in the library (benchmarks/RESULTS.md
lists them).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from oftjax import quant

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def set_allocator(keep: bool) -> None:
    """glibc for this process: keep freed large blocks mapped (``keep``), or map every one afresh."""
    libc = ctypes.CDLL("libc.so.6")
    if keep:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    else:
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)  # glibc's default value, now fixed


def _dequant_path() -> str:
    from oftjax import cpu_kernels

    info = cpu_kernels.info()
    if "dequantize_4bit" not in info["operations"]:
        reason = info["dequantize"]["reason"] if info["enabled"] else "--cpu-kernels off"
        return f"pure JAX ({reason})"
    pages = "4 KiB pages" if os.environ.get("OFTJAX_HUGEPAGES", "1") == "0" else "huge-page advice"
    avx = "AVX-512" if info["dequantize"]["avx512"] else "scalar"
    return f"CPU kernel ({avx}, {pages})"


def paired_medians(fj, fb, repeats: int, rounds: int = 3) -> tuple[float, float]:
    """Median ms of ``fj`` and ``fb`` over ``rounds`` alternating rounds of ``repeats`` calls each.

    Each round starts with one untimed call per side: the other side's thread pool (XLA's, or bnb's OpenMP)
    may still be spinning from its last call and would otherwise slow down the first timed call.
    """
    tj, tb = [], []
    for _ in range(rounds):
        for fn, ts in ((fj, tj), (fb, tb)):
            fn()  # warm-up (compilation, kernel caches, allocator and thread-pool state)
            for _ in range(-(-repeats // rounds)):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(tj), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--allocator", default="default", choices=["default", "fresh", "keep"], help="see doc")
    ap.add_argument(
        "--cpu-kernels",
        choices=["on", "off"],
        default="on",
        help="oftjax.cpu_kernels (off: the pure-JAX library)",
    )
    args = ap.parse_args()
    if args.allocator != "default":
        set_allocator(keep=args.allocator == "keep")
    if args.cpu_kernels == "on":
        from oftjax import cpu_kernels

        cpu_kernels.enable()

    import bitsandbytes.functional as F  # noqa: N812 - bnb's own alias
    import torch

    n = args.size
    w_np = (np.random.default_rng(0).standard_normal((n, n)) * 0.02).astype(np.float32)
    w_t = torch.from_numpy(w_np).to(getattr(torch, args.dtype))
    w_j = jnp.asarray(w_np).astype(getattr(jnp, args.dtype))

    jq4 = jax.jit(quant.quantize_4bit, static_argnums=(1, 2, 3))
    jq8 = jax.jit(quant.quantize_int8)
    jdq = jax.jit(quant.dequantize)

    def same(out_j, out_b, by_value: bool) -> None:
        a = np.asarray(out_j.astype(jnp.float32))
        b = out_b.float().numpy()
        ok = np.array_equal(a, b) if by_value else np.array_equal(a.view(np.uint32), b.view(np.uint32))
        assert ok and out_j.shape == tuple(out_b.shape) and out_j.dtype == w_j.dtype, "outputs differ"

    rows = []
    # int8 (LLM.int8 row-wise): bnb quantizes the fp16-cast weight; its int8_vectorwise_dequant returns
    # float32, so the bnb side casts to --dtype as the JAX side does inside its one jitted call
    cb, scb, _ = F.int8_vectorwise_quant(w_t.to(torch.float16))
    q8 = jq8(w_j)
    same(jdq(q8), F.int8_vectorwise_dequant(cb, scb).to(w_t.dtype), by_value=False)
    dj, db = paired_medians(
        lambda: jdq(q8).block_until_ready(),
        lambda: F.int8_vectorwise_dequant(cb, scb).to(w_t.dtype),
        args.repeats,
    )
    qj, qb = paired_medians(
        lambda: jq8(w_j).CB.block_until_ready(),
        lambda: F.int8_vectorwise_quant(w_t.to(torch.float16)),
        max(3, args.repeats // 3),
    )
    rows.append(("int8", dj, db, qj, qb))
    for name, qt, dq in (("nf4", "nf4", False), ("fp4", "fp4", False), ("nf4+DQ", "nf4", True)):
        p, st = F.quantize_4bit(w_t, blocksize=64, quant_type=qt, compress_statistics=dq)
        q = jq4(w_j, qt, 64, dq)
        # same bytes as bnb (bit-exact), so both dequantize the same weight to the same values
        assert np.array_equal(np.asarray(q.packed), p.numpy())
        same(jdq(q), F.dequantize_4bit(p, st), by_value=qt == "fp4")
        dj, db = paired_medians(
            lambda q=q: jdq(q).block_until_ready(), lambda p=p, st=st: F.dequantize_4bit(p, st), args.repeats
        )
        qj, qb = paired_medians(
            lambda qt=qt, dq=dq: jq4(w_j, qt, 64, dq).packed.block_until_ready(),
            lambda qt=qt, dq=dq: F.quantize_4bit(w_t, blocksize=64, quant_type=qt, compress_statistics=dq),
            3,
        )
        rows.append((name, dj, db, qj, qb))

    print(
        f"{n}x{n} {args.dtype}, blocksize 64, CPU threads: torch {torch.get_num_threads()}, "
        f"host cores {os.cpu_count()}, jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"allocator: glibc {args.allocator}, 4-bit dequantize: {_dequant_path()}"
    )
    print(
        "| format | dequantize JAX ms | dequantize bnb ms | bnb/JAX "
        "| quantize JAX ms | quantize bnb ms | bnb/JAX |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, dj, db, qj, qb in rows:
        print(f"| {name} | {dj:.1f} | {db:.1f} | {db / dj:.2f} | {qj:.1f} | {qb:.1f} | {qb / qj:.2f} |")


if __name__ == "__main__":
    main()
