"""Where a decode step's time goes, oftjax against transformers (the models and calls of bench_generate.py).

For each variant and batch size: the decode step of each side (the best of three ``generate`` calls of
bench_generate.py), then its large parts alone on both sides, called in turn for ten rounds in one process
(best of each):

  lm_head                       the tied output head over the 49,152-token vocabulary (``h @ table.T``), on
                                a float32 table (ours: the checkpoint keeps a bfloat16 table, which the
                                decode loop converts to float32 once per call of its jitted chunk of steps,
                                outside the loop: "converts the bfloat16 table", per chunk, not per step)
  projections, float weights    the seven projections of every layer as float32 matmuls (the float model's
                                GEMV/GEMM floor; in a 4-bit model, what follows dequantizing each weight)
  dequantizes every 4-bit weight  oftjax's ``quant.dequantize`` (the CPU kernel) / bitsandbytes'
                                ``dequantize_4bit`` of all 210 projections into float32: what a 4-bit
                                decode step does before its matmuls, on both sides
  XLA reads 512 MiB             the memory bandwidth's scale (a float32 sum)

The parts are timed in turn, round after round, so that a busy machine slows them alike; the percentages
are of that side's step. Figures: benchmarks/RESULTS.md.

Usage: python benchmarks/profile_generate.py [--model DIR] [--batches 1,8] [--variants float,nf4,nf4+adapter]
           [--prompt-len 64 --new-tokens 128] [--torch-threads N]
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_generate as bg  # noqa: E402


def _timings(fns: dict, rounds: int = 10) -> dict[str, float]:
    """The best wall time of each zero-argument function, called in turn for ``rounds`` rounds after one
    warm-up call each (a busy machine then slows them alike)."""
    import jax

    for f in fns.values():
        jax.block_until_ready(f())
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def _ours_parts(model, float_model, batch: int) -> dict:
    """Ours: the tied lm_head, the projections' matmuls on float weights, dequantizing every 4-bit weight
    (4-bit models), and reading 512 MiB (the memory bandwidth's scale)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from oftjax import quant
    from oftjax.nn import Linear4bit

    embed = model.model.embed_tokens
    stored = getattr(embed, "base_layer", embed).embedding[...]
    table = jax.block_until_ready(stored.astype(jnp.float32))  # the decode loop's copy (converted once)
    kernels = [n.kernel[...] for _, n in nnx.iter_graph(float_model) if type(n) is nnx.Linear]
    fours = [n.weight.get_value() for _, n in nnx.iter_graph(model) if isinstance(n, Linear4bit)]
    h = jnp.ones((batch, table.shape[1]), jnp.float32)
    xs = {w.shape[0]: jnp.ones((batch, w.shape[0]), jnp.float32) for w in kernels}
    big = jnp.ones((2**27,), jnp.float32)
    head, proj = jax.jit(lambda h, t: h @ t.T), jax.jit(lambda xs, ws: [xs[w.shape[0]] @ w for w in ws])
    dequant, read = jax.jit(lambda qs: [quant.dequantize(q, jnp.float32) for q in qs]), jax.jit(jnp.sum)
    parts = {
        "ours lm_head": lambda: head(h, table),
        "ours projections, float weights": lambda: proj(xs, kernels),
        "XLA reads 512 MiB": lambda: read(big),
    }
    if fours:
        parts["ours dequantizes every 4-bit weight"] = lambda: dequant(fours)
    if stored.dtype != jnp.float32:
        to_f32 = jax.jit(lambda t: t.astype(jnp.float32))
        parts[f"ours converts the {stored.dtype} table"] = lambda: to_f32(stored)
    return parts


def _torch_parts(theirs, batch: int) -> dict:
    """transformers' side of the same: its lm_head, its projections on float weights (F.linear), and
    bitsandbytes dequantizing every 4-bit weight (4-bit models)."""
    import bitsandbytes as bnb
    import torch

    layers = [m for m in theirs.modules() if isinstance(m, torch.nn.Linear)]
    fours = [m for m in layers if isinstance(m, bnb.nn.Linear4bit)]
    floats = [torch.randn(m.out_features, m.in_features) for m in layers if m.out_features != 49152]
    table = theirs.get_output_embeddings().weight.detach()
    h = torch.ones(batch, table.shape[1])
    xs = {w.shape[1]: torch.ones(batch, w.shape[1]) for w in floats}
    linear = torch.nn.functional.linear
    parts = {
        "torch lm_head": lambda: linear(h, table),
        "torch projections, float weights": lambda: [linear(xs[w.shape[1]], w) for w in floats],
    }
    if fours:
        dq = bnb.functional.dequantize_4bit
        parts["bnb dequantizes every 4-bit weight"] = lambda: [
            dq(m.weight.data, m.weight.quant_state) for m in fours
        ]
    return parts


def profile(a, variant: str, adapter: Path) -> None:
    """Where one decode step goes, at each batch size: ours' step (best of 3 ``generate`` calls) and torch's,
    then the parts alone on both sides, timed in turn (``_timings``)."""
    import torch

    quant_kind, _, with_adapter = variant.partition("+")
    quant_kind = None if quant_kind == "float" else quant_kind
    adapter_dir = adapter if with_adapter else None
    ours = bg.ours_model(a.model, quant_kind, adapter_dir)
    theirs = bg.torch_model(a.model, quant_kind, adapter_dir)
    float_model = bg.ours_model(a.model, None, None)
    for batch in a.batches:
        ids = bg.prompts(a.model, batch, a.prompt_len)
        steps = {}
        for name, run in (("ours", bg.ours_generate), ("torch", bg.torch_generate)):
            run(ours if name == "ours" else theirs, ids, a.new_tokens)
            calls = [run(ours if name == "ours" else theirs, ids, a.new_tokens) for _ in range(3)]
            steps[name] = batch / max(c.decode_tps for c in calls)
        with torch.no_grad():
            parts = _timings({**_ours_parts(ours, float_model, batch), **_torch_parts(theirs, batch)})
        print(f"{variant}, batch {batch}: decode step ours {1e3 * steps['ours']:.1f} ms, torch "
              f"{1e3 * steps['torch']:.1f} ms", flush=True)  # fmt: skip
        for name, t in parts.items():
            side = "ours" if name.startswith(("ours", "XLA")) else "torch"
            print(f"  {name:<38} {1e3 * t:>7.1f} ms ({100 * t / steps[side]:>3.0f}% of the {side} step)")
    del ours, theirs, float_model
    gc.collect()


def main(argv: list[str] | None = None) -> int:
    a = bg.parse_args(argv)
    import torch

    from interop.real_model import build_smollm2
    from oftjax import cpu_kernels

    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    cpu_kernels.enable()  # as `oftjax generate` on a CPU
    a.model = Path(a.model or build_smollm2())
    print(f"{a.model}: float32, prompt {a.prompt_len} tokens, {a.new_tokens} new tokens; torch "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        adapter = bg.write_adapter(a.model, Path(tmp) / "adapter")
        for variant in a.variants:
            profile(a, variant, adapter)
    return 0


if __name__ == "__main__":
    sys.exit(main())
