"""``oftjax parity``: the same model + adapter in torch (transformers + bitsandbytes + PEFT) and in JAX.

Both sides load the checkpoint (a directory, or a Hub id in the local cache) in the same ``--dtype``
(quantizing a float checkpoint on load with ``--quant``, as ``BitsAndBytesConfig`` does, with that compute
dtype; a bnb checkpoint keeps its own format) and attach the PEFT adapter; the JAX side uses
``interop.hf.load_model`` + ``interop.peft.load_adapter``, the torch side ``interop.oracle``. The same
seeded token ids go through both; the table gives, for the logits (and with ``--per-layer`` each decoder
layer's output), the max absolute error, the max error relative to the largest torch magnitude, and the top-1
agreement of the logits, judged by the tolerance of that dtype (``TOLERANCE``). Both sides run inference
(torch ``model.eval()``, JAX ``nnx.view(model, deterministic=True)``): 8-bit layers compute LLM.int8 as
transformers does; ``--int8-mode train`` compares their training forward instead (dequantize, then a float
matmul). Exit status: 0 within tolerance, 3 beyond it, 1 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "LLM_INT8_TOLERANCE",
    "TOLERANCE",
    "Tolerance",
    "add_parity_parser",
    "compare",
    "jax_outputs",
    "run_parity",
]


class Tolerance(NamedTuple):
    """A verdict's limits: max |jax - torch| / max |torch| on the logits, and the least top-1 agreement."""

    rtol: float
    min_top1: float
    reason: str


# The one table of parity limits, by the dtype both sides compute in.
TOLERANCE: dict[str, Tolerance] = {
    "float32": Tolerance(
        1e-4,
        0.99,
        "fp32 on both sides: only the summation order of matmuls differs (~1e-6 relative through a few "
        "layers, a few 1e-6 through SmolLM2's 30); top-1 differs only where two logits tie to ~1e-6",
    ),
    "bfloat16": Tolerance(
        1e-1,
        0.85,
        "bf16 on both sides: each rounds activations to bf16 (2^-8 relative) after different operations "
        "(XLA fuses elementwise chains in float32, torch rounds after each) and the differences compound "
        "over the layers, so that near-ties of the top logits flip; the limits sit where two bf16 "
        "implementations inside torch itself (SDPA and eager attention) already differ on a 30-layer model "
        "(benchmarks/RESULTS.md, parity on SmolLM2)",
    ),
}
# 8-bit layers in eval mode (LLM.int8): the verdict takes the looser of these limits and the dtype's.
LLM_INT8_TOLERANCE = Tolerance(
    1.5e-1,
    0.75,
    "LLM.int8 rounds each activation row to int8 (steps of max |row| / 127) and sends the columns past the "
    "threshold through a float matmul; given the same input, oftjax's steps are bitsandbytes' bit for bit, "
    "but a last-bit float32 difference elsewhere (attention, norms, summation order) now and then moves a "
    "value across a rounding midpoint or a column across the threshold, a step of ~1/127 of the row's "
    "largest value, and deep models amplify these steps: on SmolLM2's 30 layers transformers with SDPA "
    "attention differs from itself with eager attention by as much as oftjax does (the table's scale row; "
    "benchmarks/RESULTS.md, generation section)",
)
INT8_MODES = ("eval", "train")  # interop.oracle.INT8_MODES; the oracle is imported only when it runs
DEFAULT_RTOL = TOLERANCE["float32"].rtol
DEFAULT_MIN_TOP1 = TOLERANCE["float32"].min_top1


def add_parity_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "parity",
        help="torch vs JAX logits table for a model + PEFT adapter",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument(
        "--model",
        type=Path,
        required=True,
        help="HF checkpoint dir (float or bnb-quantized), or a Hub id (org/name) in the local Hugging Face "
        "cache (nothing is downloaded)",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(TOLERANCE),
        default="float32",
        help="both sides load the float weights and compute in this dtype (the 4-bit compute dtype too), "
        "and the verdict uses its tolerance; float32 by default: XLA:CPU computes bfloat16 slowly "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--strict-config",
        action="store_true",
        help="refuse config.json keys oftjax does not know (default: accept them with one warning)",
    )
    p.add_argument("--adapter", type=Path, default=None, help="PEFT OFT adapter dir (default: base only)")
    p.add_argument(
        "--quant",
        choices=("nf4", "fp4", "int8", "none"),
        default="none",
        help="quantize a float checkpoint on load on both sides (default: %(default)s)",
    )
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false")
    p.add_argument(
        "--int8-mode",
        choices=INT8_MODES,
        default="eval",
        help="the forward of 8-bit layers on both sides: eval is LLM.int8 (activations quantized, outlier "
        "columns in float: torch model.eval(), JAX nnx.view(model, deterministic=True)), what transformers "
        "runs for inference; train dequantizes the weight and multiplies in float (torch model.train(), the "
        "JAX model as loaded), what training computes (default: %(default)s)",
    )
    p.add_argument("--batch", type=int, default=2, help="sequences (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="token ids are uniform random with this seed")
    p.add_argument("--per-layer", action="store_true", help="also compare every decoder layer's output")
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default: %(default)s)")
    limits = ", ".join(f"{k} {t.rtol:g}" for k, t in TOLERANCE.items())
    p.add_argument(
        "--rtol",
        type=float,
        default=None,
        help=f"max logits error relative to max |torch logits| (default by --dtype: {limits}; at least "
        f"{LLM_INT8_TOLERANCE.rtol:g} with LLM.int8)",
    )
    tops = ", ".join(f"{k} {t.min_top1:g}" for k, t in TOLERANCE.items())
    p.add_argument(
        "--min-top1",
        type=float,
        default=None,
        help=f"minimum top-1 agreement of the logits (default by --dtype: {tops}; at most "
        f"{LLM_INT8_TOLERANCE.min_top1:g} with LLM.int8)",
    )
    p.set_defaults(func=run_parity)
    return p


