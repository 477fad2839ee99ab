"""Train-step throughput and memory: oftjax (JAX, NF4 + double quant, OFT) vs PEFT + bitsandbytes (torch).

Same model on both sides: a Llama with hidden 512, 4 layers, seq 256 (defaults; flags change them), frozen
linears in NF4 with double quantization (blocksize 64, fp32 compute), OFT (block size 32, Cayley-Neumann) on
all attention and MLP projections, AdamW on the rotations only (no weight decay, no clipping on either side),
fp32 activations, one optimizer step per timed step. Each side runs in its own subprocess (so peak RSS is its
own) and warms up (JAX: compilation) while the other does; then the two **take turns** (a semaphore pair):
JAX step, torch step, JAX step, ... so that both see the same machine load (this CPU is shared; timing the
sides one after the other measured the load, not the frameworks). Medians of ``--steps`` rounds are reported
(a round: JAX step, torch step; the floors' rounds come after all steps). ``--turn-steps N`` makes each turn
N steps and times the last, so each side's timed step follows one of its own while the other process rests
(the block cache then hands its free blocks back after a second, as in ``oftjax train``); ``--alone`` runs
the JAX process, then the torch process, each with nothing beside it, as a user would run either. How torch's
step is timed moves its time more than anything on the JAX side (benchmarks/RESULTS.md has all three).

Each side also times its **GEMM floor** in the same turn-taking: the dense matmuls the step cannot avoid, for
every frozen linear (7 per layer and lm_head) the forward ``x W^T`` and the input gradient ``g W``, at the
step's shapes, in fp32, in that framework (XLA:CPU here, MKL/oneDNN in torch). The step's model FLOPs divided
by each time give achieved GFLOP/s, and ``torch step / JAX floor`` bounds the throughput ratio any JAX step
could reach while doing these matmuls at the rate XLA does them.

Reported:
  * tokens/s (batch * seq / median step time) and the oftjax / torch ratio (target on a CPU: >= 1.5), and
    the median over rounds of torch's step time / JAX's (a round's two steps run back to back, so each of
    these ratios sees one machine state; the machine's speed moves between runs more than the ratio does);
  * the GEMM floor of each side, achieved GFLOP/s, and the step's share spent outside those GEMMs;
  * peak RSS of each process: after loading, quantizing and the warm-up steps (training), and at the end (with
    the GEMM floor's own inputs, which are not the step's);
  * page faults per step of each process (the turn after the timed rounds);
  * JAX's compiled memory analysis of the train step (arguments, outputs, temporaries);
  * frozen-base bytes per parameter: the packed NF4 + DQ linears (sum of leaf nbytes / weight count; target
    <= 0.52) and the whole frozen base (embeddings, norms and lm_head stay fp32, as in transformers);
  * the 1-minute load average before and after: a busy machine slows torch's OpenMP threads more than XLA's,
    so only a run started below ~1 is a quiet-machine figure.

Runs unchanged on a GPU (JAX picks it up; torch uses CUDA when available). No XLA flags are set: the XLA:CPU
dot implementations and schedulers tried ran the step's GEMMs at the same rate (benchmarks/RESULTS.md).

Allocator (``--malloc``, ``--torch-malloc``; set before either framework starts; oftjax/cli/_malloc.py):
``cache``, as ``oftjax train`` runs, starts the process with oftjax's block cache preloaded (freed blocks of
32 MiB and more stay mapped for reuse); ``keep`` makes glibc keep all freed memory in one heap; ``default``
leaves glibc as configured, where XLA:CPU maps its per-step temporary buffer (hundreds of MB to GBs) afresh
every step and faults it in page by page. The torch side takes the same setting unless ``--torch-malloc``
says otherwise.
Even with ``keep`` a step can fault:
when glibc finds no free block large enough for XLA's temporary buffer in the heap (other blocks allocated in
between fragment the freed space) it grows the heap with ``brk``, whose pages are then touched for the first
time; once the heap is large enough the faults stop until the next such step. The turn-taking itself costs
each side a little against back-to-back steps (caches refilled after the other side's turn, idle threads
woken), the same for both.

Figures, with the command that produced each: benchmarks/RESULTS.md.

Where the JAX step's time outside the GEMMs goes (attention, rotations, dequantize, ...):
``python benchmarks/profile_train.py`` (same model and flags; XLA op times grouped by named scope).

``--model DIR`` benchmarks a real checkpoint instead (its architecture and weights on both sides, loaded in
float32, quantized to NF4 + double quantization on load: ``interop.hf.load_model`` + ``quantize_model`` and
``BitsAndBytesConfig``; e.g. SmolLM2-135M-Instruct from ``python -m interop.real_model``: vocabulary 49,152,
tied embeddings, 30 layers).

``--family NAME`` benchmarks a model family (``family_checkpoint``): the published config of a real checkpoint
(Qwen3-0.6B, Gemma-2-2b, Gemma-3-270m, Gemma-3-1b, Phi-3-mini-4k, Phi-3-mini-128k) cut to ``--layers`` decoder
layers, widths and vocabulary as published, random weights, benchmarked as ``--model`` is.

Usage: python benchmarks/bench_train.py [--hidden 512 --layers 4 --seq 256 --batch 4 --steps 10]
       python benchmarks/bench_train.py --model DIR [--seq 256 --batch 4 --steps 10 --cpu-kernels on|off]
       python benchmarks/bench_train.py --family gemma-3-270m --layers 2 [--seq 128 --batch 2 --steps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # Phi-3's names for the same projections


def targets(a: argparse.Namespace) -> list[str]:
    """The OFT targets: every projection, by the model's own names (PEFT's)."""
    return list(FUSED_TARGETS if hf_config(a)["model_type"] == "phi3" else TARGETS)


def hf_config(a: argparse.Namespace) -> dict:
    """The benchmarked architecture: ``--model``'s config.json, else the synthetic Llama of the flags."""
    if getattr(a, "model", None):
        return json.loads((Path(a.model) / "config.json").read_text())
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


