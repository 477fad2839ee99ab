"""``oftjax train``'s run directory: what it may hold, the new / ``--resume`` / ``--force`` policy.

A resumed run must match every setting that changes its result (``RESUME_KEYS``; the others are
``NOT_RESUME_KEYS``), checked against the ``run.json`` the run wrote (atomically) when it started. The
temporaries an interrupted run left are removed at the next start; a run that fails before its first
checkpoint takes back the ``run.json`` it wrote (``discard_failed_start``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

from oftjax.cli._validate import fail

__all__ = [
    "NOT_RESUME_KEYS",
    "RESUME_KEYS",
    "RUN_OUTPUTS",
    "discard_failed_start",
    "prepare_output",
    "record",
]

# What a run directory may contain; --force removes only these (never other files).
RUN_OUTPUTS = (
    "adapter",
    "checkpoints",
    "metrics.jsonl",
    "loss.png",
    "run.json",
    "summary.json",
    "base",
    "pretrain",
    "samples.md",
    "samples.jsonl",
)
# Settings that must not change when a run is resumed: everything that changes its result (the trained
# adapter), float rounding included (--cpu-kernels, --mesh, --remat).
RESUME_KEYS = (
    "model",
    "quant",
    "double_quant",
    "target_modules",
    "oft_block_size",
    "cayley",
    "pretrain_steps",
    "batch_size",
    "seq_len",
    "grad_accum",
    "lr",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "steps",
    "seed",
    "data",
    "max_data_bytes",
    "eval_fraction",
    "cpu_kernels",
    "mesh",
    "remat",
    *("dtype", "loss_on", "eval_data", "skip_bad_rows", "batching"),
)
# The other arguments, and why a resumed run may change them: how the run is watched, written and joined.
NOT_RESUME_KEYS = (
    "output",  # where the run is
    "resume",
    "force",
    "quiet",
    "malloc",  # allocator behaviour: speed and memory, not values
    "strict_config",  # whether unknown config keys are refused, not what they mean
    "log_every",  # when metrics reach the host
    "eval_every",  # evaluations read the model, never change it
    "eval_batches",
    "save_every",  # checkpoints store the state; a resumed run starts from one
    *("samples", "sample_tokens"),  # samples.md: answers generated, never trained on
    *("coordinator", "num_processes", "process_id", "distributed", "heartbeat_timeout"),
)


def record(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k in RESUME_KEYS}


def prepare_output(args: argparse.Namespace) -> None:
    """Apply the run directory's policy (new, ``--resume`` or ``--force``) and write ``run.json``.

    Leftovers of an interrupted run (temporaries of oftjax's outputs) are removed first. Resuming checks
    every ``RESUME_KEYS`` setting against ``run.json``; without a readable ``run.json`` a run that has a
    checkpoint is not resumed (its settings cannot be checked).
    """
    out: Path = args.output
    if args.resume and args.force:
        fail("--resume and --force exclude each other")
    if out.exists() and not out.is_dir():
        fail(f"{out}: exists and is not a directory")
    _clean_leftovers(out)
    nonempty = out.is_dir() and any(out.iterdir())
    if nonempty and args.resume:
        _check_resume(args, out)
    elif nonempty and args.force:
        for name in RUN_OUTPUTS:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif os.path.lexists(target):
                target.unlink()
    elif nonempty:
        fail(f"{out}: exists and is not empty; pass --resume to continue that run or --force to start over")
    created = not out.exists()
    had_record = (out / "run.json").is_file()
    out.mkdir(parents=True, exist_ok=True)
    from interop._io import atomic_write_json

    atomic_write_json(out / "run.json", record(args), force=True)
    args._fresh_start = {"created_dir": created, "wrote_record": not had_record}


def _clean_leftovers(out: Path) -> None:
    """Remove the temporaries (``.adapter.*.tmp``, ``.run.json.*``, ...) an interrupted run left beside its
    outputs; ``.NAME.old`` (a replaced output) comes back as ``NAME`` when ``NAME`` is missing. Nothing else
    is touched (``checkpoints/`` keeps its own)."""
    if not out.is_dir():
        return
    names = "|".join(re.escape(n) for n in RUN_OUTPUTS)
    temporary = re.compile(rf"^\.({names})\.(.+)$")
    for entry in sorted(out.iterdir()):
        m = temporary.match(entry.name)
        if m is None:
            continue
        if m.group(2) == "old" and not os.path.lexists(out / m.group(1)):
            os.replace(entry, out / m.group(1))
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _check_resume(args: argparse.Namespace, out: Path) -> None:
    from oftjax.train import latest_checkpoint

    run_json = out / "run.json"
    how = "restore it from the run's start, or start over with --force"
    if not run_json.exists():
        if latest_checkpoint(out) is not None:
            fail(f"{run_json}: missing, so the run's settings cannot be checked against these; {how}")
        return
    try:
        before = json.loads(run_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())
        fail(f"{run_json}: unreadable ({reason}), so the run's settings cannot be checked; {how}")
    if not isinstance(before, dict):
        fail(f"{run_json}: not a JSON object, so the run's settings cannot be checked; {how}")
    now = record(args)
    diff = sorted(k for k in RESUME_KEYS if before.get(k) != now.get(k))
    if diff:
        fail(f"{out}: cannot resume with changed settings {diff} (was { {k: before.get(k) for k in diff} })")


def discard_failed_start(args: argparse.Namespace) -> None:
    """After a failed run: remove the ``run.json`` this invocation wrote (and the directory it created,
    when empty), unless the run got as far as a checkpoint (which ``--resume`` continues)."""
    fresh = getattr(args, "_fresh_start", None)
    if not fresh:
        return
    from oftjax.train import latest_checkpoint

    out: Path = args.output
    if latest_checkpoint(out) is not None:
        return
    if fresh["wrote_record"]:
        (out / "run.json").unlink(missing_ok=True)
    if fresh["created_dir"]:
        try:
            out.rmdir()
        except OSError:  # not empty: keep what the run wrote (e.g. a pretrained base)
            pass
