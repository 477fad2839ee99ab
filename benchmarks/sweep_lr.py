"""Learning-rate sweep for OFT on a real model: held-out loss after N steps, for each peak rate.

The setup is ``oftjax train --model DIR --data pydoc-chat`` with its defaults for a pretrained checkpoint
(``oftjax.default_job.REAL_MODEL``: batch, sequence length; NF4 + double quantization, OFT block size 32 on
all seven projections, Cayley-Neumann, AdamW without weight decay, gradient clipping at 1.0, 5% linear warmup
then cosine to a tenth, float32, the CPU kernels on): SmolLM2-135M-Instruct (``python -m
interop.real_model``) on the packaged chat set from the Python reference (223 training conversations, 37
held-out ones on other topics), one example per row. Every rate starts from the same adapter
initialization and sees the same batches in the same order.

One compilation serves every rate: the step's optimizer is ``clip -> AdamW(the schedule with peak 1) ->
scale(peak)``, with the peak an optimizer-state value (``optax.inject_hyperparams``) set before each run.
With no weight decay this is the update of ``AdamW(schedule with that peak)`` (the same products in another
order), so each row is what ``oftjax train --lr RATE --steps N`` trains.

Reported per rate: the mean training loss over the first and last 5 steps, the held-out loss after N steps
(every eval example: all full batches of the eval set), its change from the held-out loss before training,
and whether ``oftjax train``'s divergence guard (``oftjax.train.fit``) would have stopped the run.

Usage: python benchmarks/sweep_lr.py [--model DIR] [--lrs 3e-5,1e-4,3e-4,1e-3,3e-3,1e-2] [--steps 20]
       [--malloc keep|default] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _data(path: Path, a: argparse.Namespace):
    from oftjax.chat_data import ChatTokenizer, load_chat_data, pydoc_chat_paths
    from oftjax.data import padded_rows

    tok = ChatTokenizer.from_checkpoint(path)
    sets = {}
    for name in ("train", "eval"):
        loaded = load_chat_data(pydoc_chat_paths()[name], tok, seq_len=a.seq)
        print(f"data: {name}: {loaded.report.summary()}")
        sets[name] = padded_rows(loaded.examples, a.seq, tok.pad_id)
    return sets["train"], sets["eval"]


def _trainer(path: Path, a: argparse.Namespace):
    """The model as ``oftjax train`` builds it, and a Trainer whose peak rate is a state value."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from interop.hf_model import load_model
    from oftjax.config import OFTConfig
    from oftjax.surgery import apply_oft
    from oftjax.train import TrainConfig, Trainer, make_schedule, quantize_model

    model = load_model(path, dtype="float32")
    quantize_model(model, "nf4", double_quant=True, compute_dtype=jnp.float32)
    apply_oft(model, OFTConfig(r=0, oft_block_size=32, target_modules=list(TARGETS)), rngs=nnx.Rngs(0))
    cfg = TrainConfig(steps=a.steps, learning_rate=1.0, batch_size=a.batch, seq_len=a.seq, max_grad_norm=1.0)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(make_schedule(cfg), weight_decay=0.0),
        optax.inject_hyperparams(optax.scale)(step_size=1.0),
    )
    return Trainer(model, cfg, tx=tx), cfg


