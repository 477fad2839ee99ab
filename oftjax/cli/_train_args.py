"""``oftjax train`` arguments: the parser. Validation (``validate``, ``fail``, ``parse_mesh``) is
``oftjax/cli/_validate.py``, the run directory's overwrite/resume policy (``prepare_output``, ``RESUME_KEYS``)
``oftjax/cli/_run_dir.py``; both are re-exported here."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from oftjax import default_job as dj
from oftjax.cli._run_dir import NOT_RESUME_KEYS as NOT_RESUME_KEYS
from oftjax.cli._run_dir import RESUME_KEYS as RESUME_KEYS
from oftjax.cli._run_dir import RUN_OUTPUTS as RUN_OUTPUTS
from oftjax.cli._run_dir import discard_failed_start as discard_failed_start
from oftjax.cli._run_dir import prepare_output as prepare_output
from oftjax.cli._run_dir import record as record
from oftjax.cli._validate import fail as fail
from oftjax.cli._validate import parse_mesh as parse_mesh
from oftjax.cli._validate import validate as validate

__all__ = [
    "NOT_RESUME_KEYS",
    "RESUME_KEYS",
    "RUN_OUTPUTS",
    "add_train_parser",
    "discard_failed_start",
    "fail",
    "join_processes",
    "parse_mesh",
    "prepare_output",
    "validate",
]


def add_train_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``train`` subcommand: its argument groups and the function that runs it."""
    p = sub.add_parser(
        "train",
        help="fine-tune with (quantized) OFT; with no arguments, the embedded default job",
        description=(
            "Fine-tune a Llama-family HF checkpoint with OFT in JAX and write a PEFT adapter. Without "
            "--model, a small Llama is pretrained on the Python standard library's sources (cached in "
            "OUTPUT/base), quantized to NF4 with double quantization and fine-tuned with OFT on another "
            "slice of the text."
        ),
    )
    _model_arguments(p.add_argument_group("model and adapter"))
    _runtime_arguments(p.add_argument_group("runtime"))
    _process_arguments(
        p.add_argument_group("multi-process (jax.distributed; every process runs the same command)")
    )
    _data_arguments(p.add_argument_group("data"))
    _optimization_arguments(p.add_argument_group("optimization"))
    _output_arguments(p.add_argument_group("output"))
    p.set_defaults(func=_run)
    return p


def _model_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--model",
        type=Path,
        help="HF checkpoint dir (float, bnb 8-bit or 4-bit), or a Hub id (org/name) already in the local "
        "Hugging Face cache (HF_HUB_CACHE; nothing is downloaded); default: the embedded small Llama, "
        "pretrained on first use",
    )
    g.add_argument(
        "--strict-config",
        action="store_true",
        help="refuse config.json keys oftjax does not know (default: accept them with one warning; keys "
        "that change math oftjax lacks are always refused)",
    )
    g.add_argument(
        "--quant",
        choices=("nf4", "fp4", "int8", "none"),
        default=None,
        help="quantize a float checkpoint's linears (default nf4; a bnb checkpoint keeps its format)",
    )
    g.add_argument(
        "--no-double-quant",
        dest="double_quant",
        action="store_false",
        help="4-bit without double quantization of the absmax statistics",
    )
    g.add_argument(
        "--target-modules",
        default=",".join(dj.TARGET_MODULES),
        help="comma-separated module names (PEFT target_modules) (default: %(default)s)",
    )
    g.add_argument("--oft-block-size", type=int, default=dj.OFT_BLOCK_SIZE, help="default: %(default)s")
    g.add_argument(
        "--cayley",
        choices=("neumann", "exact"),
        default="neumann",
        help="rotation parameterization: PEFT's default Cayley-Neumann series or the exact Cayley map",
    )
    g.add_argument(
        "--pretrain-steps",
        type=int,
        default=dj.PRETRAIN["steps"],
        help="pretraining steps of the embedded default model (default: %(default)s)",
    )


def _runtime_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="float weights and activations (trainable rotations, loss and optimizer stay float32); a bf16 "
        "checkpoint is widened exactly. float32 by default: XLA:CPU has no native bfloat16 matmul and "
        "converts around every bf16 operation, so bfloat16 runs slower than float32 on a CPU; on a GPU or "
        "TPU it is faster and halves activation memory (default: %(default)s)",
    )
    g.add_argument("--bf16", dest="dtype", action="store_const", const="bfloat16", help="--dtype bfloat16")
    g.add_argument("--remat", action="store_true", help="rematerialize decoder layers in the backward pass")
    g.add_argument(
        "--malloc",
        choices=["cache", "keep", "default"],
        default=None,
        help="how freed memory is reused on CPU. cache: `oftjax` starts again with its block cache "
        "preloaded, which keeps freed blocks of 32 MiB and more mapped for reuse, so XLA:CPU's per-step "
        "buffers are not faulted in again every step, within the most memory ever in use at once; "
        "JAX then runs CPU programs synchronously (one step buffer at a time); keep: glibc keeps all freed "
        "memory in one heap (its peak grows as the heap fragments); default: glibc as configured. Default: "
        "cache with --model, default for the embedded model (short steps, small buffers; see "
        'benchmarks/RESULTS.md, "Allocator", and docs/cpu-memory.md)',
    )
    g.add_argument(
        "--cpu-kernels",
        choices=("on", "off"),
        default=None,
        help="on: the opt-in C++ CPU kernels (oftjax.cpu_kernels: OFT rotations, 4-bit dequantization, "
        "attention, SwiGLU) replace their pure-JAX formulations for this run; results agree to float32 "
        "rounding (so a run resumes only with the same setting); they run only where JAX computes on the "
        "CPU (default: on when JAX's default backend is the CPU, else off)",
    )
    g.add_argument(
        "--mesh",
        default=None,
        metavar="DATAxFSDP",
        help="device mesh, e.g. 1x8 (FSDP over 8 devices) or 8x1; default: one device",
    )


