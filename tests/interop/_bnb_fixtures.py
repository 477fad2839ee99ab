"""Real bitsandbytes-quantized HF checkpoints for the interop tests, built once per test session.

A tiny Llama is saved as bf16, loaded by transformers with a ``BitsAndBytesConfig`` on the CPU and saved
again: that second directory is what transformers writes for a bnb checkpoint (docs/bitsandbytes-formats.md,
"Serialized layout"). transformers 5 cannot re-save a pre-quantized model (docs/oracle.md, "Other traps"),
so each variant is quantized from the float directory once and copied when a test needs to alter it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers

from tests._tiny import TINY_LLAMA

VARIANTS = {
    "int8": dict(load_in_8bit=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4_dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "nf4_dq_bf16storage": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_storage=torch.bfloat16,
    ),
}

_CACHE: dict[str, Path] = {}


def tiny_llama_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**TINY_LLAMA)


def float_dir(root: Path) -> Path:
    """The bf16 tiny Llama saved by ``save_pretrained`` (seeded)."""
    if "float" not in _CACHE:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16)
        path = root / "float_bf16"
        model.save_pretrained(path)
        _CACHE["float"] = path
    return _CACHE["float"]


def quantized_dir(root: Path, variant: str) -> Path:
    """A transformers-written bnb checkpoint of the tiny Llama, for one of ``VARIANTS``."""
    if variant not in _CACHE:
        src = float_dir(root)
        qc = transformers.BitsAndBytesConfig(**VARIANTS[variant])
        model = transformers.LlamaForCausalLM.from_pretrained(
            src, quantization_config=qc, device_map="cpu", dtype=torch.bfloat16
        )
        path = root / f"bnb_{variant}"
        model.save_pretrained(path)
        _CACHE[variant] = path
    return _CACHE[variant]


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def load_logits(path: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of transformers' model loaded from ``path`` on the CPU (bnb oracle traps disarmed)."""
    from interop import oracle

    oracle.use_default_cpu_dequant()
    model = transformers.LlamaForCausalLM.from_pretrained(path, device_map="cpu")
    oracle.disable_cpu_repacking(model)
    model.eval()
    with torch.no_grad():
        return model(input_ids).logits