def linear_shapes(a: argparse.Namespace) -> list[tuple[int, int]]:
    """(in, out) of every frozen linear: 7 per layer and lm_head."""
    c = hf_config(a)
    d, i, hd = c["hidden_size"], c["intermediate_size"], _head_dim(c)
    q, kv = c["num_attention_heads"] * hd, c.get("num_key_value_heads", c["num_attention_heads"]) * hd
    layer = [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]
    if c["model_type"] == "phi3":
        layer = [(d, q + 2 * kv), (q, d), (d, 2 * i), (i, d)]
    return layer * c["num_hidden_layers"] + [(d, c["vocab_size"])]


def _head_dim(c: dict) -> int:
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def step_flops(a: argparse.Namespace) -> tuple[float, float]:
    """(GEMM FLOPs of the floor, attention FLOPs) of one train step (fwd + input gradients, no weight grads).

    The OFT rotations, norms, softmax, loss and optimizer are left out: they are the overhead.
    """
    tokens = a.batch * a.seq
    gemm = sum(2 * 2 * tokens * n_in * n_out for n_in, n_out in linear_shapes(a))
    c = hf_config(a)
    heads, hd = c["num_attention_heads"], _head_dim(c)
    # q k^T and p v forward (2 matmuls), backward 4 matmuls: 6 x 2 * B * H * S^2 * hd per layer.
    attn = 6 * 2 * a.batch * heads * a.seq * a.seq * hd * c["num_hidden_layers"]
    return float(gemm), float(attn)


class Turns:
    """Alternate timed calls between two processes: ``mine`` is acquired before a call, ``theirs`` released
    after it, so exactly one side computes at a time and both see the same background load. With ``calls``
    above 1 a turn makes that many calls and times the last (``--turn-steps``)."""

    def __init__(self, mine, theirs, calls: int = 1):
        self.mine, self.theirs, self.calls = mine, theirs, calls

    def time(self, fns: list, n: int, calls: int | None = None) -> list[list[float]]:
        """``n`` rounds of one turn per function; returns the times per function."""
        calls = self.calls if calls is None else calls
        times: list[list[float]] = [[] for _ in fns]
        for _ in range(n):
            for fn, ts in zip(fns, times, strict=True):
                if not self.mine.acquire(timeout=900):
                    raise TimeoutError("the other benchmark process did not hand over its turn")
                try:
                    for _ in range(calls - 1):
                        fn()
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                finally:
                    self.theirs.release()
        return times


