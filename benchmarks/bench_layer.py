"""One OFT layer, forward + backward: oftjax (JAX) vs PEFT + bitsandbytes (torch), float / int8 / nf4 bases.

Setup (defaults; flags change them): tokens = 512, a 2048 x 2048 linear with bias, OFT block size 32
(Cayley-Neumann, 5 terms, PEFT's default), fp32 activations and compute. The loss is ``sum(y * G)`` for a
fixed ``G``; the backward produces the rotation gradients (and, as any layer inside a network must, the input
gradient). Both sides use the same float weight; the JAX quantized layers hold bitsandbytes' own bytes
(read through ``interop.bnb.from_state_dict``), so they dequantize to the same weights.

The floor is a JAX dense matmul without adapter, forward + input gradient: the two matmuls a frozen linear
costs in training. Targets on a CPU: JAX <= 0.8x torch, and JAX <= 1.2x the floor. Figures:
benchmarks/RESULTS.md.

Times are the best of ``--reps`` runs after warm-up (JAX: compilation): on a shared machine the minimum is
the estimate least disturbed by other load (medians are printed too). Both frameworks run in this process on
the same cores, round-robin (JAX step, torch step, floor, repeat) so that all three see the same load.

The OFT layer table runs oftjax with its CPU kernels (``--cpu-kernels on``, what ``oftjax train`` does on a
CPU) or as the pure-JAX library (``off``). A second table times applying the rotations alone, ``x BD(R)``
forward + gradients w.r.t. ``x`` and ``R``, at the same tokens x dim for several block sizes:
``oftjax.oft.rotate_blocks`` compiled with the CPU kernel (csrc/rotate.cc, where the block size has one) and
without (the pure-JAX formulation GPUs run), and PEFT's own ``einsum("...rk,rkc->...rc")`` in torch.

A third table times rotary embedding + causal attention, forward + gradients w.r.t. q, k, v, at the train
benchmark's attention shapes (``--attn-shape batch,seq,heads,kv_heads,head_dim``): oftjax's
``causal_attention`` compiled with its fused CPU kernel (RoPE inside, csrc/attention.cc) and without (RoPE +
blocked attention in pure JAX, what GPUs run), and torch as transformers runs Llama by default
(``apply_rotary_pos_emb`` + ``scaled_dot_product_attention`` with ``is_causal``).

Usage: python benchmarks/bench_layer.py [--tokens 512 --dim 2048 --block 32 --reps 10]
                                       [--rotation-blocks 16,32,64] [--attn-shape 4,256,8,4,64]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from interop import bnb as bnb_io
from interop import oracle
from oftjax import cpu_kernels
from oftjax.config import OFTConfig
from oftjax.nn import Linear4bit, Linear8bit, OFTParam
from oftjax.oft import rotate_blocks
from oftjax.surgery import apply_oft

BASES = ("float", "int8", "nf4")


def compiled(fn: Callable, *args, kernels: bool) -> Callable[[], object]:
    """``fn(*args)`` compiled ahead of time with oftjax's CPU kernels on or off (the executable keeps the
    implementation it was compiled with), as a no-argument timing closure."""
    with cpu_kernels.enable() if kernels else cpu_kernels.disable():
        exe = jax.jit(fn).lower(*args).compile()
    return lambda: jax.block_until_ready(exe(*args))


def time_interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, tuple[float, float]]:
    """name -> (best, median) wall time in ms; the functions run round-robin so that they share the load."""
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: (1e3 * min(ts), 1e3 * statistics.median(ts)) for name, ts in times.items()}


class Holder(nnx.Module):
    def __init__(self, layer):
        self.lin = layer

    def __call__(self, x):
        return self.lin(x)


def torch_layer(kind: str, w, b):
    torch = oracle.require("torch")
    bnb = oracle.require("bitsandbytes")
    out_f, in_f = w.shape
    if kind == "float":
        layer = torch.nn.Linear(in_f, out_f)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        return layer
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=True, has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=torch.float32, quant_type=kind)
        layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=kind, blocksize=64)
    layer.bias = torch.nn.Parameter(b.clone())
    layer = layer.to("cpu")
    oracle.disable_cpu_repacking(layer)
    return layer


def jax_layer(kind: str, tlayer):
    bias = jnp.asarray(tlayer.bias.detach().numpy())
    if kind == "float":
        lin = nnx.Linear(tlayer.in_features, tlayer.out_features, rngs=nnx.Rngs(0))
        lin.kernel[...] = jnp.asarray(tlayer.weight.detach().numpy().T)
        lin.bias[...] = bias
        return lin
    sd = {k: v.detach().numpy() for k, v in tlayer.state_dict().items() if k != "bias"}
    q = bnb_io.from_state_dict(sd, "")
    return Linear8bit(q, bias) if kind == "int8" else Linear4bit(q, bias)


def bench(
    a: argparse.Namespace,
) -> list[tuple[str, tuple[float, float], tuple[float, float], tuple[float, float]]]:
    torch = oracle.require("torch")
    peft = oracle.require("peft")
    oracle.use_default_cpu_dequant()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(a.dim, a.dim, generator=g) * 0.02
    b = torch.randn(a.dim, generator=g) * 0.1
    x_t = torch.randn(a.tokens, a.dim, generator=g)
    G_t = torch.randn(a.tokens, a.dim, generator=g)
    x, G = jnp.asarray(x_t.numpy()), jnp.asarray(G_t.numpy())
    kw = dict(r=0, oft_block_size=a.block, target_modules=["lin"], init_weights=False)

    # floor: dense matmul, forward + input gradient
    W = jnp.asarray(w.numpy().T)
    # Every array is an argument: closed-over arrays become compile-time constants that XLA folds.
    floor_fn = jax.jit(jax.value_and_grad(lambda x, W, G: jnp.sum((x @ W) * G)))
    floor = lambda: jax.block_until_ready(floor_fn(x, W, G))  # noqa: E731

    rows = []
    for kind in BASES:
        tl = torch_layer(kind, w, b)
        model = Holder(jax_layer(kind, tl))
        apply_oft(model, OFTConfig(**kw), rngs=nnx.Rngs(0))

        graphdef, params, rest = nnx.split(model, OFTParam, ...)

        def loss(p, rest, x, G, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, p, rest)(x) * G)

        jax_step = compiled(jax.value_and_grad(loss), params, rest, x, G, kernels=a.cpu_kernels == "on")

        holder = torch.nn.Module()
        holder.lin = tl
        holder.forward = lambda x, h=holder: h.lin(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(holder, peft.OFTConfig(**kw)).train()
        params = [p for n, p in pm.named_parameters() if "oft_R" in n]

        def torch_step(pm=pm, params=params):
            for p in params:
                p.grad = None
            (pm(x_t) * G_t).sum().backward()

        t = time_interleaved(
            {
                "jax": jax_step,
                "torch": torch_step,
                "floor": floor,
            },
            a.reps,
        )
        rows.append((kind, t["jax"], t["torch"], t["floor"]))
    return rows


def bench_rotation(a: argparse.Namespace, block: int) -> dict[str, tuple[float, float]]:
    """Applying the rotations alone: ``sum(x BD(R) * G)`` and its gradients w.r.t. ``x`` and ``R``."""
    torch = oracle.require("torch")
    g = torch.Generator().manual_seed(block)
    x_t = torch.randn(a.tokens, a.dim, generator=g)
    G_t = torch.randn(a.tokens, a.dim, generator=g)
    R_t = torch.linalg.qr(torch.randn(a.dim // block, block, block, generator=g))[0]
    x, G, R = (jnp.asarray(t.numpy()) for t in (x_t, G_t, R_t))

    def jax_step(kernels: bool):
        fn = jax.value_and_grad(lambda x, R, G: jnp.sum(rotate_blocks(x, R) * G), argnums=(0, 1))
        return compiled(fn, x, R, G, kernels=kernels)

    x_t.requires_grad_(True)
    R_t.requires_grad_(True)

    def torch_step():
        x_t.grad = R_t.grad = None
        y = torch.einsum("...rk,rkc->...rc", x_t.reshape(a.tokens, -1, block), R_t).reshape(a.tokens, a.dim)
        (y * G_t).sum().backward()

    return time_interleaved({"oftjax": jax_step(True), "xla": jax_step(False), "torch": torch_step}, a.reps)


def bench_attention(a: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """RoPE + causal attention, ``sum(out * G)`` and its gradients w.r.t. q, k, v, in all three."""
    from oftjax.models._attention import causal_attention

    torch = oracle.require("torch")
    b, s, h, kv, d = (int(v) for v in a.attn_shape.split(","))
    g = torch.Generator().manual_seed(1)
    q_t, G_t = (torch.randn(b, s, h, d, generator=g) for _ in range(2))
    k_t, v_t = (torch.randn(b, s, kv, d, generator=g) for _ in range(2))
    inv = 10000.0 ** (-torch.arange(0, d, 2) / d)
    ang = torch.arange(s)[:, None] * torch.cat([inv, inv])[None]
    cos_t, sin_t = (f(ang)[None].expand(b, s, d).contiguous() for f in (torch.cos, torch.sin))
    q, k, v, G, cos, sin = (jnp.asarray(t.numpy()) for t in (q_t, k_t, v_t, G_t, cos_t, sin_t))
    scale = d**-0.5

    def jax_step(kernels: bool):
        def loss(q, k, v, G, cos, sin):
            return jnp.sum(causal_attention(q, k, v, cos, sin, scale=scale) * G)

        return compiled(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, k, v, G, cos, sin, kernels=kernels)

    for t in (q_t, k_t, v_t):
        t.requires_grad_(True)

    def rotate_half(x):
        return torch.cat((-x[..., d // 2 :], x[..., : d // 2]), dim=-1)

    def torch_step():
        q_t.grad = k_t.grad = v_t.grad = None
        c, sn = cos_t[:, None], sin_t[:, None]  # [b, 1, s, d] against [b, heads, s, d]
        qh, kh, vh = (t.transpose(1, 2) for t in (q_t, k_t, v_t))
        qh, kh = qh * c + rotate_half(qh) * sn, kh * c + rotate_half(kh) * sn
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
        (out.transpose(1, 2) * G_t).sum().backward()

    return time_interleaved({"oftjax": jax_step(True), "xla": jax_step(False), "torch": torch_step}, a.reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--reps", type=int, default=12)
    p.add_argument("--rotation-blocks", default="16,32,64", help="block sizes of the rotation-only table")
    p.add_argument("--attn-shape", default="4,256,8,4,64", help="batch,seq,heads,kv_heads,head_dim")
    p.add_argument(
        "--cpu-kernels",
        choices=["on", "off"],
        default="on",
        help="the OFT layer table with oftjax's CPU kernels (as `oftjax train` on a CPU) or pure JAX",
    )
    a = p.parse_args()
    torch = oracle.require("torch")
    print(
        f"OFT layer fwd+bwd: tokens={a.tokens}, {a.dim}x{a.dim}, block {a.block}, fp32, CPU kernels "
        f"{a.cpu_kernels}; "
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); best of {a.reps} (median in parentheses)"
    )
    rows = bench(a)
    print(f"{'base':<6} {'JAX ms':>16} {'torch ms':>16} {'floor ms':>16} {'JAX/torch':>9} {'JAX/floor':>9}")
    for kind, tj, tt, fl in rows:
        cells = " ".join(f"{f'{b:.1f} ({m:.1f})':>16}" for b, m in (tj, tt, fl))
        print(f"{kind:<6} {cells} {tj[0] / tt[0]:>9.2f} {tj[0] / fl[0]:>9.2f}")
    print(
        "targets: JAX/torch <= 0.80, JAX/floor <= 1.20 (floor: JAX dense matmul fwd + input grad, no adapter)"
    )
    native = cpu_kernels.info()["rotation"]["block_sizes"]
    print(f"\nx BD(R) alone, fwd + grads (x, R): tokens={a.tokens}, dim {a.dim}; kernel sizes {native}")
    head = ("block", "CPU kernel ms", "pure JAX ms", "torch ms", "kernel/torch", "JAX/kernel")
    print(f"{head[0]:<6} {head[1]:>16} {head[2]:>16} {head[3]:>16} {head[4]:>12} {head[5]:>10}")
    for block in (int(b) for b in a.rotation_blocks.split(",")):
        t = bench_rotation(a, block)
        cells = " ".join(f"{f'{b:.2f} ({m:.2f})':>16}" for b, m in (t["oftjax"], t["xla"], t["torch"]))
        ratios = f"{t['oftjax'][0] / t['torch'][0]:>12.2f} {t['xla'][0] / t['oftjax'][0]:>10.2f}"
        print(f"{block:<6} {cells} {ratios}{'' if block in native else '  (no kernel for this size)'}")

    t = bench_attention(a)
    print(f"\nRoPE + causal attention, fwd + grads (q, k, v): batch,seq,heads,kv,head_dim {a.attn_shape}")
    head = ("CPU kernel ms", "pure JAX ms", "torch ms", "kernel/torch", "JAX/kernel")
    print(f"{head[0]:>16} {head[1]:>16} {head[2]:>16} {head[3]:>12} {head[4]:>10}")
    cells = " ".join(f"{f'{b:.2f} ({m:.2f})':>16}" for b, m in (t["oftjax"], t["xla"], t["torch"]))
    print(f"{cells} {t['oftjax'][0] / t['torch'][0]:>12.2f} {t['xla'][0] / t['oftjax'][0]:>10.2f}")


if __name__ == "__main__":
    main()
