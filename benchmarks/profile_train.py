"""Where the JAX train step's time goes: XLA:CPU op times from a profiler trace, grouped by named scope.

The model and step are bench_train.py's (same flags). The step runs ``--steps`` times under
``jax.profiler.trace``; every executed op (an XLA thunk: a fusion, a dot, a custom call) is attributed to the
innermost label in its ``op_name`` metadata, which the code sets with ``jax.named_scope``:

  gemm         the frozen linears' matmuls (forward ``x W^T`` and input gradient ``g W``): the GEMM floor
  dequant      4-bit / int8 dequantization (``oftjax.quant``), forward and backward
  oft_rotate   applying rotations: ``x BD(R)`` (input path), ``W BD(R)^T`` (weight path), their gradients
               (with the CPU kernels: csrc/rotate.cc)
  oft_build    building rotation blocks from parameters (skew, Cayley-Neumann series) and their gradients
               (with the CPU kernels: one call per direction, csrc/rotate.cc)
  attention    scores, softmax, probabilities x values, forward and backward (with the CPU kernels: one fused
               kernel per direction, csrc/attention.cc, which also applies RoPE; pure JAX has a rope label)
  rope, rms_norm, swiglu, loss, optimizer: as named (swiglu with the CPU kernels: csrc/swiglu.cc)

``--cpu-kernels on`` (the default, as ``oftjax train`` runs on a CPU) or ``off`` (the pure-JAX library).
  other        everything else (residual adds, embedding, layout copies XLA put between labelled ops)

Op times are the sum over the threads that ran them (XLA:CPU runs independent ops concurrently, and a GEMM's
helper threads are not traced separately), so the column sums to more than the wall time; the shares are the
useful part. A fusion is labelled by its root op, so a label includes whatever XLA fused into it. Small ops
that overlap others (the rotation builds, for one) cost less wall time than their op time says: to measure a
part's wall cost, compare two compiled steps in one process with that part changed. Figures:
benchmarks/RESULTS.md.

Usage: python benchmarks/profile_train.py [--hidden 512 --layers 4 --seq 256 --batch 4 --steps 4]
       python benchmarks/profile_train.py --model DIR [--seq 256 --batch 4 --cpu-kernels on|off]
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402

LABELS = (
    "_dequantize",
    "gemm",
    "oft_build",
    "oft_rotate",
    "attention",
    "rope",
    "rms_norm",
    "swiglu",
    "loss",
    "optimizer",
)


def op_labels(hlo_text: str) -> dict[str, str]:
    """Instruction name -> label, from the compiled HLO's ``op_name`` metadata."""
    labels = {}
    for m in re.finditer(r"\n\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", hlo_text):
        name, op_name = m.groups()
        # the innermost scope wins: take the label that appears last in the op_name path
        best, pos = "other", -1
        for label in LABELS:
            i = op_name.rfind(label)
            if i > pos:
                best, pos = label, i
        labels.setdefault(name, "dequant" if best == "_dequantize" else best)
    return labels


def op_times(trace_dir: str, steps: int) -> dict[str, float]:
    """Op name -> milliseconds per step, summed over the XLA worker threads."""
    from jax.profiler import ProfileData

    path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
    times: dict[str, float] = collections.defaultdict(float)
    for plane in ProfileData.from_file(path).planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for ev in line.events:
                if ev.name.startswith(("ThunkExecutor", "Slinky", "Threadpool", "end:")):
                    continue
                times[ev.name] += ev.duration_ns / steps / 1e6
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench_train.add_shape_args(p, steps=4)
    p.add_argument("--cpu-kernels", choices=["on", "off"], default="on", help="oftjax's opt-in CPU kernels")
    a = p.parse_args(argv)
    bench_train.apply_model_shape(a)
    # what bench_train and `oftjax train` do: otherwise every step faults its temporary buffer in afresh, and
    # whichever op first writes a page (a dequantize, a swiglu) is charged for it
    from oftjax.cli import keep_freed_memory

    print(f"malloc: {keep_freed_memory()}; {bench_train.apply_cpu_kernels(a)}")

    import jax
    import numpy as np

    model = bench_train.jax_quantized_model(a)
    trainer, batch = bench_train.jax_trainer(model, a, np.random.default_rng(0))
    labels = op_labels(trainer._train.lower(trainer.state, jax.device_put(batch)).compile().as_text())

    def step() -> None:
        float(trainer.train_step(batch)["loss"])

    walls = []
    for i in range(a.steps + 2):
        t0 = time.perf_counter()
        step()
        if i >= 2:
            walls.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(a.steps):
                step()
        times = op_times(tmp, a.steps)

    by_label: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter[str] = collections.Counter()
    for name, ms in times.items():
        label = labels.get(name, "other")
        by_label[label] += ms
        count[label] += 1
    total = sum(by_label.values())
    print(
        f"train step, {f'{a.model}: ' if a.model else ''}Llama hidden {a.hidden} x {a.layers} layers, vocab "
        f"{a.vocab}, seq {a.seq}, batch {a.batch}: "
        f"wall {1e3 * statistics.median(walls):.0f} ms (median of {len(walls)}, untraced); "
        f"traced op time {total:.0f} ms/step over {len(times)} distinct ops"
    )
    print(f"| {'label':<12} | {'op ms/step':>10} | {'share':>6} | {'ops':>5} |")
    print(f"|{'-' * 14}|{'-' * 12}|{'-' * 8}|{'-' * 7}|")
    for label, ms in sorted(by_label.items(), key=lambda kv: -kv[1]):
        print(f"| {label:<12} | {ms:>10.1f} | {ms / total:>6.1%} | {count[label]:>5} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