def _apply_malloc(mode: str, jax_side: bool) -> str:
    """The process-level allocator setting of one side, before its framework starts (``cache``: the parent
    started this process with the block cache preloaded, ``_preloaded``)."""
    from oftjax.cli import _malloc

    if mode == "cache":  # on the JAX side as `oftjax train` runs with it
        return _malloc.block_cache_status() + (_malloc.pair_with_block_cache() if jax_side else "")
    if mode == "keep":
        return _malloc.keep_freed_memory()
    return "glibc as configured"


@contextlib.contextmanager
def _preloaded(mode: str, keep_through_turns: bool):
    """The environment a side's process starts with: for ``cache``, the block cache in ``LD_PRELOAD``. With
    ``keep_through_turns`` (one step per turn) its free blocks are kept however long the other side's turn
    lasts (``OFTJAX_BLOCK_CACHE_SECONDS=0``: in ``oftjax train`` the steps run back to back, the turn is the
    benchmark's own pause); otherwise they go back after a second free, as in ``oftjax train``, so the other
    side's timed step runs beside a process at rest (``--turn-steps``, ``--alone``)."""
    from oftjax.cli import _malloc

    lib = _malloc.block_cache_library()
    if mode != "cache" or lib is None:
        yield
        return
    keys = ("LD_PRELOAD", "OFTJAX_BLOCK_CACHE_SECONDS")
    before = {k: os.environ.get(k) for k in keys}
    os.environ["LD_PRELOAD"] = _malloc.ld_preload_with(lib, before["LD_PRELOAD"])
    if keep_through_turns:
        os.environ["OFTJAX_BLOCK_CACHE_SECONDS"] = "0"
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _faults_per_step(fn, n: int = 3, warm: int = 0) -> float:
    """Minor page faults per call of ``fn`` (the process's own counter), after ``warm`` uncounted calls."""
    for _ in range(warm):
        fn()
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / n


def add_shape_args(p: argparse.ArgumentParser, steps: int) -> None:
    """The model/batch flags shared with profile_train.py."""
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a real checkpoint directory (e.g. python -m interop.real_model) instead of the synthetic "
        "Llama: its architecture and weights on both sides (--hidden/--layers/--vocab then come from it)",
    )


def apply_model_shape(a: argparse.Namespace) -> None:
    """With ``--model``: the flags that describe the shape take the checkpoint's values (for the report)."""
    if a.model is not None:
        c = hf_config(a)
        a.hidden, a.layers, a.vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]


def jax_quantized_model(a: argparse.Namespace):
    """The JAX side's model: the Llama of ``hf_config(a)`` with NF4 + double-quant linears (fp32 compute)."""
    import jax.numpy as jnp
    from flax import nnx

    from oftjax.models import LlamaForCausalLM, ModelConfig
    from oftjax.train import quantize_model

    if a.model is not None:
        from interop.hf_model import load_model

        model = load_model(a.model, dtype="float32")
    else:
        model = LlamaForCausalLM(ModelConfig.from_hf(hf_config(a)), rngs=nnx.Rngs(0))
    quantize_model(model, "nf4", double_quant=True, compute_dtype=jnp.float32)
    return model


