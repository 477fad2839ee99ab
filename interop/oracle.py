"""The torch side of parity: transformers + PEFT + bitsandbytes, with the CPU oracle traps disarmed.

torch, bitsandbytes, peft and transformers are imported lazily here and nowhere else in the library; a missing
package raises ``OracleUnavailable`` naming it (tests then fail, they never skip).

Traps handled (docs/oracle.md; docs/bitsandbytes-formats.md, "bitsandbytes CPU defects"):
  * bnb's AVX512-BF16 repacking of ``Linear4bit`` on the first eval forward: ``disable_cpu_repacking``.
  * bnb's CPU 4-bit dequantize bug when K % 16 == 0 and K % blocksize != 0: ``use_default_cpu_dequant``
    re-registers the pure-torch default kernel for the CPU.
"""

from __future__ import annotations

import importlib
from typing import Any


class OracleUnavailable(ImportError):
    """The torch oracle stack (torch, bitsandbytes, peft, transformers) is not installed."""


def require(module: str) -> Any:
    """Import ``module`` from the oracle stack or raise a clear ``OracleUnavailable``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - exercised only without the oracle extra
        raise OracleUnavailable(
            f"the torch oracle needs {module!r}; install it with: pip install -e '.[oracle]' ({e})"
        ) from e


_DEQUANT_FIXED = False


def cuda_device_count() -> int:
    """CUDA devices torch sees (0 without CUDA): where ``oftjax parity --device cuda:N`` can run."""
    torch = require("torch")
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def use_default_cpu_dequant() -> None:
    """Route bnb's CPU ``dequantize_4bit`` to its pure-torch default kernel (idempotent).

    bitsandbytes 0.50.2's AVX512 CPU kernel indexes absmax as ``row*(K/bs) + k/bs`` and is wrong whenever
    blocks cross rows with K % 16 == 0 (docs/oracle.md, "bnb's CPU 4-bit dequantize defect"). The default
    kernel is the reference.
    """
    global _DEQUANT_FIXED
    if _DEQUANT_FIXED:
        return
    require("torch")
    bnb = require("bitsandbytes")  # noqa: F841 - registers the bnb ops
    from bitsandbytes._ops import register_kernel
    from bitsandbytes.backends.default import ops as default_ops
    from bitsandbytes.backends.utils import _get_4bit_code

    default_compute = default_ops._dequantize_4bit_compute
    compute = getattr(default_compute, "__wrapped__", default_compute)
    torch = require("torch")

    @register_kernel("bitsandbytes::dequantize_4bit", "cpu")
    def _(A, absmax, blocksize, quant_type, shape, dtype):  # noqa: ANN001 - torch op signature
        if A.dtype != torch.uint8:
            A = A.view(torch.uint8)
        code = _get_4bit_code(quant_type, A.device)
        return compute(A.reshape(-1), absmax, code, blocksize, shape, dtype)

    _DEQUANT_FIXED = True


def disable_cpu_repacking(model: Any) -> Any:
    """Set ``support_avx512bf16_for_cpu = False`` on every bnb ``Linear4bit`` in ``model``; return it.

    Must run before the first forward: otherwise bnb repacks the weight in place, computes in bf16, breaks
    merges, drops gradients and corrupts later saves (docs/oracle.md, "AVX512-BF16 repacking of
    ``Linear4bit``").
    """
    bnb = require("bitsandbytes")
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


# ----------------------------------------------------------------------------------------------------------
# Causal LMs for `oftjax parity` and the end-to-end tests


def bnb_config(quant: str, *, double_quant: bool = True, compute_dtype: str = "float32") -> Any:
    """The transformers ``BitsAndBytesConfig`` for ``quant`` ("nf4" | "fp4" | "int8").

    Raises:
      ValueError: unknown ``quant``.
    """
    torch = require("torch")
    transformers = require("transformers")
    if quant in ("nf4", "fp4"):
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        )
    if quant == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quant must be nf4, fp4 or int8, got {quant!r}")


INT8_MODES = ("eval", "train")


def load_causal_lm(
    model_dir: Any,
    *,
    quant: str | None = None,
    double_quant: bool = True,
    adapter: Any = None,
    device: str = "cpu",
    dtype: str = "float32",
    attn_implementation: str | None = None,
    int8_mode: str = "train",
) -> Any:
    """Load an HF checkpoint in transformers (+ bitsandbytes, + a PEFT adapter), oracle traps disarmed.

    Args:
      model_dir: an HF checkpoint directory (float, or already bnb-quantized: its own quantization_config).
      quant: quantize a float checkpoint on load ("nf4" | "fp4" | "int8"), as ``BitsAndBytesConfig`` does.
      double_quant: 4-bit double quantization.
      adapter: a PEFT adapter directory for ``PeftModel.from_pretrained``.
      device: "cpu" or "cuda" (CUDA bitsandbytes).
      dtype: "float32" or "bfloat16": the float weights and activations (transformers' ``dtype``) and the
        4-bit layers' ``bnb_4bit_compute_dtype``, so that the JAX side loaded with the same ``dtype``
        computes the same thing.
      attn_implementation: transformers' attention ("eager", "sdpa"; None: its default, SDPA). "eager" is
        the computation oftjax's attention reproduces (float32 softmax, probabilities rounded to the compute
        dtype): in bfloat16, SDPA and eager differ from each other by more than oftjax differs from eager.
      int8_mode: the forward of 8-bit models. "train": ``model.train()`` (dropout is 0 in these configs),
        where bitsandbytes dequantizes and multiplies in float, as oftjax's ``Linear8bit`` does in training;
        "eval": ``model.eval()``, LLM.int8 (activations quantized, outlier columns in float), what
        transformers runs for inference and oftjax's ``Linear8bit`` under ``nnx.view(model,
        deterministic=True)`` (docs/bitsandbytes-formats.md, "int8 paths").

    The model is returned in eval mode, except 8-bit models with ``int8_mode="train"``.

    Raises:
      ValueError: unknown ``dtype``, ``quant`` or ``int8_mode``.
    """
    torch = require("torch")
    transformers = require("transformers")
    use_default_cpu_dequant()
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    if int8_mode not in INT8_MODES:
        raise ValueError(f"int8_mode must be one of {INT8_MODES}, got {int8_mode!r}")
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "device_map": device}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quant not in (None, "none"):
        kwargs["quantization_config"] = bnb_config(quant, double_quant=double_quant, compute_dtype=dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    disable_cpu_repacking(model)
    if adapter is not None:
        peft = require("peft")
        model = peft.PeftModel.from_pretrained(model, str(adapter))
        disable_cpu_repacking(model)
    int8 = any(type(m).__name__ == "Linear8bitLt" for m in model.modules())
    model.train(int8 and int8_mode == "train")
    return model


def causal_lm_outputs(model: Any, input_ids: Any, *, per_layer: bool = False) -> tuple[Any, list[Any]]:
    """``(logits, [decoder layer outputs])`` as float32 numpy arrays for int ``input_ids [B, T]``."""
    torch = require("torch")
    captured: list[Any] = []
    hooks = []
    if per_layer:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        for layer in base.model.layers:
            hooks.append(
                layer.register_forward_hook(
                    lambda _m, _i, out: captured.append((out[0] if isinstance(out, tuple) else out).detach())
                )
            )
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
            logits = model(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()
    return logits.float().cpu().numpy(), [c.float().cpu().numpy() for c in captured]
