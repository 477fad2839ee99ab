"""``oftjax train``: load (or pretrain) a base, quantize it, apply OFT, train with optax, write an adapter."""

from __future__ import annotations

import argparse
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


def run_train(args: argparse.Namespace) -> int:
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from interop.hf_model import load_model
    from interop.peft import save_adapter
    from oftjax.config import OFTConfig
    from oftjax.data import ByteTokenizer, load_tokenizer, read_texts, split, tokenize
    from oftjax.surgery import apply_oft, trainable_count
    from oftjax.train import TrainConfig, fit, make_mesh, quantize_model

    if args.malloc == "keep":  # before JAX's first computation: see oftjax/cli/_malloc.py
        from oftjax.cli._malloc import keep_freed_memory

        keep_freed_memory()
    _validate(args)
    _prepare_output(args)
    t0 = time.perf_counter()
    out: Path = args.output
    default_model = args.model is None
    progress = not args.quiet

    # --- text
    pretrain_texts = ft_texts = None
    if default_model:
        pretrain_texts, ft_texts, ft_what = dj.default_texts(args.max_data_bytes)
        mb = sum(len(t) for _, t in pretrain_texts) / 1e6
        _say(
            args,
            f"data: pretraining on {len(pretrain_texts)} files ({mb:.1f} MB) of Python standard library "
            f"sources; fine-tuning on {ft_what}",
        )
    if args.data is not None:
        ft_texts = read_texts(args.data, max_bytes=args.max_data_bytes)
        mb = sum(len(t) for _, t in ft_texts) / 1e6
        _say(args, f"data: fine-tuning on {len(ft_texts)} files ({mb:.1f} MB) from {args.data}")
    elif not default_model:
        ft_texts = read_texts(dj.stdlib_dir(), max_bytes=args.max_data_bytes)
        _say(args, f"data: fine-tuning on {len(ft_texts)} Python standard library source files")

    # --- base model
    summary: dict[str, Any] = {}
    if default_model:
        model_dir = out / "base"
        if (model_dir / "config.json").is_file():
            _say(args, f"base: reusing the pretrained default model in {model_dir}")
        else:
            _say(
                args,
                f"base: pretraining the default {dj.BASE_CONFIG['num_hidden_layers']}-layer Llama "
                f"(hidden {dj.BASE_CONFIG['hidden_size']}, byte vocabulary) for {args.pretrain_steps} steps",
            )
            summary["pretrain"] = pretrain_base(
                model_dir,
                tokenize([t for _, t in pretrain_texts], ByteTokenizer()),
                run_dir=out,
                seed=args.seed,
                steps=args.pretrain_steps,
                progress=progress,
            )
    else:
        model_dir = args.model
    compute = jnp.bfloat16 if args.bf16 else None
    model = load_model(model_dir, compute_dtype=compute)
    if args.remat and hasattr(getattr(model, "model", None), "remat"):
        model.model.remat = True
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        _fail(
            f"{model_dir}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size}"
        )

    ck_quant = checkpoint_quant(model)
    if ck_quant is not None:
        if args.quant not in (None, "none", ck_quant):
            _fail(
                f"{model_dir}: checkpoint is already quantized ({ck_quant}); --quant {args.quant} would "
                "quantize twice (omit --quant or pass the same format)"
            )
        quant = ck_quant
        _say(args, f"base: {model_dir} ({quant} checkpoint, kept packed)")
    else:
        quant = args.quant or "nf4"
        paths = quantize_model(
            model, quant, double_quant=args.double_quant, compute_dtype=compute or jnp.float32
        )
        if paths:
            dq = " + double quant" if quant in ("nf4", "fp4") and args.double_quant else ""
            _say(args, f"base: quantized {len(paths)} linears to {quant}{dq} (bitsandbytes format)")
    bpp, n_frozen = _frozen_bytes_per_param(model)

    # --- OFT
    targets = [m.strip() for m in args.target_modules.split(",") if m.strip()]
    oft_cfg = OFTConfig(
        r=0,
        oft_block_size=args.oft_block_size,
        target_modules=targets,
        task_type="CAUSAL_LM",
        use_cayley_neumann=args.cayley == "neumann",
        base_model_name_or_path=str(Path(model_dir).resolve()),
    )
    matched = apply_oft(model, oft_cfg, rngs=nnx.Rngs(args.seed))
    n_train = trainable_count(model)
    _say(
        args,
        f"OFT: {len(matched)} layers, block size {args.oft_block_size}, {n_train:,} trainable parameters "
        f"({n_frozen:,} frozen {quant if quant != 'none' else 'float'} weights at {bpp:.3f} bytes/parameter)",
    )

    # --- data
    docs = tokenize([t for _, t in ft_texts], tokenizer)
    packed = _pack(docs, tokenizer, args.seq_len)
    train, evald = split(packed, args.eval_fraction, seed=args.seed)
    if len(train) < args.batch_size:
        _fail(
            f"only {len(train)} training sequences of {args.seq_len} tokens; need at least --batch-size "
            f"{args.batch_size} (more data or a shorter --seq-len)"
        )
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
        eval_every=args.eval_every,
        save_every=args.save_every,
    )
    mesh = make_mesh(*_parse_mesh(args.mesh)) if args.mesh else None

    def write_adapter(m, path: Path) -> None:
        save_adapter(m, path, force=True, config=oft_cfg)

    _say(
        args,
        f"train: {len(train)} sequences x {args.seq_len} tokens ({len(evald)} held out), {args.steps} "
        f"steps of {args.batch_size} sequences",
    )
    res = fit(
        model,
        cfg,
        train,
        eval_data=evald,
        output_dir=out,
        mesh=mesh,
        write_adapter=write_adapter,
        resume=args.resume,
        progress=progress,
        desc="OFT fine-tune",
    )
    recs = res.records
    k = max(1, min(10, len(recs) // 5))
    first = float(np.mean([r["loss"] for r in recs[:k]])) if recs else float("nan")
    last = float(np.mean([r["loss"] for r in recs[-k:]])) if recs else float("nan")
    tok_s = float(np.median([r["tokens_per_s"] for r in recs[1:]])) if len(recs) > 1 else float("nan")
    summary.update(
        {
            "base": str(model_dir),
            "quant": quant,
            "bytes_per_frozen_param": bpp,
            "oft_layers": len(matched),
            "trainable_params": n_train,
            "train_loss_first": first,
            "train_loss_last": last,
            "eval_loss_before": res.eval_loss_before,
            "eval_loss_after": res.eval_loss_after,
            "tokens_per_s": tok_s,
            "seconds": time.perf_counter() - t0,
        }
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ev = ""
    if res.eval_loss_before is not None and res.eval_loss_after is not None:
        ev = f"; eval {res.eval_loss_before:.3f} -> {res.eval_loss_after:.3f}"
    _say(
        args,
        f"done in {summary['seconds']:.0f} s: OFT train loss {first:.3f} -> {last:.3f} (mean of first/last "
        f"{k} steps){ev}; {tok_s:,.0f} tokens/s",
    )
    _say(args, f"wrote {out / 'adapter'} (PEFT adapter), {out / 'metrics.jsonl'}, {out / 'loss.png'}")
    return 0
