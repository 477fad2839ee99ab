"""Chat examples in a train step: one example per row (padded), packed rows, or padding per batch.

Which way of putting variable-length examples into a ``[batch, seq]`` step trains fastest on a real model?
Measured on SmolLM2-135M-Instruct (the checkpoint of ``interop/real_model.py``; ``--model`` another) with the
packaged pydoc chat set, NF4 + double quantization, OFT (block size 32, all seven projections), float32, the
CPU kernels on and glibc keeping freed memory, as ``oftjax train`` runs on a CPU. The token budget is the same
for all three: ``--batch`` rows of ``--seq`` positions per step.

* **padded**: one example per row, right-padded to ``--seq`` (``oftjax.data.padded_rows``). Causal attention
  alone keeps examples apart, so the attention is the causal fast path (the attention kernel).
* **packed**: whole examples placed in rows (``oftjax.data.pack_examples``), kept apart by the
  ``[batch, seq, seq]`` mask of ``oftjax.models.segment_mask`` with positions restarting per example: almost
  no padding, but the masked attention path (the full score matrix, no kernel).
* **per-batch**: ``--batch`` random examples padded to the longest of them rounded up to a multiple of 64:
  less padding than ``padded`` and the causal fast path, but one compilation per distinct length.

Every kind's step is compiled first (not timed); then ``--steps`` rounds run one step of each kind in turn
(the same machine load for all), on batches drawn from the set (padded and per-batch draw the same examples).
tokens/s counts the real tokens of a kind's batches (not padding) over their wall time, loss tokens/s the
tokens in the loss (the assistant's answers: what training learns from); the ratio is the median over rounds
of a kind's loss tokens/s over the first kind's in the same round.

Usage: python benchmarks/bench_batching.py [--model DIR] [--seq 512 --batch 4 --steps 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BUCKET = 64


def _model(path, a):
    import jax.numpy as jnp
    from flax import nnx

    from interop.hf_model import load_model
    from oftjax.config import OFTConfig
    from oftjax.surgery import apply_oft
    from oftjax.train import TrainConfig, Trainer, quantize_model

    model = load_model(path, dtype="float32")
    quantize_model(model, "nf4", double_quant=True, compute_dtype=jnp.float32)
    apply_oft(model, OFTConfig(r=0, oft_block_size=32, target_modules=list(TARGETS)), rngs=nnx.Rngs(0))
    cfg = TrainConfig(steps=1000, learning_rate=1e-4, batch_size=a.batch, seq_len=a.seq)
    return Trainer(model, cfg)


def _batches(kind: str, examples, a, pad_id: int, rng) -> list[tuple[dict, int]]:
    """``--steps`` batches of one kind (with the extra keys the model call takes) and their real tokens
    (positions holding an example's token, not padding)."""
    import numpy as np

    from oftjax.data import pack_examples, padded_rows

    lengths = np.array([min(e.input_ids.size, a.seq) for e in examples])
    out = []
    if kind == "padded":
        rows = padded_rows(examples, a.seq, pad_id)
        for _ in range(a.steps):
            idx = rng.choice(len(rows), a.batch, replace=False)
            batch = {"input_ids": rows.input_ids[idx], "loss_mask": rows.loss_mask[idx]}
            out.append((batch, int(lengths[idx].sum())))
    elif kind == "packed":
        rows, seg = pack_examples(examples, a.seq, pad_id)
        for _ in range(a.steps):
            idx = rng.choice(len(rows), a.batch, replace=False)
            # as `oftjax train --batching packed`: the step makes the mask and positions from the ids
            batch = {k: a[idx] for k, a in rows.arrays().items()}
            out.append((batch, int((seg[idx] > 0).sum())))
    else:
        for _ in range(a.steps):
            idx = rng.choice(len(examples), a.batch, replace=False)
            width = min(a.seq, -(-int(lengths[idx].max()) // BUCKET) * BUCKET)
            rows = padded_rows([examples[i] for i in idx], width, pad_id)
            out.append(({"input_ids": rows.input_ids, "loss_mask": rows.loss_mask}, int(lengths[idx].sum())))
    return out


def _compile(trainer, batches: list[dict]) -> None:
    """One untimed step per distinct batch signature (its compilation)."""
    seen = set()
    for b in batches:
        key = (b["input_ids"].shape, tuple(sorted(b)))
        if key not in seen:
            seen.add(key)
            float(trainer.train_step(b)["loss"])


def _time_alternating(trainer, by_kind: dict[str, list[dict]], steps: int) -> dict[str, list[float]]:
    """Per-step wall times of every kind, in rounds of one step per kind (all compiled beforehand), so that
    each kind sees the same machine load (this CPU is shared: kinds timed one after the other measured the
    load as much as the layout)."""
    for batches in by_kind.values():
        _compile(trainer, batches)
    times: dict[str, list[float]] = {kind: [] for kind in by_kind}
    for i in range(steps):
        for kind, batches in by_kind.items():
            t = time.perf_counter()
            float(trainer.train_step(batches[i])["loss"])
            times[kind].append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint dir (default: the real SmolLM2 fixture)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--kinds", default="padded,packed,per-batch")
    a = p.parse_args(argv)
    from oftjax.cli import keep_freed_memory

    malloc = keep_freed_memory()
    from oftjax import cpu_kernels

    cpu_kernels.enable()
    import numpy as np

    from interop.real_model import build_smollm2
    from oftjax.chat_data import ChatTokenizer, load_chat_data, pydoc_chat_paths

    path = a.model or build_smollm2()
    tok = ChatTokenizer.from_checkpoint(path)
    examples = load_chat_data(pydoc_chat_paths()["train"], tok, seq_len=a.seq).examples
    trainer = _model(path, a)
    load0 = os.getloadavg()[0]
    kinds = a.kinds.split(",")
    pairs = {k: _batches(k, examples, a, tok.pad_id, np.random.default_rng(0)) for k in kinds}
    batches = {k: [b for b, _ in v] for k, v in pairs.items()}
    times = _time_alternating(trainer, batches, a.steps)
    print(f"{path}: {len(examples)} examples, seq {a.seq}, batch {a.batch}; {malloc}; CPU kernels on")
    print(f"{a.steps} rounds of one step per layout; ratio: median over rounds of (layout's loss tokens/s)")
    print("/ (first layout's loss tokens/s) in that round")
    print(
        f"| {'layout':<10} | {'real tokens/step':>16} | {'step s, median':>15} | {'tokens/s':>9} | "
        f"{'loss tokens/s':>15} | {'ratio':>5} | shapes |"
    )
    print(f"|{'-' * 12}|{'-' * 18}|{'-' * 17}|{'-' * 11}|{'-' * 17}|{'-' * 7}|--------|")
    in_loss = {k: [int(b["loss_mask"].sum()) for b in v] for k, v in batches.items()}
    rate = {k: [n / t for n, t in zip(in_loss[k], times[k], strict=True)] for k in kinds}
    for kind in kinds:
        real = [n for _, n in pairs[kind]]
        ratio = statistics.median(r / r0 for r, r0 in zip(rate[kind], rate[kinds[0]], strict=True))
        shapes = len({b["input_ids"].shape for b in batches[kind]})
        print(
            f"| {kind:<10} | {statistics.mean(real):>16,.0f} | {statistics.median(times[kind]):>15.2f} | "
            f"{sum(real) / sum(times[kind]):>9,.0f} | {sum(in_loss[kind]) / sum(times[kind]):>15,.0f} | "
            f"{ratio:>5.2f} | {shapes:>6} |"
        )
    print(f"1-min load average {load0:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
