"""``oftjax train``'s arguments checked before any work: ``validate`` (and ``fail``, its one-line error).

Every argument is checked before anything is done or written (no pretraining, no ``run.json``, no directory
for a run that cannot start): numbers in range and finite, the output path, the data files (regular files
only: a FIFO would block the reader, ``/dev/zero`` never ends), the model's config.json, and the targets and
block size against the model built abstractly (``nnx.eval_shape``: no memory).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Any

from oftjax import default_job as dj

__all__ = ["check_parity_args", "fail", "parse_mesh", "validate"]


def fail(msg: str):
    from oftjax.cli import CLIError

    raise CLIError(msg)


def validate(args: argparse.Namespace) -> None:
    """Check every argument before any work (see the module docstring); ``fail`` names the first bad one."""
    _check_counts(args)
    _check_rates(args)
    _check_output(args)
    if args.batch_size % args.grad_accum:
        fail(f"--batch-size {args.batch_size} is not divisible by --grad-accum {args.grad_accum}")
    if args.model is not None and not (args.model / "config.json").is_file():
        fail(f"{args.model}: not an HF checkpoint directory (no config.json)")
    for flag, path in (("--data", args.data), ("--eval-data", getattr(args, "eval_data", None))):
        if path is not None:
            _check_data_files(flag, path)
    if not [m for m in args.target_modules.split(",") if m.strip()]:
        fail("--target-modules is empty")
    if args.mesh is not None:
        parse_mesh(args.mesh)
    _check_model_and_targets(args)
    if args.cpu_kernels is None:
        import jax

        args.cpu_kernels = "on" if jax.default_backend() == "cpu" else "off"


def _check_counts(args: argparse.Namespace) -> None:
    for name in ("steps", "pretrain_steps", "batch_size", "oft_block_size", "grad_accum", "max_data_bytes"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq_len < 2:
        fail(f"--seq-len must be >= 2 (a token and the next one it predicts), got {args.seq_len}")
    for name in ("log_every", "eval_every", "save_every"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        fail(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be in 0 .. 2**32 - 1, got {args.seed}")


def _check_rates(args: argparse.Namespace) -> None:
    """Finite, and in range: a NaN or negative rate trains to NaN or ascends the loss, silently."""
    for flag, value, ok, want in (
        ("--lr", args.lr, args.lr > 0, "> 0"),
        ("--weight-decay", args.weight_decay, args.weight_decay >= 0, ">= 0"),
        ("--max-grad-norm", args.max_grad_norm, args.max_grad_norm >= 0, ">= 0 (0: no clipping)"),
        ("--eval-fraction", args.eval_fraction, 0 <= args.eval_fraction < 1, "in [0, 1)"),
    ):
        if not (math.isfinite(value) and ok):
            fail(f"{flag} must be {want} and finite, got {value}")


def _check_output(args: argparse.Namespace) -> None:
    out = Path(args.output)
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            fail(f"--output {out}: {parent} exists and is not a directory")
        if parent.is_dir():
            break


def _check_data_files(flag: str, path: Path) -> None:
    """``path`` and the files under it are regular files (links followed), so reading them ends."""
    if not path.exists():
        fail(f"{path}: data path not found" if flag == "--data" else f"{path}: eval data path not found")
    files = [path]
    if path.is_dir():
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            files += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    for f in files:
        try:
            mode = os.stat(f).st_mode
        except OSError as e:
            fail(f"{flag} {f}: cannot read ({e.strerror})")
        if not stat.S_ISREG(mode):
            fail(f"{flag} {f}: not a regular file (a FIFO, device or socket would never end or block)")


def _check_model_and_targets(args: argparse.Namespace) -> None:
    """The model's config.json (or the default job's), and ``--target-modules`` / ``--oft-block-size``
    against its layers: ``apply_oft`` on the model built abstractly raises what it would raise on the real
    one."""
    from flax import nnx

    from oftjax.config import OFTConfig
    from oftjax.models import LlamaForCausalLM, ModelConfig
    from oftjax.surgery import apply_oft

    hf_config = dj.BASE_CONFIG if args.model is None else _read_config(args.model / "config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown keys: loading the model warns about them once
        config = ModelConfig.from_hf(hf_config, strict=getattr(args, "strict_config", False))
    targets = [m.strip() for m in args.target_modules.split(",") if m.strip()]

    def adapted() -> Any:
        model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
        oft = OFTConfig(r=0, oft_block_size=args.oft_block_size, target_modules=targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's "adjusted oft_block_size": apply_oft says it again
            apply_oft(model, oft, rngs=nnx.Rngs(0))
        return model

    try:
        nnx.eval_shape(adapted)
    except (TypeError, ValueError) as e:
        fail(f"--target-modules {args.target_modules} (--oft-block-size {args.oft_block_size}): {e}")


def _read_config(path: Path) -> dict:
    from interop._hf_config import check_model_config
    from interop._io import read_json

    config = read_json(path)
    check_model_config(config, where=str(path))
    return config


def parse_mesh(spec: str) -> tuple[int, int]:
    try:
        data, fsdp = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        fail(f"--mesh must look like DATAxFSDP (e.g. 2x4), got {spec!r}")
    import jax

    if data < 1 or fsdp < 1 or data * fsdp > jax.device_count():
        fail(f"--mesh {spec} needs {data * fsdp} devices; this host has {jax.device_count()}")
    return data, fsdp


def check_parity_args(args: argparse.Namespace) -> None:
    """``oftjax parity``: a torch device this machine has, and sequences the model's context holds (the
    attention of a longer one costs memory quadratic in its length, for a comparison that means nothing)."""
    device = args.device
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        fail(f"--device {device}: expected cpu, cuda or cuda:N")
    if device != "cpu":
        from interop.oracle import cuda_device_count

        count = cuda_device_count()
        if count == 0:
            fail(f"--device {device}: this torch sees no CUDA device (torch.cuda.is_available() is False)")
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            fail(f"--device {device}: this machine has {count} CUDA device(s)")
    from oftjax.models import ModelConfig

    config = _read_config(args.model / "config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown keys: loading the model warns about them once
        limit = ModelConfig.from_hf(config).max_position_embeddings
    if args.seq_len > limit:
        fail(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings {limit}")