def _with_peak(state, lr: float):
    """A copy of the initial (model, optimizer) state with the peak rate set to ``lr``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    flat = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        if path[-1] == "step_size":
            value = jnp.asarray(lr, value.dtype)
        fresh = jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else jnp.asarray(x), value)
        flat.append((path, var.replace(fresh)))  # fresh buffers: the step donates its state
    return nnx.from_flat_state(flat)


def _run(trainer, initial, lr: float, train, evals, a: argparse.Namespace) -> dict:
    import numpy as np

    from oftjax.train import batch_at
    from oftjax.train._loop import TrainingDiverged, _Guard

    trainer.load_state(_with_peak(initial, lr))
    guard, diverged, losses = _Guard(2.0), None, []
    t0 = time.perf_counter()
    for step in range(a.steps):
        metrics = trainer.train_step(batch_at(train, step, a.batch, seed=0))
        losses.append(float(metrics["loss"]))
        try:
            guard.check([{"step": step + 1, "loss": losses[-1]}])
        except TrainingDiverged as e:
            diverged = diverged or e.step  # the guard would stop here; keep going to show the trend
    k = min(5, len(losses))
    after = trainer.eval_loss(evals)
    return {
        "lr": lr,
        "train_first": float(np.mean(losses[:k])),
        "train_last": float(np.mean(losses[-k:])),
        "eval_after": after if math.isfinite(after) else float("nan"),
        "diverged_at": diverged,
        "seconds": time.perf_counter() - t0,
        "losses": losses,
    }


def main(argv: list[str] | None = None) -> int:
    from oftjax import default_job as dj

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="default: the real SmolLM2 (interop.real_model)")
    p.add_argument("--lrs", default="3e-5,1e-4,3e-4,1e-3,3e-3,1e-2")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=dj.REAL_MODEL["batch_size"])
    p.add_argument("--seq", type=int, default=dj.REAL_MODEL["seq_len"])
    p.add_argument("--json", type=Path, default=None, help="also write the results here (after every rate)")
    p.add_argument(
        "--malloc",
        choices=["keep", "default"],
        default="keep",
        help="keep: glibc keeps freed memory (as `oftjax train`; faster steps, but the heap can grow well "
        "past the step's peak, see benchmarks/RESULTS.md); default: glibc as configured (the losses are "
        "the same either way) (default: %(default)s)",
    )
    a = p.parse_args(argv)
    if a.malloc == "keep":
        from oftjax.cli import keep_freed_memory

        keep_freed_memory()
    from oftjax import cpu_kernels

    cpu_kernels.enable()
    import jax

    from interop.real_model import build_smollm2
    from oftjax.train import eval_batches

    t0 = time.perf_counter()
    path = a.model or build_smollm2()
    train, held_out = _data(path, a)
    trainer, cfg = _trainer(path, a)
    evals = eval_batches(held_out, dataclasses.replace(cfg, eval_batches=len(held_out)))
    initial = jax.device_get(trainer.state)
    before = trainer.eval_loss(evals)
    print(f"{path}: batch {a.batch} x {a.seq}, {a.steps} steps per rate; eval loss before {before:.4f}")
    head = f"| {'peak lr':>8} | {'train loss, first 5 -> last 5':>29} | {'eval after':>10} | {'change':>7} |"
    print(head + " guard | seconds |")
    print(f"|{'-' * 10}|{'-' * 31}|{'-' * 12}|{'-' * 9}|-------|---------|", flush=True)
    rows = []
    for lr in a.lrs.split(","):
        # each row as soon as its rate is done (a sweep takes long on a busy CPU; a stopped run keeps them)
        rows.append(_run(trainer, initial, float(lr), train, evals, a))
        _print_row(rows[-1], before)
        if a.json:
            _write_json(a.json, {"eval_before": before, "rows": rows})
    best = min((r for r in rows if math.isfinite(r["eval_after"])), key=lambda r: r["eval_after"])
    print(f"best: {best['lr']:g} (eval {before:.4f} -> {best['eval_after']:.4f})")
    print(
        f"{time.perf_counter() - t0:.0f} s in all; 1-min load average {os.getloadavg()[0]:.2f} "
        f"({os.cpu_count()} CPUs)"
    )
    return 0


def _print_row(r: dict, before: float) -> None:
    guard = f"step {r['diverged_at']}" if r["diverged_at"] else "ok"
    print(
        f"| {r['lr']:>8.0e} | {r['train_first']:>14.3f} -> {r['train_last']:<11.3f} | "
        f"{r['eval_after']:>10.4f} | {r['eval_after'] - before:>+7.3f} | {guard:<5} | {r['seconds']:>7.0f} |",
        flush=True,
    )


def _write_json(path: Path, results: dict) -> None:
    """``results`` as JSON, atomically (a temporary sibling renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
