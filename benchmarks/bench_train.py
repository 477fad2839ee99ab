"""Train-step throughput and memory: oftjax (JAX, NF4 + double quant, OFT) vs PEFT + bitsandbytes (torch).

Same model on both sides: a Llama with hidden 512, 4 layers, seq 256 (defaults; flags change them), frozen
linears in NF4 with double quantization (blocksize 64, fp32 compute), OFT (block size 32, Cayley-Neumann) on
all attention and MLP projections, AdamW on the rotations only, fp32 activations. Each side runs in its own
subprocess (so peak RSS is its own), warms up (JAX: compilation) and then times ``--steps`` optimizer steps.

Reported:
  * tokens/s (batch * seq / median step time) and the oftjax / torch ratio (target on a CPU: >= 1.5);
  * peak RSS of each process;
  * JAX's compiled memory analysis of the train step (arguments, outputs, temporaries);
  * frozen-base bytes per parameter: the packed NF4 + DQ linears (sum of leaf nbytes / weight count; target
    <= 0.52) and the whole frozen base (embeddings, norms and lm_head stay fp32, as in transformers).

Runs unchanged on a GPU (JAX picks it up; torch uses CUDA when available).

Usage: python benchmarks/bench_train.py [--hidden 512 --layers 4 --seq 256 --batch 4 --steps 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hf_config(a: argparse.Namespace) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": a.vocab,
        "hidden_size": a.hidden,
        "intermediate_size": 3 * a.hidden,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.hidden // 64,
        "num_key_value_heads": max(1, a.hidden // 128),
        "head_dim": 64,
        "max_position_embeddings": max(512, a.seq),
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_jax(a: argparse.Namespace, out: mp.Queue) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from oftjax.config import OFTConfig
    from oftjax.models import LlamaForCausalLM, ModelConfig
    from oftjax.nn import Linear4bit
    from oftjax.surgery import apply_oft, trainable_count
    from oftjax.train import TrainConfig, Trainer, quantize_model

    model = LlamaForCausalLM(ModelConfig.from_hf(hf_config(a)), rngs=nnx.Rngs(0))
    quantize_model(model, "nf4", double_quant=True, compute_dtype=jnp.float32)
    packed = weights = 0
    for _, m in nnx.iter_graph(model):
        if isinstance(m, Linear4bit):
            packed += sum(np.asarray(x).nbytes for x in jax.tree.leaves(m.weight.get_value()))
            weights += m.in_features * m.out_features
    frozen_all = sum(np.asarray(x).nbytes for x in jax.tree.leaves(nnx.state(model)))
    params_all = weights + sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    apply_oft(model, OFTConfig(r=0, oft_block_size=32, target_modules=list(TARGETS)), rngs=nnx.Rngs(0))
    n_train = trainable_count(model)
    trainer = Trainer(model, TrainConfig(steps=1000, learning_rate=1e-4, batch_size=a.batch, seq_len=a.seq))
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(0, a.vocab, (a.batch, a.seq)).astype(np.int32)}
    compiled = trainer._train.lower(trainer.state, jax.device_put(batch)).compile()
    mem = compiled.memory_analysis()
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        float(trainer.train_step(batch)["loss"])
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    out.put(
        {
            "side": "oftjax",
            "backend": jax.default_backend(),
            "step_s": step,
            "tokens_per_s": a.batch * a.seq / step,
            "peak_rss_mb": _peak_rss_mb(),
            "trainable": n_train,
            "compiled_mb": {
                k: getattr(mem, f"{k}_size_in_bytes", 0) / 2**20 for k in ("argument", "output", "temp")
            }
            if mem is not None
            else None,
            "base_bytes_per_param_linears": packed / weights,
            "base_bytes_per_param_all": frozen_all / params_all,
        }
    )


def run_torch(a: argparse.Namespace, out: mp.Queue) -> None:
    import tempfile

    import torch

    from interop import oracle

    peft = oracle.require("peft")
    transformers = oracle.require("transformers")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config(a).items() if k != "architectures"})
        transformers.LlamaForCausalLM(cfg).save_pretrained(tmp)
        model = oracle.load_causal_lm(tmp, quant="nf4", double_quant=True, device=device)
    model = peft.get_peft_model(
        model, peft.OFTConfig(r=0, oft_block_size=32, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    )
    oracle.disable_cpu_repacking(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=device)
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    out.put(
        {
            "side": "torch",
            "backend": device,
            "step_s": step,
            "tokens_per_s": a.batch * a.seq / step,
            "peak_rss_mb": _peak_rss_mb(),
            "threads": torch.get_num_threads(),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
    )


def _in_subprocess(fn, a: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(a, q))
    p.start()
    result = q.get()
    p.join()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    jx = _in_subprocess(run_jax, a)
    th = _in_subprocess(run_torch, a)
    ratio = jx["tokens_per_s"] / th["tokens_per_s"]
    print(
        f"train step, Llama hidden {a.hidden} x {a.layers} layers, seq {a.seq}, batch {a.batch}, "
        f"vocab {a.vocab}; NF4 + DQ base, OFT b=32 on {len(TARGETS)} projections "
        f"({jx['trainable']:,} trainable)"
    )

    def row(label: str, ours: str, theirs: str = "", r: str = "") -> None:
        print(f"| {label:<34} | {ours:>18} | {theirs:>18} | {r:>5} |")

    row("", f"oftjax ({jx['backend']})", f"PEFT+bnb ({th['backend']})", "ratio")
    print(f"|{'-' * 36}|{'-' * 20}|{'-' * 20}|-------|")
    row("tokens/s", f"{jx['tokens_per_s']:,.0f}", f"{th['tokens_per_s']:,.0f}", f"{ratio:.2f}")
    row("step time (s, median)", f"{jx['step_s']:.3f}", f"{th['step_s']:.3f}")
    rss = jx["peak_rss_mb"] / th["peak_rss_mb"]
    row("peak RSS (MB)", f"{jx['peak_rss_mb']:,.0f}", f"{th['peak_rss_mb']:,.0f}", f"{rss:.2f}")
    if jx["compiled_mb"]:
        c = jx["compiled_mb"]
        row("JAX step args/out/temp (MB)", f"{c['argument']:.1f}/{c['output']:.1f}/{c['temp']:.1f}")
    bpp = jx["base_bytes_per_param_linears"]
    row("base bytes/param (NF4+DQ linears)", f"{bpp:.4f}")
    row("base bytes/param (whole base)", f"{jx['base_bytes_per_param_all']:.4f}")
    met = lambda ok: "met" if ok else "NOT met"
    print(
        f"targets: throughput ratio >= 1.5: {met(ratio >= 1.5)}; "
        f"NF4+DQ <= 0.52 bytes/param: {met(bpp <= 0.52)}"
    )
    if a.json:
        a.json.write_text(json.dumps({"oftjax": jx, "torch": th, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
