"""Conversion speed of a bnb-NF4 HF checkpoint (~1B parameters by default) vs plain safetensors reading.

The synthetic checkpoint is written with numpy directly in bitsandbytes' layout (packed ``weight`` bytes,
float32 ``absmax``, ``quant_map``, the JSON ``quant_state``: docs/bitsandbytes-formats.md,
"Serialized layout") for a TinyLlama-1.1B-shaped model: 22 layers, hidden 2048, intermediate 5632, 4 KV
heads; embeddings, lm_head and norms in float16 (so that ``safetensors.numpy`` can read them: it has no bf16).

Measured (best of ``--repeat`` runs, file in the page cache, MB/s of the source checkpoint size):
  * limit: ``safetensors.numpy.load_file`` of the checkpoint (every tensor read into memory);
  * ``hf.read_checkpoint`` (eager: every tensor read, every layer validated, pytrees built);
  * ``hf.checkpoint_to_jax`` (read + validate + write the JAX checkpoint directory, tensor by tensor);
  * ``hf.checkpoint_to_hf`` (back to an HF directory).
Target: ``checkpoint_to_jax`` >= 0.7x the limit. Figures: benchmarks/RESULTS.md.

Usage: python benchmarks/bench_convert.py [--params 1.1e9] [--double-quant] [--repeat 3] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from interop import hf
from interop._safetensors import write_safetensors
from oftjax.quant import DYNAMIC, NF4


class _Random:
    """An array made on demand (``np.asarray``) so writing the checkpoint never holds more than one tensor."""

    def __init__(self, shape, dtype, seed, kind):
        self.shape, self.dtype, self.seed, self.kind = tuple(shape), np.dtype(dtype), seed, kind

    def __array__(self, dtype=None, copy=None):
        rng = np.random.default_rng(self.seed)
        if self.kind == "bytes":
            return np.frombuffer(rng.bytes(int(np.prod(self.shape))), np.uint8).reshape(self.shape)
        if self.kind == "absmax":
            return rng.uniform(0.01, 0.1, self.shape).astype(self.dtype)  # noqa: NPY002
        return (rng.standard_normal(self.shape) * 0.02).astype(self.dtype)


def _layer(tensors, prefix, out, inp, seed, double_quant):
    n, bs = out * inp, 64
    nb = -(-n // bs)
    qs = {"quant_type": "nf4", "blocksize": bs, "dtype": "bfloat16", "shape": [out, inp]}
    tensors[prefix + ".weight"] = _Random((n // 2, 1), np.uint8, seed, "bytes")
    tensors[prefix + ".weight.quant_map"] = NF4.copy()
    if double_quant:
        tensors[prefix + ".weight.absmax"] = _Random((nb,), np.uint8, seed + 1, "bytes")
        tensors[prefix + ".weight.nested_absmax"] = _Random((-(-nb // 256),), np.float32, seed + 2, "absmax")
        tensors[prefix + ".weight.nested_quant_map"] = DYNAMIC.copy()
        qs.update(nested_blocksize=256, nested_dtype="float32", nested_offset=0.05495452880859375)
    else:
        tensors[prefix + ".weight.absmax"] = _Random((nb,), np.float32, seed + 1, "absmax")
    blob = np.frombuffer(json.dumps(qs).encode(), np.uint8).copy()
    tensors[prefix + ".weight.quant_state.bitsandbytes__nf4"] = blob


def write_synthetic(path: Path, params: float, double_quant: bool) -> dict:
    hidden, inter, kv, vocab = 2048, 5632, 256, 32000
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter
    layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
    tensors: dict = {}
    seed = 0
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes = {
            "self_attn.q_proj": (hidden, hidden),
            "self_attn.k_proj": (kv, hidden),
            "self_attn.v_proj": (kv, hidden),
            "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (inter, hidden),
            "mlp.up_proj": (inter, hidden),
            "mlp.down_proj": (hidden, inter),
        }
        for name, (o, k) in shapes.items():
            _layer(tensors, f"{p}.{name}", o, k, seed, double_quant)
            seed += 3
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{p}.{norm}.weight"] = np.ones(hidden, np.float16)
    tensors["model.embed_tokens.weight"] = _Random((vocab, hidden), np.float16, 10**6, "normal")
    tensors["lm_head.weight"] = _Random((vocab, hidden), np.float16, 10**6 + 1, "normal")
    tensors["model.norm.weight"] = np.ones(hidden, np.float16)
    path.mkdir(parents=True)
    write_safetensors(path / "model.safetensors", tensors)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": vocab,
        "dtype": "bfloat16",
        "quantization_config": hf.bnb_quantization_config(
            "4bit", quant_type="nf4", use_double_quant=double_quant
        ),
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    total = 2 * vocab * hidden + layers * (per_layer + 2 * hidden) + hidden
    return {"layers": layers, "params": total}


def _best(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=1.1e9, help="approximate parameter count (default 1.1e9)")
    ap.add_argument("--double-quant", action="store_true", help="nf4 with double quantization")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()

    from safetensors.numpy import load_file

    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.dir))
    try:
        src = work / "hf"
        t = time.perf_counter()
        info = write_synthetic(src, args.params, args.double_quant)
        size = (src / "model.safetensors").stat().st_size
        mb = size / 1e6
        kind = "nf4+dq" if args.double_quant else "nf4"
        print(
            f"synthetic {kind} checkpoint: {info['params'] / 1e9:.2f}B params, {info['layers']} layers, "
            f"{mb:.0f} MB (written in {time.perf_counter() - t:.1f} s)"
        )
        load_file(src / "model.safetensors")  # warm the page cache

        def to_native():
            shutil.rmtree(work / "native", ignore_errors=True)
            hf.checkpoint_to_jax(src, work / "native")

        def to_hf():
            shutil.rmtree(work / "back", ignore_errors=True)
            hf.checkpoint_to_hf(work / "native", work / "back")

        rows = [
            (
                "safetensors.numpy.load_file (limit)",
                _best(lambda: load_file(src / "model.safetensors"), args.repeat),
            ),
            ("hf.read_checkpoint (eager)", _best(lambda: hf.read_checkpoint(src), args.repeat)),
            ("hf.checkpoint_to_jax", _best(to_native, args.repeat)),
            ("hf.checkpoint_to_hf", _best(to_hf, args.repeat)),
        ]
        limit = rows[0][1]
        print(f"| {'operation':<38} | {'seconds':>8} | {'MB/s':>8} | {'x limit':>8} |")
        print(f"|{'-' * 40}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
        for name, sec in rows:
            print(f"| {name:<38} | {sec:8.3f} | {mb / sec:8.0f} | {limit / sec:8.2f} |")
        a = (src / "model.safetensors").read_bytes()
        same = a == (work / "back" / "model.safetensors").read_bytes()
        print(f"HF -> native -> HF file byte-identical: {same}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