def jax_trainer(model, a: argparse.Namespace, rng):
    """OFT (b=32 on ``targets(a)``) applied to ``model``, its Trainer (AdamW, no decay/clipping), a batch."""
    import numpy as np
    from flax import nnx

    from oftjax.config import OFTConfig
    from oftjax.surgery import apply_oft
    from oftjax.train import TrainConfig, Trainer

    apply_oft(model, OFTConfig(r=0, oft_block_size=32, target_modules=targets(a)), rngs=nnx.Rngs(0))
    tcfg = TrainConfig(steps=1000, learning_rate=1e-4, batch_size=a.batch, seq_len=a.seq, max_grad_norm=None)
    batch = {"input_ids": rng.integers(0, a.vocab, (a.batch, a.seq)).astype(np.int32)}
    return Trainer(model, tcfg), batch


def apply_cpu_kernels(a: argparse.Namespace) -> str:
    """``--cpu-kernels on`` enables oftjax's CPU kernels, as ``oftjax train`` does on a CPU."""
    if a.cpu_kernels == "off":
        return "pure JAX"
    from oftjax import cpu_kernels

    cpu_kernels.enable()
    return "CPU kernels" if cpu_kernels.enabled() else "pure JAX (no CPU kernels built)"


def run_jax(a: argparse.Namespace, out: mp.Queue, turns: Turns) -> None:
    malloc = _apply_malloc(a.malloc, jax_side=True)
    kernels = apply_cpu_kernels(a)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from oftjax.nn import Linear4bit
    from oftjax.surgery import trainable_count

    model = jax_quantized_model(a)
    packed = weights = 0
    for _, m in nnx.iter_graph(model):
        if isinstance(m, Linear4bit):
            packed += sum(np.asarray(x).nbytes for x in jax.tree.leaves(m.weight.get_value()))
            weights += m.in_features * m.out_features
    frozen_all = sum(np.asarray(x).nbytes for x in jax.tree.leaves(nnx.state(model)))
    params_all = weights + sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    rng = np.random.default_rng(0)
    trainer, batch = jax_trainer(model, a, rng)
    n_train = trainable_count(model)
    compiled = trainer._train.lower(trainer.state, jax.device_put(batch)).compile()
    mem = compiled.memory_analysis()
    for _ in range(max(1, a.warmup)):
        float(trainer.train_step(batch)["loss"])
    rss_training = _peak_rss_mb()  # before the GEMM floor's own arrays

    tokens = a.batch * a.seq

    def draw(shape: tuple[int, int], scale: float = 1.0) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))

    xs = [draw((tokens, i)) for i, _ in linear_shapes(a)]
    gs = [draw((tokens, o)) for _, o in linear_shapes(a)]
    ws = [draw((o, i), 0.02) for i, o in linear_shapes(a)]
    floor_fn = jax.jit(lambda xs, gs, ws: [(x @ w.T, g @ w) for x, g, w in zip(xs, gs, ws, strict=True)])
    floor = lambda: jax.block_until_ready(floor_fn(xs, gs, ws))  # noqa: E731
    # the steps' turns first (then their page faults, in one more turn, so the two processes stay in step),
    # the floor's after them: a floor between two steps would make the step's allocator (the block cache)
    # make room for the floor's buffers, which `oftjax train` never runs
    train_step = lambda: float(trainer.train_step(batch)["loss"])  # noqa: E731
    (times,) = turns.time([train_step], a.steps)
    faults: list[float] = []
    turns.time([lambda: faults.append(_faults_per_step(train_step, warm=a.turn_steps - 1))], 1, calls=1)
    floor()
    floor()
    (floor_times,) = turns.time([floor], a.steps)
    step = statistics.median(times)
    out.put(
        {
            "side": "oftjax",
            "malloc": malloc,
            "kernels": kernels,
            "faults_per_step": faults[0],
            "backend": jax.default_backend(),
            "step_s": step,
            "step_times": times,
            "floor_s": statistics.median(floor_times),
            "tokens_per_s": a.batch * a.seq / step,
            "peak_rss_mb": _peak_rss_mb(),
            "peak_rss_training_mb": rss_training,
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


def run_torch(a: argparse.Namespace, out: mp.Queue, turns: Turns) -> None:
    malloc = _apply_malloc(a.torch_malloc, jax_side=False)
    import tempfile

    import torch

    from interop import oracle

    peft = oracle.require("peft")
    transformers = oracle.require("transformers")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.model is not None:
        model = oracle.load_causal_lm(a.model, quant="nf4", double_quant=True, device=device, dtype="float32")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config(a).items() if k != "architectures"})
            transformers.LlamaForCausalLM(cfg).save_pretrained(tmp)
            model = oracle.load_causal_lm(tmp, quant="nf4", double_quant=True, device=device)
    model = peft.get_peft_model(
        model, peft.OFTConfig(r=0, oft_block_size=32, target_modules=targets(a), task_type="CAUSAL_LM")
    )
    oracle.disable_cpu_repacking(model)
    model.train()
    # torch's AdamW defaults to weight_decay=0.01; the JAX side uses 0 (TrainConfig's default).
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=device)

    def step_fn() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(max(1, a.warmup)):
        step_fn()
    rss_training = _peak_rss_mb()  # before the GEMM floor's own arrays
    tokens = a.batch * a.seq
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    xs = [mk(tokens, i) for i, _ in linear_shapes(a)]
    gs = [mk(tokens, o) for _, o in linear_shapes(a)]
    ws = [mk(o, i) * 0.02 for i, o in linear_shapes(a)]

    def floor() -> None:
        with torch.no_grad():
            for x, gr, w in zip(xs, gs, ws, strict=True):
                torch.nn.functional.linear(x, w)
                gr @ w
        if device == "cuda":
            torch.cuda.synchronize()

    (times,) = turns.time([step_fn], a.steps)  # as run_jax: the steps' turns, their faults, the floor's
    faults: list[float] = []
    turns.time([lambda: faults.append(_faults_per_step(step_fn, warm=a.turn_steps - 1))], 1, calls=1)
    for _ in range(a.warmup):
        floor()
    (floor_times,) = turns.time([floor], a.steps)
    step = statistics.median(times)
    out.put(
        {
            "side": "torch",
            "malloc": malloc,
            "faults_per_step": faults[0],
            "backend": device,
            "step_s": step,
            "step_times": times,
            "floor_s": statistics.median(floor_times),
            "tokens_per_s": a.batch * a.seq / step,
            "peak_rss_mb": _peak_rss_mb(),
            "peak_rss_training_mb": rss_training,
            "threads": torch.get_num_threads(),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
    )


def family_checkpoint(a: argparse.Namespace) -> None:
    """``--family NAME``: write the family's published config (tests/models/_family_configs.py) cut to its
    first ``--layers`` decoder layers, with transformers' random initialization (seed 0), to a temporary
    directory removed at exit, and benchmark it as ``--model`` (both sides load that checkpoint)."""
    if a.family is None:
        return
    import atexit
    import shutil
    import tempfile

    import torch
    import transformers

    sys.path.insert(
        0, str(Path(__file__).resolve().parents[1])
    )  # the repository root: tests/ is not installed
    from tests.models._family_configs import PUBLISHED

    config = {**PUBLISHED[a.family], "num_hidden_layers": a.layers}
    if "layer_types" in config:  # the first --layers layers of the published pattern
        config["layer_types"] = config["layer_types"][: a.layers]
    tmp = tempfile.mkdtemp(prefix=f"bench-{a.family}-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(**config)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp)
    a.model = Path(tmp)


def _run_both(a: argparse.Namespace) -> tuple[dict, dict]:
    """Both sides in their own processes, taking turns for every timed call (JAX first); with ``--alone``
    one process after the other, each with nothing beside it."""
    ctx = mp.get_context("spawn")
    qj, qt = ctx.Queue(), ctx.Queue()
    if a.alone:
        results = []
        for target, q, mode, side in (
            (run_jax, qj, a.malloc, "oftjax"),
            (run_torch, qt, a.torch_malloc, "torch"),
        ):
            # no other side: every turn is this process's own (a semaphore no count will exhaust)
            turns = Turns(ctx.Semaphore(2**30), ctx.Semaphore(0), a.turn_steps)
            p = ctx.Process(target=target, args=(a, q, turns))
            with _preloaded(mode, keep_through_turns=False):  # steps back to back, as `oftjax train`
                p.start()
            try:
                results.append(_result(q, p, side))
            finally:
                _stop([p])
        return results[0], results[1]
    jax_turn, torch_turn = ctx.Semaphore(1), ctx.Semaphore(0)
    pj = ctx.Process(target=run_jax, args=(a, qj, Turns(jax_turn, torch_turn, a.turn_steps)))
    pt = ctx.Process(target=run_torch, args=(a, qt, Turns(torch_turn, jax_turn, a.turn_steps)))
    with _preloaded(a.malloc, keep_through_turns=a.turn_steps == 1):
        pj.start()
    with _preloaded(a.torch_malloc, keep_through_turns=a.turn_steps == 1):
        pt.start()
    try:
        jx, th = _result(qj, pj, "oftjax"), _result(qt, pt, "torch")
    finally:
        _stop([pj, pt])
    return jx, th


def _stop(procs: list) -> None:
    for p in procs:
        if p.is_alive() and p.exitcode is None:
            p.join(timeout=60)
        if p.is_alive():
            p.terminate()


def _result(q: mp.Queue, proc: mp.Process, side: str) -> dict:
    """The side's result, or an error as soon as its process dies without one (no hang on a dead child)."""
    import queue

    while True:
        try:
            return q.get(timeout=5)
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(
                    f"the {side} benchmark process exited with code {proc.exitcode} before reporting "
                    "(its traceback is above)"
                ) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(p, steps=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--turn-steps",
        type=int,
        default=1,
        help="steps per turn, the last one timed (default %(default)s). With 2 or more each side's timed "
        "step follows one of its own, as in a training run, and the other process is at rest beside it: the "
        "block cache returns its free blocks after a second, as in `oftjax train` (with 1 it keeps them "
        "through the other side's turn)",
    )
    p.add_argument(
        "--alone",
        action="store_true",
        help="run the oftjax side, then the torch side, each with nothing beside it (no turn-taking: the two "
        "see the machine at different times, so the load average before and after matters more)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument(
        "--malloc",
        choices=["cache", "keep", "default"],
        default="cache",
        help="allocator setting (oftjax/cli/_malloc.py; default: %(default)s, as `oftjax train` runs)",
    )
    p.add_argument(
        "--torch-malloc",
        choices=["cache", "keep", "default"],
        default=None,
        help="the torch side's allocator setting (default: --malloc's)",
    )
    p.add_argument(
        "--cpu-kernels",
        choices=["on", "off"],
        default="on",
        help="oftjax's opt-in CPU kernels (on: as `oftjax train` runs on a CPU; off: the pure-JAX library)",
    )
    p.add_argument(
        "--family",
        choices=(
            "qwen3-0.6b",
            "gemma-2-2b",
            "gemma-3-270m",
            "gemma-3-1b",
            "phi-3-mini-4k",
            "phi-3-mini-128k",
        ),
        default=None,
        help="a published config cut to --layers layers, random weights (family_checkpoint)",
    )
    a = p.parse_args(argv)
    if a.torch_malloc is None:
        a.torch_malloc = a.malloc
    family_checkpoint(a)
    apply_model_shape(a)
    load0 = os.getloadavg()[0]
    jx, th = _run_both(a)
    load1 = os.getloadavg()[0]
    ratio = jx["tokens_per_s"] / th["tokens_per_s"]
    gemm, attn = step_flops(a)
    what = (
        f"{a.model} (hidden {a.hidden} x {a.layers} layers)"
        if a.model
        else f"Llama hidden {a.hidden} x {a.layers} layers"
    )
    print(
        f"train step, {what}, seq {a.seq}, batch {a.batch}, "
        f"vocab {a.vocab}; NF4 + DQ base, OFT b=32 on {len(targets(a))} projections "
        f"({jx['trainable']:,} trainable); {(gemm + attn) / 1e9:.1f} GFLOP/step in GEMMs + attention; "
        f"oftjax: {jx['kernels']}"
    )
    if jx["trainable"] != th["trainable"]:
        print(f"WARNING: trainable parameters differ: oftjax {jx['trainable']:,}, torch {th['trainable']:,}")

    def row(label: str, ours: str, theirs: str = "", r: str = "") -> None:
        print(f"| {label:<34} | {ours:>18} | {theirs:>18} | {r:>5} |")

    row("", f"oftjax ({jx['backend']})", f"PEFT+bnb ({th['backend']})", "ratio")
    print(f"|{'-' * 36}|{'-' * 20}|{'-' * 20}|-------|")
    row("tokens/s", f"{jx['tokens_per_s']:,.0f}", f"{th['tokens_per_s']:,.0f}", f"{ratio:.2f}")
    # each round's two steps ran back to back, so their ratio sees one machine state
    paired = statistics.median(t / j for j, t in zip(jx["step_times"], th["step_times"], strict=True))
    row("ratio, median over rounds", "", "", f"{paired:.2f}")
    row("step time (s, median)", f"{jx['step_s']:.3f}", f"{th['step_s']:.3f}")
    row("GEMM floor (s, median)", f"{jx['floor_s']:.3f}", f"{th['floor_s']:.3f}")
    gf = lambda s: f"{(gemm + attn) / s / 1e9:.0f}"  # noqa: E731
    row("step GFLOP/s (GEMM+attention)", gf(jx["step_s"]), gf(th["step_s"]))
    row("floor GFLOP/s", f"{gemm / jx['floor_s'] / 1e9:.0f}", f"{gemm / th['floor_s'] / 1e9:.0f}")
    out_j, out_t = 1 - jx["floor_s"] / jx["step_s"], 1 - th["floor_s"] / th["step_s"]
    row("step time outside floor GEMMs", f"{out_j:.0%}", f"{out_t:.0%}")
    bound = th["step_s"] / jx["floor_s"]
    row("ratio bound (torch step/JAX floor)", "", "", f"{bound:.2f}")
    row("page faults per step", f"{jx['faults_per_step']:,.0f}", f"{th['faults_per_step']:,.0f}")
    for label, key in (
        ("peak RSS, training (MB)", "peak_rss_training_mb"),
        ("peak RSS, + floor (MB)", "peak_rss_mb"),
    ):
        rss = jx[key] / th[key]
        row(label, f"{jx[key]:,.0f}", f"{th[key]:,.0f}", f"{rss:.2f}")
    if jx["compiled_mb"]:
        c = jx["compiled_mb"]
        row("JAX step args/out/temp (MB)", f"{c['argument']:.1f}/{c['output']:.1f}/{c['temp']:.1f}")
    bpp = jx["base_bytes_per_param_linears"]
    row("base bytes/param (NF4+DQ linears)", f"{bpp:.4f}")
    row("base bytes/param (whole base)", f"{jx['base_bytes_per_param_all']:.4f}")
    print(f"malloc: oftjax {jx['malloc']}; torch {th['malloc']}")
    if a.alone:
        print("each side alone, oftjax first, then torch (no turn-taking)")
    if a.turn_steps > 1:
        print(
            f"{a.turn_steps} steps per turn, the last timed: each side's timed step follows one of its own, "
            "the other process at rest"
        )
    print(
        f"1-min load average {load0:.2f} before, {load1:.2f} after ({os.cpu_count()} CPUs): above ~0.5 other "
        "processes shared the cores; torch's OpenMP threads slow down far more than XLA's under such load"
    )
    met = lambda ok: "met" if ok else "NOT met"
    print(
        f"targets: throughput ratio >= 1.5: {met(ratio >= 1.5)}; "
        f"NF4+DQ <= 0.52 bytes/param: {met(bpp <= 0.52)}; peak RSS (training) <= torch's: "
        f"{met(jx['peak_rss_training_mb'] <= th['peak_rss_training_mb'])}"
        + ("" if load0 < 1.0 else " (NOT a quiet-machine figure: rerun when the load average is < 1)")
    )
    if a.json:
        a.json.write_text(json.dumps({"oftjax": jx, "torch": th, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
