"""``oftjax train``: load (or pretrain) a base, quantize it, apply OFT, train with optax, write an adapter.

Data: ``oftjax/cli/_train_data.py``. The run stops with exit status 1 when training diverges (``fit``'s
guard; the last good checkpoint and adapter are kept); its last line says whether the held-out loss improved.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

from oftjax import default_job as dj
from oftjax.cli import CLIError
from oftjax.cli._samples import check_sample_args, finish_samples, start_samples
from oftjax.cli._train_args import fail as _fail
from oftjax.cli._train_args import join_processes
from oftjax.cli._train_args import parse_mesh as _parse_mesh
from oftjax.cli._train_args import prepare_output as _prepare_output
from oftjax.cli._train_args import validate as _validate
from oftjax.cli._train_data import TrainData, check_data_args, datasets, read_data, resolve_data_names
from oftjax.cli._train_summary import run_facts, summarize, write_summary
from oftjax.train._distributed import exit_on_peer_failure, is_primary, primary_flag

# fit stops a run whose smoothed loss passes this multiple of its start (oftjax.train.fit)
DIVERGENCE_FACTOR = 2.0

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


def malloc_setting(args: argparse.Namespace) -> str:
    """``--malloc``, or its default: the block cache (``oftjax/cli/_malloc.py``) with ``--model``, whose step
    buffers are hundreds of MB to GBs; glibc as configured for the embedded model, whose short steps gain
    more from asynchronous dispatch than they lose to page faults (benchmarks/RESULTS.md, "Allocator")."""
    if args.malloc is not None:
        return args.malloc
    return "cache" if args.model is not None else "default"


def _apply_malloc(args: argparse.Namespace) -> str:
    """Apply ``--malloc`` before JAX's first computation; returns what was done (one line, for the log).

    ``cache`` starts the command again with the block cache preloaded where it was run as a process of its
    own (the ``oftjax`` command); an in-process call (tests, notebooks) goes on without it."""
    from oftjax.cli import _malloc

    if args.malloc == "keep":
        return _malloc.keep_freed_memory()
    if args.malloc == "cache":
        if getattr(args, "own_process", False):
            _malloc.exec_with_block_cache(args.argv)  # returns only where it cannot
        said = _malloc.block_cache_status() + _malloc.pair_with_block_cache()
        _malloc.forget_block_cache_env()
        return said
    return "glibc as configured"


def run_train(args: argparse.Namespace) -> int:
    """``oftjax train``: text, base model, quantization, OFT, datasets, training, summary."""
    args.malloc = malloc_setting(args)
    malloc = _apply_malloc(args)
    join_processes(args)  # before anything touches a JAX device
    with exit_on_peer_failure("oftjax train"):
        _resolve_arguments(args)
        _validate(args)
        check_sample_args(args)
        check_data_args(args)
        _prepare_output_once(args)
        t0 = time.perf_counter()
        summary: dict[str, Any] = {"malloc": malloc}
        _say(args, f"malloc: {malloc}")
        with _cpu_kernels(args):
            data = read_data(args, _sayer(args))
            base = _load_base(args, _base_dir(args, data, summary))
            _quantize(args, base)
            adapter = _apply_oft(args, base)
            train, evald, summary["data"] = datasets(args, data, base.model_dir, base.tokenizer, _sayer(args))
            samples = start_samples(args, data, base, evald, _sayer(args))  # samples.md: base answers
            res = _train(args, base, adapter, train, evald, summary)
            finish_samples(samples, res.model)  # and the fine-tuned ones
        if is_primary():
            summarize(args, base, adapter, res, summary, time.perf_counter() - t0)
    return 0


def _prepare_output_once(args: argparse.Namespace) -> None:
    """The run directory's overwrite/resume policy and ``run.json``: process 0 applies it, and every
    process of a multi-process run stops when it refused."""
    error = None
    if is_primary():
        try:
            _prepare_output(args)
        except CLIError as e:
            error = e
    if primary_flag(error is not None) and error is None:
        _fail(f"{args.output}: process 0 refused the run directory (its error says why)")
    if error is not None:
        raise error


def _sayer(args: argparse.Namespace):
    return lambda msg: _say(args, msg)


def _resolve_arguments(args: argparse.Namespace) -> None:
    """Before validation: ``--model`` as a directory (a Hub id looked up in the local cache), named data
    sets, and the defaults that depend on ``--model`` (a pretrained checkpoint needs a far lower rate than
    the embedded model: ``oftjax.default_job.REAL_MODEL``)."""
    from oftjax.cli._model_source import resolve_model

    if args.model is not None:
        args.model = resolve_model(args.model)
    resolve_data_names(args)
    defaults = dj.FINETUNE if args.model is None else dj.REAL_MODEL
    for name, key in (("lr", "learning_rate"), ("steps", "steps"), ("batch_size", "batch_size")):
        if getattr(args, name) is None:
            setattr(args, name, defaults[key])
    if args.seq_len is None:
        args.seq_len = defaults["seq_len"]
    if args.eval_batches < 1:
        _fail(f"--eval-batches must be >= 1, got {args.eval_batches}")


def _cpu_kernels(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """``--cpu-kernels on``: the opt-in CPU kernels for this run, ``off``: pure JAX; the process's previous
    setting comes back when the run ends (a command called in-process leaves its caller as it was)."""
    from oftjax import cpu_kernels

    return cpu_kernels.enable() if args.cpu_kernels == "on" else cpu_kernels.disable()


def _base_dir(args: argparse.Namespace, data: TrainData, summary: dict) -> Path:
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
        tokenize([t for _, t in data.pretrain], ByteTokenizer()),
        run_dir=args.output,
        seed=args.seed,
        steps=args.pretrain_steps,
        progress=not args.quiet,
    )
    return model_dir


def _load_base(args: argparse.Namespace, model_dir: Path) -> _Base:
    """The checkpoint as an oftjax model (``--dtype``, remat as asked) and its tokenizer."""
    from interop.hf_model import load_model
    from oftjax.data import load_tokenizer

    model = load_model(model_dir, dtype=args.dtype, strict=args.strict_config)
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
        compute = jnp.dtype(args.dtype)
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


def _mesh(args: argparse.Namespace):
    """``--mesh``; by default one device, or data parallelism over every device of a multi-process run."""
    import jax

    from oftjax.train import make_mesh

    if args.mesh:
        return make_mesh(*_parse_mesh(args.mesh))
    return make_mesh() if jax.process_count() > 1 else None


def _train(args: argparse.Namespace, base: _Base, adapter: _Adapter, train, evald, summary: dict):
    """``fit`` with the command's settings; the adapter is written in PEFT format. A diverged run writes
    its summary and fails with ``fit``'s message (the last good checkpoint and adapter are kept)."""
    from interop.peft import save_adapter
    from oftjax.train import TrainConfig, fit
    from oftjax.train._loop import TrainingDiverged

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
        eval_batches=args.eval_batches,
    )

    def write_adapter(m, path: Path) -> None:
        save_adapter(m, path, force=True, config=adapter.config)

    n_eval = len(evald) if evald is not None else 0
    _say(
        args,
        f"train: {len(train)} sequences x {args.seq_len} tokens ({n_eval} held out), {args.steps} "
        f"steps of {args.batch_size} sequences, peak learning rate {args.lr:g}, {args.dtype}",
    )
    try:
        return fit(
            base.model,
            cfg,
            train,
            eval_data=evald,
            output_dir=args.output,
            mesh=_mesh(args),
            write_adapter=write_adapter,
            resume=args.resume,
            progress=not args.quiet,
            desc="OFT fine-tune",
            divergence_factor=DIVERGENCE_FACTOR,
        )
    except TrainingDiverged as e:
        summary.update(run_facts(base, adapter))
        summary["diverged"] = {"step": e.step, "loss": e.loss, "checkpoint": str(e.checkpoint or "")}
        if is_primary():
            write_summary(args.output, summary)
        _fail(f"{e} (--lr {args.lr:g}; metrics in {args.output / 'metrics.jsonl'})")
