"""Jitted oftjax.quant vs bitsandbytes on the CPU: dequantize and quantize a 4096 x 4096 weight.

Usage: python benchmarks/bench_quant.py [--size 4096] [--dtype bfloat16] [--repeats 10]

bitsandbytes runs its real CPU kernels (its AVX512 4-bit dequantize included; the oracle's dequant fix is
*not* installed here). Times are medians over ``--repeats`` runs after a warm-up (compilation excluded);
"bnb/JAX" > 1 means JAX is faster. Both sides use the same CPU threads, so on a shared machine the absolute
numbers move; the ratio is what to read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from oftjax import quant


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: compilation / kernel caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    import bitsandbytes.functional as F  # noqa: N812 - bnb's own alias
    import ml_dtypes
    import torch

    n = args.size
    w_np = (np.random.default_rng(0).standard_normal((n, n)) * 0.02).astype(np.float32)
    w_t = torch.from_numpy(w_np).to(getattr(torch, args.dtype))
    w_j = jnp.asarray(w_np).astype(getattr(jnp, args.dtype))

    jq4 = jax.jit(quant.quantize_4bit, static_argnums=(1, 2, 3))
    jq8 = jax.jit(quant.quantize_int8)
    jdq = jax.jit(quant.dequantize)
    rows = []

    # int8 (LLM.int8 row-wise): bnb quantizes the fp16-cast weight, dequantizes with int8_vectorwise_dequant
    w16 = w_t.to(torch.float16)
    cb, scb, _ = F.int8_vectorwise_quant(w16)
    q8 = jq8(w_j)
    rows.append(
        (
            "int8",
            median_ms(lambda: jdq(q8).block_until_ready(), args.repeats),
            median_ms(lambda: F.int8_vectorwise_dequant(cb, scb).to(w_t.dtype), args.repeats),
            median_ms(lambda: jq8(w_j).CB.block_until_ready(), args.repeats),
            median_ms(lambda: F.int8_vectorwise_quant(w_t.to(torch.float16)), args.repeats),
        )
    )
    for name, qt, dq in (("nf4", "nf4", False), ("fp4", "fp4", False), ("nf4+DQ", "nf4", True)):
        p, st = F.quantize_4bit(w_t, blocksize=64, quant_type=qt, compress_statistics=dq)
        q = jq4(w_j, qt, 64, dq)
        # same bytes as bnb (bit-exact), so both dequantize the same weight
        assert np.array_equal(np.asarray(q.packed), p.numpy())
        rows.append(
            (
                name,
                median_ms(lambda q=q: jdq(q).block_until_ready(), args.repeats),
                median_ms(lambda p=p, st=st: F.dequantize_4bit(p, st), args.repeats),
                median_ms(lambda qt=qt, dq=dq: jq4(w_j, qt, 64, dq).packed.block_until_ready(), args.repeats),
                median_ms(
                    lambda qt=qt, dq=dq: F.quantize_4bit(
                        w_t, blocksize=64, quant_type=qt, compress_statistics=dq
                    ),
                    3,
                ),
            )
        )
    del ml_dtypes

    print(
        f"{n}x{n} {args.dtype}, blocksize 64, CPU threads: torch {torch.get_num_threads()}, "
        f"host cores {os.cpu_count()}, jax {jax.__version__} on {jax.devices()[0].platform}"
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