class _Sink:
    """Plain holder (static to NNX) for captured layer outputs."""

    def __init__(self) -> None:
        self.items: list[Any] = []


def jax_outputs(model: Any, input_ids: np.ndarray, *, per_layer: bool = False) -> tuple[np.ndarray, list]:
    """``(logits, [decoder layer outputs])`` of an oftjax Llama-family model, eagerly, as float32 numpy."""
    import jax.numpy as jnp
    from flax import nnx

    sink = _Sink()

    class _Recorder(nnx.Module):
        def __init__(self, inner: nnx.Module):
            self.inner = inner
            self.sink = sink

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            out = self.inner(*args, **kwargs)
            self.sink.items.append(out)
            return out

    layers = model.model.layers if per_layer else []
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Recorder(layer)
    try:
        logits = model(jnp.asarray(input_ids, jnp.int32))
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    as_np = lambda x: np.asarray(jnp.asarray(x).astype(jnp.float32))
    return as_np(logits), [as_np(x) for x in sink.items]


def compare(ours: np.ndarray, ref: np.ndarray, *, top1: bool = False) -> dict[str, float]:
    """Max abs error, max abs error / max |ref|, and (logits) the fraction of equal argmax positions."""
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    scale = float(np.max(np.abs(ref))) or 1.0
    out = {"max_abs": float(diff.max()), "max_rel": float(diff.max()) / scale}
    if top1:
        out["top1"] = float(np.mean(ours.argmax(-1) == ref.argmax(-1)))
    return out


def run_parity(args: argparse.Namespace) -> int:
    """``oftjax parity``: JAX and torch outputs for the same tokens, a table, the verdict as exit status.

    In bfloat16 the table also shows torch in bfloat16 against torch in float32: the size of bf16 rounding
    through the model, the scale against which the JAX-vs-torch difference is to be read. With 8-bit layers
    in LLM.int8 it shows torch with SDPA attention against torch with eager attention: how far float32
    rounding alone moves LLM.int8's result.
    """
    _check_inputs(args)
    model, ck = _jax_model(args)
    llm_int8 = args.int8_mode == "eval" and "int8" in (ck, args.quant)
    _set_limits(args, llm_int8)
    ids = np.random.default_rng(args.seed).integers(
        0, model.config.vocab_size, size=(args.batch, args.seq_len)
    )
    ids = ids.astype(np.int64)
    ours, ours_layers = jax_outputs(_inference_view(model, args, ck), ids, per_layer=args.per_layer)
    ref, ref_layers = _torch_outputs(args, ck, ids, args.dtype, per_layer=args.per_layer)
    rows = [("logits", compare(ours, ref, top1=True))]
    if args.dtype != "float32":
        # the scale of the dtype's own rounding: torch in this dtype against torch in float32
        rows.append(
            ("torch vs its fp32", compare(ref, _torch_outputs(args, ck, ids, "float32")[0], top1=True))
        )
    if llm_int8:
        sdpa = _torch_outputs(args, ck, ids, args.dtype, attn_implementation="sdpa")[0]
        rows.append(("torch SDPA vs eager", compare(sdpa, ref, top1=True)))
    for i, (a, b) in enumerate(zip(ours_layers, ref_layers, strict=True)):
        rows.append((f"layer {i} output", compare(a, b)))
    return _report(args, ck, rows)


def _set_limits(args: argparse.Namespace, llm_int8: bool) -> None:
    """``--rtol`` / ``--min-top1`` when not given: the dtype's limits, loosened to LLM.int8's ones when
    8-bit layers run it."""
    tol = TOLERANCE[args.dtype]
    rtol, min_top1 = tol.rtol, tol.min_top1
    if llm_int8:
        rtol, min_top1 = max(rtol, LLM_INT8_TOLERANCE.rtol), min(min_top1, LLM_INT8_TOLERANCE.min_top1)
    args.rtol = rtol if args.rtol is None else args.rtol
    args.min_top1 = min_top1 if args.min_top1 is None else args.min_top1


