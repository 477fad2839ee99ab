"""``oftjax plan``: per-device memory of a QOFT training run, compiled ahead of time from abstract shapes.

The model is built from its config alone (``nnx.eval_shape``: no weights read, no device memory),
quantized and adapted as ``oftjax train`` would, laid out on a DATAxFSDP mesh, and the training step
``oftjax train`` runs is compiled for that mesh (``oftjax.train.plan_memory``). The table gives, per device,
the frozen packed weights, the frozen float weights, the rotations, the optimizer state, the batch, the
activations kept for the backward pass and XLA's other temporaries, against ``--device-memory``.

The step compiles for this host's devices when it has enough of them. Otherwise (a laptop planning for 8
GPUs) it compiles in a subprocess for simulated CPU devices (``--xla_force_host_platform_device_count``):
the state and batch figures are the same on every backend; the temporaries are XLA:CPU's, which keeps
more than a GPU does (benchmarks/RESULTS.md, "Memory planner", says how they compare). Exit status: 0, or 3
when the plan exceeds ``--device-memory``; 1 on bad input.

Example:
  $ oftjax plan --model benchmarks/configs/Llama-3.1-70B.json --batch 1 --seq 2048 --mesh 1x8 --remat \\
      --dtype bfloat16 --device-memory 141GB
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_plan_parser", "parse_memory", "run_plan"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
_LABELS = {
    "frozen_packed": "frozen packed weights",
    "frozen_float": "frozen float weights (embeddings, lm_head, norms)",
    "rotations": "rotations (trained)",
    "optimizer": "optimizer state",
    "batch": "batch",
    "activations": "activations (kept for the backward pass)",
    "temporaries": "temporaries (XLA's other buffers)",
}


def parse_memory(text: str) -> int:
    """Bytes of ``"80GB"`` (10^9), ``"80GiB"`` (2^30), ``"512MB"``, or a plain byte count.

    Example:
      >>> parse_memory("80GB"), parse_memory("1GiB")
      (80000000000, 1073741824)
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"--device-memory must look like 80GB or 80GiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_plan_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``plan`` subcommand."""
    p = sub.add_parser(
        "plan",
        help="memory per device of a training run, compiled ahead of time from abstract shapes",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--model", type=Path, required=True, help="an HF checkpoint directory or its config.json")
    p.add_argument("--quant", choices=("nf4", "fp4", "int8", "none"), default="nf4", help="default: nf4")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false")
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--oft-block-size", type=int, default=32, help="default: %(default)s")
    p.add_argument("--cayley", choices=("neumann", "exact"), default="neumann")
    p.add_argument("--batch", type=int, required=True, help="sequences per optimizer step (global)")
    p.add_argument("--seq", type=int, required=True, help="tokens per sequence")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: 1)")
    p.add_argument("--mesh", default="1x1", metavar="DATAxFSDP", help="default: %(default)s")
    p.add_argument("--remat", action="store_true", help="rematerialize decoder layers (as oftjax train)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="default: bfloat16")
    p.add_argument("--device-memory", type=parse_memory, default=None, metavar="SIZE", help="e.g. 80GB")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.set_defaults(func=run_plan)
    return p


def _config_path(model: Path) -> Path:
    path = model / "config.json" if model.is_dir() else model
    if not path.is_file():
        raise FileNotFoundError(f"{model}: no config.json (pass a checkpoint directory or a config file)")
    return path


def _check(args: argparse.Namespace) -> tuple[int, int]:
    from oftjax.cli._train_args import fail

    for name in ("batch", "seq", "oft_block_size", "grad_accum"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq < 2:
        fail(f"--seq must be >= 2, got {args.seq}")
    if args.batch % args.grad_accum:
        fail(f"--batch {args.batch} is not divisible by --grad-accum {args.grad_accum}")
    try:
        data, fsdp = (int(x) for x in args.mesh.lower().split("x"))
    except ValueError:
        fail(f"--mesh must look like DATAxFSDP (e.g. 2x4), got {args.mesh!r}")
    if data < 1 or fsdp < 1:
        fail(f"--mesh {args.mesh}: both sizes must be >= 1")
    return data, fsdp


def _builder(hf_config: dict, args: argparse.Namespace):
    """What ``oftjax train`` builds: the model in ``--dtype``, quantized, remat as asked, OFT applied."""
    import jax.numpy as jnp
    from flax import nnx

    from oftjax.config import OFTConfig
    from oftjax.models import CausalLM, ModelConfig
    from oftjax.surgery import apply_oft
    from oftjax.train import quantize_model

    config = ModelConfig.from_hf(hf_config)
    dtype = jnp.dtype(args.dtype)
    oft = OFTConfig(
        r=0,
        oft_block_size=args.oft_block_size,
        target_modules=[m.strip() for m in args.target_modules.split(",") if m.strip()],
        task_type="CAUSAL_LM",
        use_cayley_neumann=args.cayley == "neumann",
    )

    def build():
        model = CausalLM(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype, remat=args.remat)
        quantize_model(model, args.quant, double_quant=args.double_quant, compute_dtype=dtype)
        apply_oft(model, oft, rngs=nnx.Rngs(0))
        return model

    return build


def _parameter_count(hf_config: dict) -> int:
    import jax
    from flax import nnx

    from oftjax.models import CausalLM, ModelConfig

    config = ModelConfig.from_hf(hf_config)
    model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def compute_plan(args: argparse.Namespace) -> dict:
    """Compile here, on this process's devices: the plan as a JSON-able dict."""
    from oftjax.train import TrainConfig, make_mesh, plan_memory

    data, fsdp = _check(args)
    hf_config = json.loads(_config_path(args.model).read_text())
    cfg = TrainConfig(steps=1, batch_size=args.batch, seq_len=args.seq, grad_accum=args.grad_accum)
    # the buffer assignment (the plan) does not depend on LLVM's optimization level; compiling is faster
    plan = plan_memory(
        _builder(hf_config, args),
        cfg,
        make_mesh(data, fsdp),
        compiler_options={"xla_backend_optimization_level": 0},
    )
    return {**plan.as_dict(), "parameters": _parameter_count(hf_config), "mesh": [data, fsdp]}


def _simulated(args: argparse.Namespace, devices: int) -> dict:
    """The plan compiled in a subprocess with ``devices`` simulated CPU devices."""
    argv = _argv(args)
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
    }
    done = subprocess.run(
        [sys.executable, "-m", "oftjax.cli", *argv, "--json"], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        from oftjax.cli._train_args import fail

        fail(f"the compile for {devices} simulated devices failed: {done.stderr.strip()[-2000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "simulated": True}


def _argv(args: argparse.Namespace) -> list[str]:
    argv = [
        "plan",
        "--model",
        str(args.model),
        "--quant",
        args.quant,
        "--target-modules",
        args.target_modules,
    ]
    argv += [
        "--oft-block-size",
        str(args.oft_block_size),
        "--cayley",
        args.cayley,
        "--batch",
        str(args.batch),
    ]
    argv += ["--seq", str(args.seq), "--grad-accum", str(args.grad_accum), "--mesh", args.mesh]
    argv += (
        ["--dtype", args.dtype] + ["--remat"] * args.remat + ["--no-double-quant"] * (not args.double_quant)
    )
    return argv


def format_plan(plan: dict, args: argparse.Namespace) -> str:
    """The table: one line per part, the total, and the verdict against ``--device-memory``."""
    unit, size = ("GiB", 2**30) if plan["total"] >= 2**30 else ("MiB", 2**20)
    where = "simulated CPU devices" if plan.get("simulated") else f"{plan['platform']} devices"
    head = (
        f"{args.model.name}: {plan['parameters'] / 1e9:.2f}B parameters, {args.quant}"
        f"{' + double quant' if args.double_quant and args.quant in ('nf4', 'fp4') else ''}, OFT block "
        f"{args.oft_block_size}; batch {args.batch} x {args.seq} tokens, {args.dtype}"
        f"{', remat' if args.remat else ''}; mesh {args.mesh} (compiled for {plan['devices']} {where})"
    )
    lines = [head, f"  {'per device':<52}{unit:>9}"]
    lines += [f"  {_LABELS[k]:<52}{plan[k] / size:>9.2f}" for k in _LABELS]
    lines.append(f"  {'total (peak of the step)':<52}{plan['total'] / size:>9.2f}")
    if args.device_memory:
        free = args.device_memory - plan["total"]
        verdict = "fits" if free >= 0 else "does not fit"
        lines.append(
            f"  against {args.device_memory / 1e9:g} GB: {verdict} ({abs(free) / 2**30:.2f} GiB "
            f"{'free' if free >= 0 else 'over'})"
        )
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> int:
    """``oftjax plan``: compile here when this host has the mesh's devices, else for simulated CPU devices."""
    data, fsdp = _check(args)
    _config_path(args.model)
    import jax

    plan = compute_plan(args) if jax.device_count() >= data * fsdp else _simulated(args, data * fsdp)
    if args.json:
        print(json.dumps(plan))
    else:
        print(format_plan(plan, args))
        if args.device_memory and plan["total"] > args.device_memory:
            return 3
    return 0
