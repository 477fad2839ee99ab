"""``oftjax merge``: fold a PEFT OFT adapter into its base and write a complete HF checkpoint.

The base loads as ``oftjax generate`` loads it (a bnb checkpoint keeps its format; ``--quant`` quantizes a
float one first, as ``oftjax train --quant`` did before training). ``oftjax.merge`` folds each rotation into
its layer's weight, ``W' = W BD^T`` in float32: a float base keeps ``W'`` (in its dtype); a quantized base is
dequantized, rotated and requantized in the same format (docs/generation.md, "Merging into a quantized
base"), and the command reports what requantizing cost: per layer ``max |W'_requantized - W'| / max |W'|``,
its largest and mean value over the layers. The merged model is written by ``interop.hf_model.save_model``
(float, or bitsandbytes' serialization with its ``quantization_config``) together with the base's tokenizer
files, chat template and ``generation_config.json``, so the output is a complete checkpoint; it is built in a
temporary sibling directory and renamed when complete, and an existing non-empty ``--output`` is refused
unless ``--force``. Last, the written checkpoint is read back and its logits compared with the unmerged
model's on random tokens (max error relative to max |logit|, top-1 agreement).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

import numpy as np

from oftjax.cli._generate import add_load_arguments, check_model_args, fail, load_model_and_adapter

__all__ = ["SIDE_FILES", "MergeSummary", "add_merge_parser", "merge_model", "run_merge"]

# What a checkpoint holds besides config.json and the weights, copied to the merged checkpoint when present.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_SIDE_FILE_LIMIT = 1 << 30  # bytes; a tokenizer file is a few MB


def add_merge_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "merge",
        help="merge a PEFT OFT adapter into its base and write an HF checkpoint",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument(
        "--model", type=Path, required=True, help="HF checkpoint dir, or a Hub id in the local cache"
    )
    p.add_argument("--adapter", type=Path, required=True, help="PEFT OFT adapter dir")
    p.add_argument("--output", type=Path, required=True, help="the merged checkpoint's directory")
    add_load_arguments(p, dtype_default=None)
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --output")
    p.add_argument("--batch", type=int, default=4, help="random sequences for the logits check (default: 4)")
    p.add_argument("--seq-len", type=int, default=32, help="their length (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="their seed (default: %(default)s)")
    p.set_defaults(func=run_merge)
    return p


@dataclasses.dataclass(frozen=True)
class MergeSummary:
    """What merging did: the layers merged and, for quantized bases, the requantization error per layer
    (``max |W'_requantized - W'| / max |W'|``, ``W'`` the rotated float weight)."""

    layers: int
    adapters: tuple[str, ...]
    requant_rel_max: dict[str, float]

    @property
    def worst(self) -> float:
        return max(self.requant_rel_max.values(), default=0.0)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.requant_rel_max.values()))) if self.requant_rel_max else 0.0


def _check(args: argparse.Namespace) -> None:
    """Everything before loading: the inputs, the sizes, and an ``--output`` that can be written."""
    check_model_args(args)
    if args.batch < 1 or args.seq_len < 1:
        fail("--batch and --seq-len must be >= 1")
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be in 0 .. 2**32 - 1, got {args.seed}")
    out = args.output.resolve()
    for flag, source in (("--model", args.model), ("--adapter", args.adapter)):
        src = source.resolve()
        if out == src or src in out.parents or out in src.parents:
            fail(f"--output {args.output} overlaps {flag} {source}; write the merged checkpoint elsewhere")
    for parent in (args.output, *args.output.parents):
        if parent.exists() and not parent.is_dir():
            fail(f"--output {args.output}: {parent} exists and is not a directory")
        if parent.exists():
            break
    if args.output.is_dir() and any(args.output.iterdir()) and not args.force:
        fail(f"--output {args.output}: exists and is not empty; pass --force to replace it")


def run_merge(args: argparse.Namespace) -> int:
    """``oftjax merge``: load, merge, write, read back and compare; prints a summary."""
    from interop.hf_model import load_model

    _check(args)
    model, kind = load_model_and_adapter(args)
    ids = np.random.default_rng(args.seed).integers(0, model.config.vocab_size, (args.batch, args.seq_len))
    unmerged = logits(model, ids)
    summary = merge_model(model)
    copied = write_merged(model, args.model, args.output, force=args.force)
    merged = logits(load_model(args.output, dtype=args.dtype), ids)
    _report(args, kind, summary, copied, unmerged, merged)
    return 0


def merge_model(model: Any) -> MergeSummary:
    """Merge every OFT layer's active adapters into its base (``oftjax.merge``), measuring on quantized
    bases the requantization error relative to the largest rotated weight."""
    import jax.numpy as jnp

    from oftjax import merge, oft_layers
    from oftjax.nn._merge import merged_weight

    layers = [(path, layer) for path, layer in oft_layers(model) if layer.forward_adapters()]
    if not layers:
        fail("the adapter has no active layer to merge")
    scales = {}
    for path, layer in layers:
        if not hasattr(layer.base_layer, "kernel") and not hasattr(layer.base_layer, "embedding"):
            target = merged_weight(layer, layer.forward_adapters())
            scales[path] = float(jnp.max(jnp.abs(target.astype(jnp.float32)))) or 1.0
    names = tuple(sorted({n for _, layer in layers for n in layer.forward_adapters()}))
    report = merge(model)
    rel = {path: report.layers[path].requant_max_abs_error / scales[path] for path in scales}
    return MergeSummary(len(report.layers), names, rel)


def write_merged(model: Any, source: Path, output: Path, *, force: bool) -> list[str]:
    """The merged model and the base's side files (``SIDE_FILES``) as one checkpoint directory, atomically;
    returns the side files copied."""
    from interop._io import output_dir
    from interop.hf_model import save_model

    copied = []
    with output_dir(output, force=force) as tmp:
        save_model(model, tmp)
        for name in SIDE_FILES:
            if _copy_side_file(source / name, tmp / name):
                copied.append(name)
    return copied


def _copy_side_file(src: Path, dst: Path) -> bool:
    """Copy a regular file (links followed: a Hub cache snapshot links its blobs); False when absent."""
    try:
        info = os.stat(src)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(info.st_mode):
        fail(f"{src}: not a regular file")
    if info.st_size > _SIDE_FILE_LIMIT:
        fail(f"{src}: {info.st_size:,} bytes, more than a tokenizer or config file holds")
    shutil.copyfile(src, dst)
    return True


def logits(model: Any, ids: np.ndarray) -> np.ndarray:
    """float32 logits in inference mode, int8 layers dequantizing (the weights' effect alone, without
    LLM.int8's activation rounding)."""
    import jax.numpy as jnp
    from flax import nnx

    view = nnx.view(model, deterministic=True, int8_matmul="dequantize", raise_if_not_found=False)
    return np.asarray(view(jnp.asarray(ids, jnp.int32)).astype(jnp.float32))


def _report(
    args: argparse.Namespace,
    kind: str,
    summary: MergeSummary,
    copied: list[str],
    unmerged: np.ndarray,
    merged: np.ndarray,
) -> None:
    from oftjax.cli._parity import compare

    diff = compare(merged, unmerged, top1=True)
    print(f"oftjax merge: {args.model} + {args.adapter} ({kind}) -> {args.output}")
    print(f"  merged adapter {', '.join(summary.adapters)} into {summary.layers} layers")
    if summary.requant_rel_max:
        print(
            f"  requantization error, max |W_requantized - W_merged| / max |W_merged| per layer: max "
            f"{summary.worst:.3e}, mean {summary.mean:.3e} over {len(summary.requant_rel_max)} layers"
        )
    else:
        print("  float base: no requantization")
    files = ", ".join(copied) if copied else "none found"
    print(f"  wrote {args.output} (config.json, weights; from the base: {files})")
    print(
        f"  logits merged (read back) vs unmerged, {args.batch} x {args.seq_len} random tokens (seed "
        f"{args.seed}): max abs err {diff['max_abs']:.3e}, max rel err {diff['max_rel']:.3e}, top-1 "
        f"agreement {100 * diff['top1']:.2f}%"
    )
    sys.stdout.flush()