def _torch_outputs(
    args: argparse.Namespace,
    ck: str | None,
    ids: np.ndarray,
    dtype: str,
    *,
    per_layer: bool = False,
    attn_implementation: str = "eager",
) -> tuple[np.ndarray, list]:
    """The torch side's logits (and layer outputs) for ``ids``, computed in ``dtype``; eager attention, the
    computation oftjax's attention reproduces (interop/oracle.py), unless ``attn_implementation`` says."""
    from interop import oracle

    torch_model = oracle.load_causal_lm(
        args.model,
        quant=None if ck is not None or args.quant == "none" else args.quant,
        double_quant=args.double_quant,
        adapter=args.adapter,
        device=args.device,
        dtype=dtype,
        attn_implementation=attn_implementation,
        int8_mode=args.int8_mode,
    )
    return oracle.causal_lm_outputs(torch_model, ids, per_layer=per_layer)


def _check_inputs(args: argparse.Namespace) -> None:
    from oftjax.cli import CLIError
    from oftjax.cli._model_source import resolve_model
    from oftjax.cli._validate import check_parity_args

    args.model = resolve_model(args.model)
    if not (args.model / "config.json").is_file():
        raise CLIError(f"{args.model}: not an HF checkpoint directory (no config.json)")
    if args.adapter is not None and not (args.adapter / "adapter_config.json").is_file():
        raise CLIError(f"{args.adapter}: not a PEFT adapter directory (no adapter_config.json)")
    if args.batch < 1 or args.seq_len < 1:
        raise CLIError("--batch and --seq-len must be >= 1")
    check_parity_args(args)


def _jax_model(args: argparse.Namespace) -> tuple[Any, str | None]:
    """The JAX side: the checkpoint (quantized with ``--quant`` when float) with the adapter; and the
    checkpoint's own quantization (None for a float checkpoint)."""
    import jax.numpy as jnp

    from interop.hf_model import load_model
    from interop.peft import load_adapter
    from oftjax.cli import CLIError
    from oftjax.cli._train import checkpoint_quant
    from oftjax.train import quantize_model

    model = load_model(args.model, dtype=args.dtype, strict=args.strict_config)
    ck = checkpoint_quant(model)
    if ck is not None and args.quant not in ("none", ck):
        raise CLIError(f"{args.model}: checkpoint is already quantized ({ck}); omit --quant")
    if ck is None and args.quant != "none":
        quantize_model(model, args.quant, double_quant=args.double_quant, compute_dtype=jnp.dtype(args.dtype))
    if args.adapter is not None:
        load_adapter(model, args.adapter)
    return model, ck


def _inference_view(model: Any, args: argparse.Namespace, ck: str | None) -> Any:
    """The JAX model in the torch side's mode: inference (``nnx.view(deterministic=True)``: no module
    dropout, LLM.int8 in 8-bit layers), except an 8-bit model with ``--int8-mode train``: as loaded, in
    training mode (``interop.oracle.load_causal_lm``)."""
    from flax import nnx

    if args.int8_mode == "train" and "int8" in (ck, args.quant):
        return model
    return nnx.view(model, deterministic=True, raise_if_not_found=False)


def _report(args: argparse.Namespace, ck: str | None, rows: list[tuple[str, dict[str, float]]]) -> int:
    """Print the table and the verdict; 0 within tolerance, 3 beyond it."""
    kind = ck or args.quant
    if kind == "none":
        kind = "float"
    elif kind != "int8" and args.double_quant and ck is None:
        kind += " + double quant"
    what = f"{args.model}" + (f" + {args.adapter}" if args.adapter else "") + f" ({kind})"
    print(f"oftjax parity: {what}")
    print(
        f"  {args.batch} x {args.seq_len} random tokens (seed {args.seed}); {args.dtype}; torch "
        f"{args.device} vs JAX"
    )
    if kind == "int8":
        how = {"eval": "LLM.int8 (eval mode)", "train": "dequantize, then float matmul (train mode)"}
        print(f"  int8 layers: {how[args.int8_mode]} on both sides (--int8-mode {args.int8_mode})")
    print(f"  {'quantity':<20}{'max abs err':>14}{'max rel err':>14}{'top-1 agree':>14}")
    for name, r in rows:
        top = f"{100 * r['top1']:.2f}%" if "top1" in r else ""
        print(f"  {name:<20}{r['max_abs']:>14.3e}{r['max_rel']:>14.3e}{top:>14}")
    logits = rows[0][1]
    ok = logits["max_rel"] <= args.rtol and logits["top1"] >= args.min_top1
    verdict = "PASS" if ok else "FAIL"
    print(
        f"  {verdict}: logits rel err {logits['max_rel']:.2e} (limit {args.rtol:g}), top-1 "
        f"{100 * logits['top1']:.2f}% (limit {100 * args.min_top1:g}%)"
    )
    sys.stdout.flush()
    return 0 if ok else 3
