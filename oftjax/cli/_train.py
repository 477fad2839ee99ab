"""``oftjax train``: load (or pretrain) a base, quantize it, apply OFT, train with optax, write an adapter."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from oftjax import default_job as dj
from oftjax.cli._train_args import fail as _fail
from oftjax.cli._train_args import parse_mesh as _parse_mesh
from oftjax.cli._train_args import prepare_output as _prepare_output
from oftjax.cli._train_args import validate as _validate

__all__ = ["checkpoint_quant", "pretrain_base", "run_train"]


def _say(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(msg, flush=True)


def _pack(docs, tokenizer, seq_len):
    from oftjax.data import pack

    return pack(docs, seq_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)


def pretrain_base(
    base_dir: Path, docs: list, *, run_dir: Path, seed: int, steps: int, progress: bool
) -> dict:
    """Pretrain the embedded default Llama on ``docs`` (full parameters) and save it as an HF checkpoint."""
    from flax import nnx

    from interop.hf_model import save_model
    from oftjax.data import ByteTokenizer, split
    from oftjax.models import LlamaForCausalLM, ModelConfig
    from oftjax.train import TrainConfig, fit

    tok = ByteTokenizer()
    model = LlamaForCausalLM(ModelConfig.from_hf(dj.BASE_CONFIG), rngs=nnx.Rngs(seed))
    train, evald = split(_pack(docs, tok, dj.PRETRAIN["seq_len"]), 0.02, seed=seed)
    cfg = TrainConfig(
        **{**dj.PRETRAIN, "steps": steps}, seed=seed, eval_every=100, save_every=0, weight_decay=0.01
    )
    res = fit(
        model,
        cfg,
        train,
        eval_data=evald,
        output_dir=run_dir / "pretrain",
        wrt=nnx.Param,
        progress=progress,
        desc="pretrain base",
        plot_title="pretraining loss (full parameters)",
    )
    save_model(res.model, base_dir)
    return {
        "loss_first": res.records[0]["loss"],
        "loss_last": res.records[-1]["loss"],
        "eval_after": res.eval_loss_after,
        "seconds": res.seconds,
    }


def checkpoint_quant(model) -> str | None:
    from interop.hf_model import quantization_config

    q = quantization_config(model)
    if q is None:
        return None
    if q.get("load_in_8bit"):
        return "int8"
    return q.get("bnb_4bit_quant_type", "fp4")


def _frozen_bytes_per_param(model) -> tuple[float, int]:
    """Bytes per weight of the quantized linears (packed leaves' nbytes / weights), or of the float linears
    when nothing is quantized; and that weight count. Embeddings, norms and lm_head are not included."""
    import jax
    import numpy as np
    from flax import nnx

    from oftjax.nn import Linear4bit, Linear8bit

    quant = [0, 0]
    flt = [0, 0]
    for _, m in nnx.iter_graph(model):
        if isinstance(m, Linear4bit | Linear8bit):
            quant[0] += sum(np.asarray(x).nbytes for x in jax.tree.leaves(m.weight.get_value()))
            quant[1] += m.in_features * m.out_features
        elif type(m) is nnx.Linear:
            k = m.kernel.get_value()
            flt[0] += k.size * k.dtype.itemsize
            flt[1] += k.size
    nbytes, params = quant if quant[1] else flt
    return (nbytes / params if params else 0.0), params


@dataclasses.dataclass
class _Texts:
    """The run's text: what pretrains the default base (None with ``--model``) and what OFT trains on."""

    pretrain: list[tuple[str, str]] | None
    finetune: list[tuple[str, str]]


@dataclasses.dataclass
class _Base:
    """The loaded (and quantized) base model and what the summary says about it."""

    model: Any
    model_dir: Path
    tokenizer: Any
    quant: str = "none"
    bytes_per_param: float = 0.0
    frozen_params: int = 0


@dataclasses.dataclass
class _Adapter:
    """The OFT adapter applied to the base: its config, the wrapped module paths, its parameter count."""

    config: Any
    layers: list[str]
    trainable: int


def run_train(args: argparse.Namespace) -> int:
    """``oftjax train``: text, base model, quantization, OFT, datasets, training, summary."""
    if args.malloc == "keep":  # before JAX's first computation: see oftjax/cli/_malloc.py
        from oftjax.cli._malloc import keep_freed_memory

        keep_freed_memory()
    _validate(args)
    _prepare_output(args)
    t0 = time.perf_counter()
    with _cpu_kernels(args):
        texts = _read_data(args)
        summary: dict[str, Any] = {}
        base = _load_base(args, _base_dir(args, texts, summary))
        _quantize(args, base)
        adapter = _apply_oft(args, base)
        train, evald = _datasets(args, texts, base.tokenizer)
        res = _train(args, base, adapter, train, evald)
    _summarize(args, base, adapter, res, summary, time.perf_counter() - t0)
    return 0


def _cpu_kernels(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """``--cpu-kernels on``: the opt-in CPU kernels for this run, ``off``: pure JAX; the process's previous
    setting comes back when the run ends (a command called in-process leaves its caller as it was)."""
    from oftjax import cpu_kernels

    return cpu_kernels.enable() if args.cpu_kernels == "on" else cpu_kernels.disable()


def _read_data(args: argparse.Namespace) -> _Texts:
    """The default job's two slices, ``--data``, or (``--model`` alone) the standard library's sources."""
    from oftjax.data import read_texts

    pretrain = finetune = None
    if args.model is None:
        pretrain, finetune, ft_what = dj.default_texts(args.max_data_bytes)
        mb = sum(len(t) for _, t in pretrain) / 1e6
        _say(
            args,
            f"data: pretraining on {len(pretrain)} files ({mb:.1f} MB) of Python standard library "
            f"sources; fine-tuning on {ft_what}",
        )
    if args.data is not None:
        finetune = read_texts(args.data, max_bytes=args.max_data_bytes)
        mb = sum(len(t) for _, t in finetune) / 1e6
        _say(args, f"data: fine-tuning on {len(finetune)} files ({mb:.1f} MB) from {args.data}")
    elif args.model is not None:
        finetune = read_texts(dj.stdlib_dir(), max_bytes=args.max_data_bytes)
        _say(args, f"data: fine-tuning on {len(finetune)} Python standard library source files")
    return _Texts(pretrain, finetune)


def _base_dir(args: argparse.Namespace, texts: _Texts, summary: dict) -> Path:
    """``--model``, or the default base in ``OUTPUT/base`` (pretrained there first when it is not yet)."""
    from oftjax.data import ByteTokenizer, tokenize

    if args.model is not None:
        return args.model
    model_dir = args.output / "base"
    if (model_dir / "config.json").is_file():
        _say(args, f"base: reusing the pretrained default model in {model_dir}")
        return model_dir
    _say(
        args,
        f"base: pretraining the default {dj.BASE_CONFIG['num_hidden_layers']}-layer Llama "
        f"(hidden {dj.BASE_CONFIG['hidden_size']}, byte vocabulary) for {args.pretrain_steps} steps",
    )
    summary["pretrain"] = pretrain_base(
        model_dir,
        tokenize([t for _, t in texts.pretrain], ByteTokenizer()),
        run_dir=args.output,
        seed=args.seed,
        steps=args.pretrain_steps,
        progress=not args.quiet,
    )
    return model_dir


def _load_base(args: argparse.Namespace, model_dir: Path) -> _Base:
    """The checkpoint as an oftjax model (bf16 compute and remat as asked) and its tokenizer."""
    import jax.numpy as jnp

    from interop.hf_model import load_model
    from oftjax.data import load_tokenizer

    model = load_model(model_dir, compute_dtype=jnp.bfloat16 if args.bf16 else None)
    if args.remat and hasattr(getattr(model, "model", None), "remat"):
        model.model.remat = True
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        _fail(
            f"{model_dir}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size}"
        )
    return _Base(model, model_dir, tokenizer)


def _quantize(args: argparse.Namespace, base: _Base) -> None:
    """Keep a bnb checkpoint's format, or quantize a float one to ``--quant`` (default nf4)."""
    import jax.numpy as jnp

    from oftjax.train import quantize_model

    ck_quant = checkpoint_quant(base.model)
    if ck_quant is not None:
        if args.quant not in (None, "none", ck_quant):
            _fail(
                f"{base.model_dir}: checkpoint is already quantized ({ck_quant}); --quant {args.quant} would "
                "quantize twice (omit --quant or pass the same format)"
            )
        base.quant = ck_quant
        _say(args, f"base: {base.model_dir} ({ck_quant} checkpoint, kept packed)")
    else:
        base.quant = args.quant or "nf4"
        compute = jnp.bfloat16 if args.bf16 else jnp.float32
        paths = quantize_model(base.model, base.quant, double_quant=args.double_quant, compute_dtype=compute)
        if paths:
            dq = " + double quant" if base.quant in ("nf4", "fp4") and args.double_quant else ""
            _say(args, f"base: quantized {len(paths)} linears to {base.quant}{dq} (bitsandbytes format)")
    base.bytes_per_param, base.frozen_params = _frozen_bytes_per_param(base.model)


def _apply_oft(args: argparse.Namespace, base: _Base) -> _Adapter:
    """OFT on ``--target-modules`` (block size ``--oft-block-size``, ``--cayley``); only rotations train."""
    from flax import nnx

    from oftjax.config import OFTConfig
    from oftjax.surgery import apply_oft, trainable_count

    oft_cfg = OFTConfig(
        r=0,
        oft_block_size=args.oft_block_size,
        target_modules=[m.strip() for m in args.target_modules.split(",") if m.strip()],
        task_type="CAUSAL_LM",
        use_cayley_neumann=args.cayley == "neumann",
        base_model_name_or_path=str(Path(base.model_dir).resolve()),
    )
    matched = apply_oft(base.model, oft_cfg, rngs=nnx.Rngs(args.seed))
    n_train = trainable_count(base.model)
    weights = base.quant if base.quant != "none" else "float"
    _say(
        args,
        f"OFT: {len(matched)} layers, block size {args.oft_block_size}, {n_train:,} trainable parameters "
        f"({base.frozen_params:,} frozen {weights} weights at {base.bytes_per_param:.3f} bytes/parameter)",
    )
    return _Adapter(oft_cfg, matched, n_train)


def _datasets(args: argparse.Namespace, texts: _Texts, tokenizer: Any):
    """The fine-tuning text tokenized, packed into ``--seq-len`` rows and split into (train, held out)."""
    from oftjax.data import split, tokenize

    packed = _pack(tokenize([t for _, t in texts.finetune], tokenizer), tokenizer, args.seq_len)
    train, evald = split(packed, args.eval_fraction, seed=args.seed)
    if len(train) < args.batch_size:
        _fail(
            f"only {len(train)} training sequences of {args.seq_len} tokens; need at least --batch-size "
            f"{args.batch_size} (more data or a shorter --seq-len)"
        )
    return train, evald


def _train(args: argparse.Namespace, base: _Base, adapter: _Adapter, train, evald):
    """``fit`` with the command's settings; the adapter is written in PEFT format."""
    from interop.peft import save_adapter
    from oftjax.train import TrainConfig, fit, make_mesh

    cfg = TrainConfig(
        steps=args.steps,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seq_len=args.seq_len,
        seed=args.seed,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        log_every=args.log_every,
        eval_every=args.eval_every,
        save_every=args.save_every,
    )

    def write_adapter(m, path: Path) -> None:
        save_adapter(m, path, force=True, config=adapter.config)

    _say(
        args,
        f"train: {len(train)} sequences x {args.seq_len} tokens ({len(evald)} held out), {args.steps} "
        f"steps of {args.batch_size} sequences",
    )
    return fit(
        base.model,
        cfg,
        train,
        eval_data=evald,
        output_dir=args.output,
        mesh=make_mesh(*_parse_mesh(args.mesh)) if args.mesh else None,
        write_adapter=write_adapter,
        resume=args.resume,
        progress=not args.quiet,
        desc="OFT fine-tune",
    )


def _summarize(args: argparse.Namespace, base: _Base, adapter: _Adapter, res, summary: dict, seconds: float):
    """``summary.json`` and the closing lines: loss of the first/last steps, eval loss, tokens/s.

    Tokens/s is the median over the steps after the first (whose window includes compilation) of each
    step's window throughput (see ``oftjax.train.fit``).
    """
    import numpy as np

    out: Path = args.output
    recs = res.records
    k = max(1, min(10, len(recs) // 5))
    first = float(np.mean([r["loss"] for r in recs[:k]])) if recs else float("nan")
    last = float(np.mean([r["loss"] for r in recs[-k:]])) if recs else float("nan")
    tok_s = float(np.median([r["tokens_per_s"] for r in recs[1:]])) if len(recs) > 1 else float("nan")
    summary.update(
        {
            "base": str(base.model_dir),
            "quant": base.quant,
            "bytes_per_frozen_param": base.bytes_per_param,
            "oft_layers": len(adapter.layers),
            "trainable_params": adapter.trainable,
            "train_loss_first": first,
            "train_loss_last": last,
            "eval_loss_before": res.eval_loss_before,
            "eval_loss_after": res.eval_loss_after,
            "tokens_per_s": tok_s,
            "seconds": seconds,
        }
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ev = ""
    if res.eval_loss_before is not None and res.eval_loss_after is not None:
        ev = f"; eval {res.eval_loss_before:.3f} -> {res.eval_loss_after:.3f}"
    _say(
        args,
        f"done in {seconds:.0f} s: OFT train loss {first:.3f} -> {last:.3f} (mean of first/last "
        f"{k} steps){ev}; {tok_s:,.0f} tokens/s",
    )
    _say(args, f"wrote {out / 'adapter'} (PEFT adapter), {out / 'metrics.jsonl'}, {out / 'loss.png'}")