def _process_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="join a multi-process run: process 0 serves jax.distributed's coordination service at "
        "HOST:PORT (give with --num-processes and --process-id); the mesh spans every process's devices "
        "(default --mesh: data parallel over all of them) and process 0 writes the outputs",
    )
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. N-1")
    g.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run described by the environment jax.distributed detects (SLURM, "
        "Open MPI, TPU pod slices); explicit flags above override it",
    )
    g.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=60,
        metavar="SECONDS",
        help="a process silent this long counts as dead: the others stop with an error (default: "
        "%(default)s)",
    )


def join_processes(args: argparse.Namespace) -> None:
    """Join the multi-process run the flags ask for (before anything touches a JAX device).

    Processes other than 0 run ``--quiet``: process 0 prints and writes for the run.
    """
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(v is None for v in explicit):
        return
    if not args.distributed and any(v is None for v in explicit):
        fail("--coordinator, --num-processes and --process-id go together (or --distributed alone)")
    if args.num_processes is not None and args.num_processes < 1:
        fail(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.process_id is not None and not 0 <= args.process_id < (args.num_processes or args.process_id + 1):
        fail(f"--process-id must be in 0 .. {(args.num_processes or 1) - 1}, got {args.process_id}")
    if args.heartbeat_timeout < 1:
        fail(f"--heartbeat-timeout must be >= 1 second, got {args.heartbeat_timeout}")
    if args.model is None and not (args.output / "base" / "config.json").is_file():
        fail(
            "a multi-process run needs --model (or the default base in OUTPUT/base, which a "
            "single-process `oftjax train` pretrains)"
        )
    from oftjax.train import initialize, is_primary

    try:
        initialize(
            args.coordinator, args.num_processes, args.process_id, heartbeat_timeout=args.heartbeat_timeout
        )
    except (RuntimeError, ValueError) as e:
        fail(f"cannot join the multi-process run: {str(e).strip().splitlines()[0]}")
    if not is_primary():
        args.quiet = True


def _data_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--data",
        type=Path,
        help="JSONL / JSON rows ({'messages': [...]} chats rendered with the checkpoint's chat template, "
        "{'prompt', 'completion'} or {'text'}; a file or a folder of them), or raw text (a text file or a "
        "folder of text files); 'pydoc-chat': the chat set that ships with oftjax (with its eval set) "
        "(default: the Python standard library's sources)",
    )
    g.add_argument(
        "--eval-data",
        type=Path,
        default=None,
        help="held-out rows or text, the same kind as --data (default: --eval-fraction of --data)",
    )
    g.add_argument(
        "--loss-on",
        choices=("assistant", "all"),
        default="assistant",
        help="rows: train on the assistant's answers (and completions) only, or on every token "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--batching",
        choices=("per-batch", "packed", "padded"),
        default="per-batch",
        help="rows: one example per row, each batch cut to its longest example rounded up to 64 tokens "
        "(per-batch: the same loss as padded, one compilation per width), padded to --seq-len (padded), or "
        "whole examples packed into each row, kept apart by an attention mask with positions restarting per "
        "example (packed). Per-batch trained the most loss tokens per second on SmolLM2 (benchmarks/"
        "RESULTS.md; default: %(default)s). Held-out rows are one example per row, cut as per-batch",
    )
    g.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="drop bad rows (listed with file:line and reason, and counted) instead of stopping at the first",
    )
    g.add_argument("--max-data-bytes", type=int, default=dj.DATA_BYTES, help="default: %(default)s")
    g.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per row; longer examples are truncated and counted (default: "
        f"{dj.FINETUNE['seq_len']}, with --model {dj.REAL_MODEL['seq_len']})",
    )
    g.add_argument("--eval-fraction", type=float, default=0.05, help="held-out rows (default: %(default)s)")
    g.add_argument(
        "--eval-batches",
        type=int,
        default=16,
        help="batches of held-out rows per evaluation, at most (default: %(default)s)",
    )


def _optimization_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"default: {dj.FINETUNE['steps']}, with --model {dj.REAL_MODEL['steps']}",
    )
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"peak AdamW learning rate (default: {dj.FINETUNE['learning_rate']:g} for the embedded model, "
        f"{dj.REAL_MODEL['learning_rate']:g} with --model: benchmarks/RESULTS.md has the sweep)",
    )
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --steps")
    g.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"default: {dj.FINETUNE['batch_size']}, with --model {dj.REAL_MODEL['batch_size']}",
    )
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)


def _output_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--output", type=Path, default=Path(dj.DEFAULT_OUTPUT), help="run dir (default: %(default)s)"
    )
    g.add_argument(
        "--save-every", type=int, default=50, help="checkpoint every N steps (default: %(default)s)"
    )
    g.add_argument("--eval-every", type=int, default=25, help="default: %(default)s")
    g.add_argument(
        "--log-every",
        type=int,
        default=10,
        help="read the metrics from the device every N steps (metrics.jsonl keeps one line per step, and "
        "training never waits for the device in between; 0: only at evaluations, checkpoints and the end) "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--resume", action="store_true", help="continue the run in --output from its last checkpoint"
    )
    g.add_argument(
        "--force",
        action="store_true",
        help="start over in a non-empty --output (removes only oftjax's own outputs there)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _run(args: argparse.Namespace) -> int:
    from oftjax.cli._train import run_train

    return run_train(args)
